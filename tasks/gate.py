"""gate: decide promotion by the rule, register the candidate, move aliases compare-and-set."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import yaml

from ratchet.config import Params
from ratchet.gate import Decision, GateInputs, decide
from ratchet.runtime import read_json, write_json
from ratchet.stage import stage_main
from ratchet.stats import Comparison


def comparison(m: dict[str, float], name: str) -> Comparison | None:
    if f"diff/{name}/macro_f1" not in m:
        return None
    nan = math.nan
    return Comparison(
        n=int(m.get(f"n/{name}", 0)),
        candidate=m.get(f"candidate/{name}/macro_f1", nan),
        champion=m.get(f"champion/{name}/macro_f1", nan),
        diff=m[f"diff/{name}/macro_f1"],
        low=m.get(f"diff/{name}/macro_f1_low", nan),
        high=m.get(f"diff/{name}/macro_f1_high", nan),
        p_value=m.get(f"diff/{name}/macro_f1_p_value", nan),
    )


def gate_inputs(m: dict[str, float], champion: dict, validation: dict) -> GateInputs:
    return GateInputs(
        has_champion=bool(champion.get("version")),
        validation_passed=bool(validation.get("passed")),
        candidate_score=m.get("candidate/all/macro_f1", math.nan),
        recent=comparison(m, "recent"),
        reference=comparison(m, "reference"),
    )


def data_hashes(lock: Path) -> dict[str, str]:
    """md5 of every data and model path in dvc.lock: the exact inputs of this model."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    hashes = {}
    for stage in stages.values():
        for entry in stage.get("deps", []) + stage.get("outs", []):
            if entry.get("md5") and entry["path"].startswith(("data/", "models/")):
                hashes[entry["path"]] = entry["md5"]
    return hashes


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def params_hash(params: Params) -> str:
    blob = json.dumps(params.model_dump(by_alias=True), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def version_tags(decision: Decision, label: str, *, fingerprint: str, compared_with: str | None,
                 params: Params, drift: dict, validation: dict, lock: Path) -> dict[str, str]:
    tags = {
        "decision": label,
        "reasons": " | ".join(decision.reasons)[:4900],
        "failed": " | ".join(c.reason for c in decision.failed)[:4900],
        "fingerprint": fingerprint,
        "compared_with": str(compared_with),
        "git_commit": git_commit(),
        "params_hash": params_hash(params),
        "validation": "passed" if validation.get("passed") else "failed",
        "validation_warnings": str(len(validation.get("warnings", []))),
        # Where the great-expectations Data Docs are: in the workspace, and logged with the run.
        "data_docs": str(validation.get("data_docs", "n/a")),
        "drift": str(drift.get("summary", "n/a"))[:4900],
    }
    for path, md5 in data_hashes(lock).items():
        tags[f"data_hash.{path}"] = md5
    return tags


def run(params: Params, *, eval_metrics: Path, validation: Path, drift: Path, candidate: Path,
        champion: Path, lock: Path, report: Path) -> dict[str, Any]:
    from ratchet.registry import (
        CHALLENGER,
        CHAMPION,
        connect,
        current_champion,
        find_version,
        log_candidate,
        tracking_uri,
    )
    from ratchet.workspace import fingerprint as model_fingerprint

    m = read_json(eval_metrics)
    evaluated = read_json(champion)
    val, drift_report = read_json(validation), read_json(drift)
    decision = decide(gate_inputs(m, evaluated, val), params.gate)
    ws = Path.cwd()
    name = params.registry.model_name
    client = connect(params.registry, ws)
    fp = model_fingerprint(candidate)
    before = current_champion(client, name)
    record: dict[str, Any] = {
        "model_name": name,
        "fingerprint": fp,
        "champion_before": before.version if before else None,
        "evaluated_against": evaluated.get("version"),
        "checks": decision.to_dict()["checks"],
        "metrics": m,
        "drift_summary": drift_report.get("summary"),
        "validation_warnings": val.get("warnings", []),
        "data_docs": val.get("data_docs"),
        "tracking_uri": tracking_uri(params.registry, ws),
    }
    if before and before.fingerprint == fp:
        record.update(decision="unchanged", promote=False, version=before.version,
                      champion_after=before.version)
        record["checks"].append({"name": "identity", "passed": True,
                                 "reason": "the candidate is already the champion"})
        write_json(report, record)
        return record

    moved = (before.version if before else None) != evaluated.get("version")
    label = "promoted" if decision.promote and not moved else "rejected"
    if decision.promote and moved:
        label = "deferred"
        record["checks"].append({
            "name": "compare_and_set", "passed": False,
            "reason": f"champion moved from {evaluated.get('version')} to "
                      f"{before.version if before else None} during the run; not overwriting it "
                      "(the next `ratchet run` re-evaluates against the new champion)"})
    tags = version_tags(decision, label, fingerprint=fp, compared_with=evaluated.get("version"),
                        params=params, drift=drift_report, validation=val, lock=lock)
    version = find_version(client, name, fp, str(evaluated.get("version")))
    run_id = None
    if version is None:
        flat_params = {f"{k}.{kk}": str(vv)[:500] for k, v in params.model_dump(by_alias=True)
                       .items() for kk, vv in v.items()}
        run_id, version = log_candidate(
            candidate, name=name, params=flat_params, metrics=m,
            artifacts=[drift, drift.with_suffix(".png"), validation, eval_metrics,
                       *([Path(val["data_docs"]).parent] if val.get("data_docs") else [])],
            run_tags={"fingerprint": fp, "decision": label},
        )
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=_description(label, decision, m))
    client.set_registered_model_alias(name, CHALLENGER, version)
    if label == "promoted":
        client.set_registered_model_alias(name, CHAMPION, version)
    after = current_champion(client, name)
    record.update(decision=label, promote=label == "promoted", version=version, run_id=run_id,
                  champion_after=after.version if after else None)
    write_json(report, record)
    return record


def _description(label: str, decision: Decision, m: dict[str, float]) -> str:
    lines = [f"**Gate decision: {label}**", "", "| check | passed | reason |", "|---|---|---|"]
    lines += [f"| {c.name} | {'yes' if c.passed else 'no'} | {c.reason} |" for c in decision.checks]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(m.items()) if isinstance(v, float)]
    return "\n".join(lines)


def main() -> None:
    stage_main("gate", __doc__, {
        "eval_metrics": "evaluation metrics JSON",
        "validation": "validation report JSON",
        "drift": "drift report JSON",
        "candidate": "folder of the candidate model",
        "champion": "champion.json the evaluation used",
        "lock": "dvc.lock, for the data hashes (read, not a dependency)",
        "report": "gate decision JSON to write",
    }, run)


if __name__ == "__main__":
    main()
