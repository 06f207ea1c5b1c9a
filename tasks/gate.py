"""gate: decide promotion by the rule, register the candidate, move aliases compare-and-set
(through `ratchet.promotion`: under the registry lock, journaled for the run's undo)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ratchet.config import Params
from ratchet.continual import tags as continual_tags
from ratchet.data import RECENT, REFERENCE
from ratchet.gate import Check, Decision, decide, gate_inputs
from ratchet.lineage import Experiment, code_at_gate, commit_tags, dvc_experiment
from ratchet.registry import SPLIT_SCHEME_TAG
from ratchet.runtime import read_json, write_json, write_text_atomic
from ratchet.stage import stage_main


def data_hashes(lock: Path) -> dict[str, str]:
    """md5 of every data and model path in dvc.lock as this run computed it (not the gate's
    own entry, which is the previous run's): the exact inputs and output of this model."""
    from ratchet.lineage import data_hashes as this_run

    return this_run(lock)


def git_commit() -> str:
    """HEAD: at gate time the run's parent (the run is committed after the gate)."""
    from ratchet.lineage import git_head

    return git_head()


def params_hash(params: Params) -> str:
    blob = json.dumps(params.model_dump(by_alias=True), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def version_tags(decision: Decision, label: str, *, fingerprint: str, compared_with: str | None,
                 params: Params, drift: dict, validation: dict, lock: Path,
                 training: dict | None = None) -> dict[str, str]:
    tags = {
        "decision": label,
        "reasons": " | ".join(decision.reasons)[:4900],
        "failed": " | ".join(c.reason for c in decision.failed)[:4900],
        "warnings": " | ".join(c.reason for c in decision.warnings)[:4900],
        "fingerprint": fingerprint,
        "compared_with": str(compared_with),
        **commit_tags(dvc_experiment()),
        "params_hash": params_hash(params),
        SPLIT_SCHEME_TAG: json.dumps(params.prepare.scheme()),
        "validation": "passed" if validation.get("passed") else "failed",
        "validation_warnings": str(len(validation.get("warnings", []))),
        # Where the great-expectations Data Docs are: in the workspace, and logged with the run.
        "data_docs": str(validation.get("data_docs", "n/a")),
        "drift": str(drift.get("summary", "n/a"))[:4900],
        # How it was trained (full | continual) and on which newest batch: what the next run's
        # `finetune.init: auto` counts batches since the last full retrain from.
        **continual_tags(training or {}),
    }
    for path, md5 in data_hashes(lock).items():
        tags[f"data_hash.{path}"] = md5
    return tags


def pretrain_summary(path: Path | None) -> dict[str, Any] | None:
    """Whether pretrain trained the encoder the candidate started from, and if not, why."""
    stats = read_json(path) if path is not None and path.is_file() else None
    if stats is None:
        return None
    keys = ("enabled", "trained", "skipped", "mlm_head", "steps", "head_steps",
            "perplexity_before", "perplexity_after", "train_seconds")
    return {k: stats[k] for k in keys if k in stats}


def newest_noise(report: dict | None) -> dict | None:
    """The noise stage's verdict on the newest batch (its entry, `flagged`, `summary`)."""
    if not report:
        return None
    entry = (report.get("batches") or {}).get(report.get("newest"), {})
    return {**entry, "batch": report.get("newest"), "flagged": bool(report.get("flagged")),
            "summary": report.get("summary")}


TRAINING_KEYS = ("init", "init_reason", "init_from", "batch", "train_rows", "new_rows",
                 "replay_rows", "added_labels", "samples", "train_seconds")


def training_record(finetune_metrics: Path | None) -> dict[str, Any] | None:
    """How the candidate was trained, from metrics/finetune.json: full retrain or continual
    (`init`), why (`init_reason`), from what (`init_from`), on which newest batch, and its
    compute (rows, samples, seconds). None without the file."""
    if finetune_metrics is None or not finetune_metrics.is_file():
        return None
    stats = read_json(finetune_metrics)
    return {k: stats[k] for k in TRAINING_KEYS if k in stats}


def training_line(training: dict | None) -> str:
    """How the candidate was trained, in one line (the card's, the flow's artifact's)."""
    if not training or training.get("init") not in ("full", "continual"):
        return "n/a"
    how = ("full retrain from base" if training["init"] == "full"
           else f"continual from {training.get('init_from', 'the champion')}")
    rows = (f"{training.get('new_rows', '?')} new rows + {training.get('replay_rows', '?')} "
            "replayed" if training["init"] == "continual"
            else f"{training.get('train_rows', '?')} rows")
    return (f"{how} ({training.get('init_reason', '')}); newest batch "
            f"`{training.get('batch')}`, {rows}.")


PREDICTION_CACHE = Path(".ratchet/cache/predictions")
"""The evaluate stage's prediction cache (its `--cache` in dvc.yaml), relative to the workspace."""


def reevaluate(params: Params, m: dict[str, float], champion: dict, *, candidate: Path,
               test: Path, weights: Path | None
               ) -> tuple[dict[str, float], list[str], dict[str, int]]:
    """Metrics against another champion: the comparisons, latency ratio and behaviour beside it
    anew; the candidate-only measurements (size, batch-32 latency, probes) kept. Every model
    predicts through the prediction cache, so only rows it never saw are predicted: returns
    also how many rows each model predicted now."""
    from ratchet.evaluation import champion_labels, predict_frame, score, serving

    df, clf, champ = predict_frame(params, candidate, test, champion, weights,
                                   cache=PREDICTION_CACHE)
    fresh = score(df, params)
    fresh.update(serving(df, params, clf, champ)[0])
    kept = {k: v for k, v in m.items()
            if k.startswith(("candidate/latency/p", "candidate/size",
                             "behaviour/candidate/probes"))}
    labels = champion_labels(champ) if champ is not None else None
    new = sorted(set(df["label"].astype(str)) - set(labels)) if labels is not None else []
    return {**fresh, **kept}, new, dict(df.attrs.get("predicted", {}))


def run(params: Params, *, eval_metrics: Path, eval_report: Path, validation: Path, drift: Path,
        candidate: Path, champion: Path, test: Path, weights: Path, lock: Path,
        report: Path, curve: Path | None = None, pretrain_curve: Path | None = None,
        finetune_metrics: Path | None = None, pretrain_metrics: Path | None = None,
        noise: Path | None = None) -> dict[str, Any]:
    from ratchet.promotion import Journal, move_alias
    from ratchet.registry import (
        CHALLENGER,
        CHAMPION,
        AliasMoved,
        alias_target,
        connect,
        current_champion,
        tracking_uri,
    )
    from ratchet.workspace import fingerprint as model_fingerprint

    m = read_json(eval_metrics)
    details = read_json(eval_report) if eval_report.is_file() else {}
    new_classes = details.get("new_classes", [])
    evaluated = read_json(champion)
    evaluated["floor"] = details.get("floor") or []  # what evaluate held the candidate against
    val, drift_report = read_json(validation), read_json(drift)
    noise_report = read_json(noise) if noise is not None and noise.is_file() else None
    noise = newest_noise(noise_report)
    training = training_record(finetune_metrics)
    paths = (validation, eval_metrics, eval_report, candidate, curve, pretrain_curve,
             finetune_metrics, pretrain_metrics)  # what the candidate's run logs
    ws = Path.cwd()
    name = params.registry.model_name
    client = connect(params.registry, ws)
    journal = Journal.of_run(ws)  # None outside a guarded run (e.g. `dvc repro` alone)
    fp = model_fingerprint(candidate)
    before = current_champion(client, name)
    record: dict[str, Any] = {
        "model_name": name,
        "fingerprint": fp,
        "champion_before": before.version if before else None,
        "evaluated_against": evaluated.get("version"),
        "drift_summary": drift_report.get("summary"),
        "validation_warnings": val.get("warnings", []),
        "label_noise": noise,
        "pretrain": pretrain_summary(pretrain_metrics),
        "data_docs": val.get("data_docs"),
        "behaviour": details.get("behaviour"),
        "new_classes": new_classes,
        "training": training,
        "tracking_uri": tracking_uri(params.registry, ws),
        "reevaluations": [],
    }
    card = eval_report.parent / "model_card.md"
    experiment = dvc_experiment()
    if experiment is not None and params.gate.experiments == "log":
        record.update(log_experiment(
            params, experiment, m, evaluated=evaluated, noise=noise, new_classes=new_classes,
            fp=fp, identical=bool(before and before.fingerprint == fp), val=val, drift=drift,
            drift_report=drift_report, lock=lock, card=card, paths=paths, training=training),
            champion_after=record["champion_before"])
        write_json(report, record)
        return record
    if before and before.fingerprint == fp:
        decision = decide(gate_inputs(m, evaluated, noise=noise, new_classes=new_classes),
                          params.gate)
        record.update(decision="unchanged", promote=False, version=before.version,
                      champion_after=before.version, metrics=m,
                      checks=decision.to_dict()["checks"])
        record["checks"].append({"name": "identity", "passed": True,
                                 "reason": "the candidate is already the champion"})
        write_text_atomic(card, model_card(params, name, "unchanged", decision, m, val=val,
                                           drift=drift_report, evaluated=evaluated, lock=lock,
                                           training=training))
        write_json(report, record)
        return record

    weights_path = weights if weights.is_file() else None
    if journal is not None:  # from here the registry may change: an undo must look there
        journal.about_to("register")
    version: str | None = None
    run_id = None
    label, decision, extra = "rejected", None, []
    for _attempt in range(3):
        current = current_champion(client, name)
        if (current.version if current else None) != evaluated.get("version"):
            # Compare-and-set: `champion` moved since evaluation began (a person or another run).
            moved_from = evaluated.get("version")
            if current is None or current.fingerprint == fp:
                # Removed (someone stopped serving on purpose) or moved to this very model:
                # neither is the gate's to undo or judge. Register, decide nothing.
                decision = decide(gate_inputs(m, evaluated, noise=noise, new_classes=new_classes),
                                  params.gate)
                label = "deferred"
                extra = [Check("compare_and_set", False,
                               f"champion moved from {moved_from} to "
                               f"{current.version if current else 'nothing (alias removed)'} "
                               "during the run; not judged against it (re-run to decide)")]
                break
            # Judge the candidate against the champion as it is now, never overwrite blindly.
            evaluated = {"name": name, "version": current.version,
                         "fingerprint": current.fingerprint,
                         "floor": evaluated.get("floor") or []}
            m, new_classes, predicted = reevaluate(params, m, evaluated, candidate=candidate,
                                                   test=test, weights=weights_path)
            record["reevaluations"].append({"from": moved_from, "to": evaluated.get("version"),
                                            "predicted": predicted})
        decision = decide(gate_inputs(m, evaluated, noise=noise, new_classes=new_classes),
                          params.gate)
        label = "promoted" if decision.promote else "rejected"
        version, run_id = _register_or_tag(
            client, params, name, fp, label, decision, m, version=version, run_id=run_id,
            evaluated=evaluated, val=val, drift=drift, drift_report=drift_report, lock=lock,
            card=card, paths=paths, training=training)
        if journal is not None:  # before any alias points at it: undo must know it is ours
            journal.version(version, registered=run_id is not None, run_id=run_id)
        if label != "promoted":
            break
        try:
            move_alias(client, name, CHAMPION, version, by="gate", ws=ws, journal=journal,
                       expected=evaluated.get("version"),
                       reason=f"gate promoted version {version} over "
                              f"{evaluated.get('version') or 'no champion'}")
            break
        except AliasMoved:
            continue  # moved between the check and the move: evaluate again
    else:
        label = "deferred"
        extra = [Check("compare_and_set", False, "champion moved three times while the gate "
                       "decided; not promoted (re-run to decide)")]
    if extra:
        decision = Decision(False, [*decision.checks, *extra])
        version, run_id = _register_or_tag(
            client, params, name, fp, label, decision, m, version=version, run_id=run_id,
            evaluated=evaluated, val=val, drift=drift, drift_report=drift_report, lock=lock,
            card=card, paths=paths, training=training)
        if journal is not None:
            journal.version(version, registered=run_id is not None, run_id=run_id)
    challenger = alias_target(client, name, CHALLENGER)
    if challenger != version:
        # If another candidate took `challenger` meanwhile, it is the latest: keep it.
        with contextlib.suppress(AliasMoved):
            move_alias(client, name, CHALLENGER, version, by="gate", ws=ws, journal=journal,
                       expected=challenger, reason="the latest candidate")
    record["floor"] = floor_record(client, params, m, evaluated)
    after = current_champion(client, name)
    record.update(decision=label, promote=label == "promoted", version=version, run_id=run_id,
                  evaluated_against=evaluated.get("version"), metrics=m, new_classes=new_classes,
                  checks=decision.to_dict()["checks"],
                  champion_after=after.version if after else None)
    if run_id is not None:
        record["retrain_run_id"] = close_retrain(client, run_id, record, m,
                                                 drift_report=drift_report,
                                                 finetune_metrics=finetune_metrics,
                                                 pretrain_metrics=pretrain_metrics)
    write_json(report, record)
    return record


def stages_of_this_retrain(ws: Path) -> dict[str, dict[str, float]]:
    """The recorded runs of the stages that ran since the previous gate ended (those DVC
    skipped ran for an earlier retrain); this gate's own is not recorded yet."""
    from ratchet import stage

    recorded = stage.stage_timings(ws)
    since = recorded["gate"]["end"] if "gate" in recorded else None
    return {name: rec for name, rec in recorded.items()
            if name != "gate" and (since is None or rec.get("start", 0) > since)}


def retrain_start(ws: Path) -> float:
    """When this retrain began: its first stage's start, this gate's own at the latest."""
    import time

    from ratchet import stage

    now = stage.started_at or time.time()
    return min([now, *(r["start"] for r in stages_of_this_retrain(ws).values())])


def close_retrain(client, run_id: str, record: dict[str, Any], m: dict[str, float], *,
                  drift_report: dict, finetune_metrics: Path | None,
                  pretrain_metrics: Path | None) -> str | None:
    """End the retrain's run with its decision and the stages' measurements: each stage that
    ran for it, its seconds and CPU seconds (`stage/<name>/...`), and the headline numbers of
    drift, pretrain, finetune and evaluate (`<stage>/<name>`, as `dvc metrics show` names
    them). Best effort: the candidate's run and the decision are what count."""
    import time

    from ratchet import stage
    from ratchet.headline import headline
    from ratchet.registry import close_retrain_run

    ws = Path.cwd()
    try:
        numbers: dict[str, float] = {}
        for name, rec in stages_of_this_retrain(ws).items():
            numbers[f"stage/{name}/seconds"] = rec["seconds"]
            numbers[f"stage/{name}/cpu_seconds"] = rec["cpu_seconds"]
        if stage.started_at:
            numbers["stage/gate/seconds"] = time.time() - stage.started_at
        records = {"drift": drift_report, "evaluate": m}
        for name, path in (("finetune", finetune_metrics), ("pretrain", pretrain_metrics)):
            if path is not None and path.is_file():
                records[name] = read_json(path)
        for name, full in records.items():
            numbers.update({f"{name}/{k}": v for k, v in headline(name, full).items()})
        version = record.get("version")
        note = (f"**{record['decision']}**: version {version} "
                f"(champion {record.get('champion_before') or 'none'} -> "
                f"{record.get('champion_after') or 'none'}). The candidate's run, with its "
                "model, metrics and reports, is this run's child.")
        return close_retrain_run(client, run_id, decision=record["decision"], version=version,
                                 metrics=numbers, note=note)
    except Exception as err:  # noqa: BLE001 - the decision stands whatever the bookkeeping does
        print(f"gate: the retrain's run was not closed ({err})")
        return None


def floor_record(client, params: Params, m: dict[str, float], evaluated: dict) -> dict:
    """Keep the floor's pool up to date (`ratchet.floor.update`) and say what it judged: the
    pool before and after, and per slice the served model the candidate faced and the numbers."""
    from ratchet import floor

    judged = {}
    for key in sorted(m):
        if key.startswith("n/floor:"):
            name = key[len("n/"):]
            judged[name[len("floor:"):]] = {
                "version": f"{m.get(f'floor/model/{name}', math.nan):g}",
                "n": int(m[key]),
                "candidate": m.get(f"candidate/{name}/macro_f1"),
                "floor": m.get(f"champion/{name}/macro_f1"),
                "diff": m.get(f"diff/{name}/macro_f1"),
                "p_value": m.get(f"test/{name}/p_value"),
            }
    before = [str(x["version"]) for x in evaluated.get("floor") or []]
    from ratchet.promotion import registry_lock

    name = params.registry.model_name
    with registry_lock(client, name, Path.cwd()):  # the pool's tag has writers in turn too
        pool = floor.update(client, name, m, evaluated, params.gate.floor_models)
    return {"models_before": before, "judged": judged, "pool": pool}


def flat_params(params: Params) -> dict[str, str]:
    """params.yaml as MLflow params: `section.key` -> value (as `dvc exp show` names them)."""
    return {f"{k}.{kk}": str(vv)[:500] for k, v in params.model_dump(by_alias=True).items()
            for kk, vv in v.items()}


def log_experiment(params: Params, experiment: Experiment, m: dict[str, float], *,
                   evaluated: dict, noise: dict | None, new_classes: list[str], fp: str,
                   identical: bool,
                   val: dict, drift: Path, drift_report: dict, lock: Path, card: Path,
                   paths: tuple[Path, ...], training: dict | None = None) -> dict[str, Any]:
    """A `dvc exp run` stays an experiment: its MLflow run, named after the DVC experiment, has
    its params, metrics, curves and the card with the decision the gate would have made, and
    nothing is registered and no alias moves (`gate.experiments: register` opts out).

    Returns the record's entries: decision `experiment`, what it would have been, the run.
    """
    import mlflow

    from ratchet.registry import token_tag

    decision = decide(gate_inputs(m, evaluated, noise=noise, new_classes=new_classes),
                      params.gate)
    would_be = "unchanged" if identical else "promoted" if decision.promote else "rejected"
    checks = [*decision.checks, Check(
        "experiment", False, f"DVC experiment `{experiment.name}` (baseline "
        f"{experiment.baseline[:12]}): logged, not registered, no alias moved; the gate would "
        f"have said {would_be} (`dvc exp apply {experiment.name}`, then `ratchet run`, to "
        "decide for real)")]
    decision = Decision(False, checks)
    write_text_atomic(card, model_card(params, params.registry.model_name,
                                       f"experiment (would be {would_be})", decision, m,
                                       val=val, drift=drift_report, evaluated=evaluated,
                                       lock=lock, training=training))
    (validation, eval_metrics, eval_report, candidate, curve, pretrain_curve, finetune_metrics,
     pretrain_metrics) = paths
    tags = {**experiment.tags(), "decision": "experiment", "would_be": would_be,
            "compared_with": str(evaluated.get("version")),
            "fingerprint": fp, "params_hash": params_hash(params),
            **continual_tags(training or {}),
            **{f"data_hash.{p}": h for p, h in data_hashes(lock).items()}}
    with mlflow.start_run(run_name=experiment.name) as run:
        mlflow.set_tags({**tags, **token_tag()})
        mlflow.log_params(flat_params(params))
        mlflow.log_metrics({k: v for k, v in m.items()
                            if isinstance(v, float) and not math.isnan(v)})
        for path in (validation, eval_metrics, eval_report, card, drift):
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path="reports")
    log_training(run.info.run_id, curve=curve, pretrain_curve=pretrain_curve,
                 finetune_metrics=finetune_metrics, pretrain_metrics=pretrain_metrics)
    return {"decision": "experiment", "would_be": would_be, "promote": False, "version": None,
            "run_id": run.info.run_id, "experiment": {"name": experiment.name,
                                                      "baseline": experiment.baseline},
            "metrics": m,
            "checks": decision.to_dict()["checks"]}


def _register_or_tag(client, params: Params, name: str, fp: str, label: str, decision: Decision,
                     m: dict[str, float], *, version: str | None, run_id: str | None,
                     evaluated: dict, val: dict, drift: Path, drift_report: dict, lock: Path,
                     card: Path, paths: tuple[Path, ...], training: dict | None = None
                     ) -> tuple[str, str | None]:
    """Write the model card for this decision, register the candidate (once per model and
    baseline) or bring the run it logged earlier this call up to date (after a re-evaluation or
    a deferral), then tag the version with the decision."""
    from ratchet.registry import find_version

    write_text_atomic(card, model_card(params, name, label, decision, m, val=val,
                                       drift=drift_report, evaluated=evaluated, lock=lock,
                                       training=training))
    if version is None:
        version = find_version(client, name, fp, str(evaluated.get("version")))
        if version is None:
            run_id, version = _log(params, name, fp, label, m, val=val, drift=drift, card=card,
                                   paths=paths, training=training)
    elif run_id is not None:  # the run logged earlier this call: its numbers and card too
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 1) for k, v in m.items()
                                          if isinstance(v, float) and not math.isnan(v)])
        client.set_tag(run_id, "decision", label)
        client.log_artifact(run_id, str(card))
    _tag(client, params, name, version, label, decision, m, fp=fp, evaluated=evaluated,
         val=val, drift_report=drift_report, lock=lock, training=training)
    return version, run_id


def _tag(client, params: Params, name: str, version: str, label: str, decision: Decision,
         m: dict[str, float], *, fp: str, evaluated: dict, val: dict, drift_report: dict,
         lock: Path, training: dict | None = None) -> None:
    tags = version_tags(decision, label, fingerprint=fp, compared_with=evaluated.get("version"),
                        params=params, drift=drift_report, validation=val, lock=lock,
                        training=training)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description(label, decision, m))


def _log(params: Params, name: str, fp: str, label: str, m: dict[str, float], *, val: dict,
         drift: Path, card: Path, paths: tuple[Path, ...], training: dict | None = None
         ) -> tuple[str, str]:
    """Log the candidate's run (params, metrics, reports, model card) and register it, as the
    child of the retrain's run (`retrain <batch>`, which `close_retrain` ends)."""
    from ratchet.registry import log_candidate, open_retrain_run

    (validation, eval_metrics, eval_report, candidate, curve, pretrain_curve, finetune_metrics,
     pretrain_metrics) = paths
    plots = sorted(eval_report.parent.glob("*.png"))
    docs = [Path(val["data_docs"]).parent] if val.get("data_docs") else []
    run_tags = {"fingerprint": fp, "decision": label, "mode": params.finetune.mode,
                **continual_tags(training or {}), **filter_tags(training or {})}
    parent = open_retrain_run(params.registry.experiment, batch=run_tags.get("batch"),
                              start=retrain_start(Path.cwd()),
                              tags={k: v for k, v in run_tags.items() if k != "fingerprint"})
    run_id, version = log_candidate(
        candidate, name=name, params=flat_params(params), metrics=m,
        artifacts=[drift, drift.with_suffix(".png"), validation, eval_metrics, eval_report,
                   card, *plots, *docs],
        run_tags=run_tags, model_card=card, parent_run_id=parent,
    )
    log_training(run_id, curve=curve, pretrain_curve=pretrain_curve,
                 finetune_metrics=finetune_metrics, pretrain_metrics=pretrain_metrics)
    try:  # one stored copy of the model and of the unchanged reports, not one per store and run
        from mlflow import MlflowClient

        from ratchet.registry import share_stored_copies

        shared = share_stored_copies(MlflowClient(), name, version, run_id, Path.cwd())
        if shared["files"]:
            print(f"gate: {shared['files']} logged files ({shared['bytes'] / 2**20:.1f} MB) "
                  "share the copy already stored")
    except Exception as err:  # noqa: BLE001 - saving space must never fail a logged run
        print(f"gate: logged files kept as separate copies ({err})")
    return run_id, version


CURVE_KEYS = {  # curve CSV column -> MLflow metric key
    "finetune": (("loss", "train/loss"), ("lr", "train/lr"), ("val_macro_f1", "val/macro_f1"),
                 ("val_accuracy", "val/accuracy")),
    "pretrain": (("loss", "pretrain/loss"), ("lr", "pretrain/lr"),
                 ("perplexity", "pretrain/perplexity")),
}


def log_training(run_id: str, *, curve: Path | None = None, pretrain_curve: Path | None = None,
                 finetune_metrics: Path | None = None, pretrain_metrics: Path | None = None
                 ) -> None:
    """How the candidate trained, on its run: each curve (CSV and PNG) under
    `reports/<stage>/` (both stages name theirs `curve`), and as metric histories (the run's
    charts: train/loss, train/lr per step, val/* per epoch; pretrain/loss, pretrain/lr per
    step, pretrain/perplexity when measured), and the stages' numeric measurements as
    `finetune/*` and `pretrain/*` metrics (samples/s, peak memory, perplexity before and
    after, ...)."""
    import time

    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = []
    for stage, path in (("finetune", curve), ("pretrain", pretrain_curve)):
        if path is None or not path.is_file():
            continue
        for file in (path, path.with_suffix(".png")):
            if file.is_file():
                client.log_artifact(run_id, str(file), f"reports/{stage}")
        rows = pd.read_csv(path)
        for column, key in CURVE_KEYS[stage]:
            if column in rows:
                metrics += [Metric(key, float(v), now, int(step)) for step, v in
                            zip(rows["step"], rows[column], strict=True) if pd.notna(v)]
    for stage, path in (("finetune", finetune_metrics), ("pretrain", pretrain_metrics)):
        stats = read_json(path) if path is not None and path.is_file() else {}
        metrics += [Metric(f"{stage}/{k}", float(v), now, 0) for k, v in stats.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                    and math.isfinite(v)]
    for start in range(0, len(metrics), 1000):  # the API takes at most 1000 per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


ROWS = ("all", RECENT, REFERENCE, "weighted")


def _slice_rows(m: dict[str, float]) -> list[str]:
    names = [s for s in ROWS if f"n/{s}" in m]
    names += sorted(k[len("n/"):] for k in m if k.startswith("n/domain:"))
    return names


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if not isinstance(x, (int, float)) or math.isnan(x) else format(x, spec)


COUNTS = ("parameters", "bytes", "classes", "rows")  # measurement names that count things


def _measurement(key: str, value: Any) -> str:
    """A measurement's cell: a count as an integer with separators, the rest to 4 places."""
    if (key.endswith(COUNTS) and isinstance(value, (int, float)) and math.isfinite(value)
            and float(value).is_integer()):
        return f"{int(value):,}"
    return _fmt(value)


def filter_tags(training: dict) -> dict[str, str]:
    """Short run tags a person filters the runs table by: the newest batch and how the
    candidate started (`tags.batch = '0003-…'`, `tags.init = 'full'`)."""
    out = {}
    if training.get("batch"):
        out["batch"] = str(training["batch"])
    if training.get("init"):
        out["init"] = str(training["init"])
    return out


def metric_table(m: dict[str, float], *, domains: bool = True) -> str:
    """One row per slice: rows, both models' macro-F1 and accuracy, the gain and its bounds.

    `p (rule)` is the p-value of the slice's own test: small is good for recent, reference and
    weighted (evidence of a gain / of no drop), large is good for a domain (no evidence of harm).
    """
    lines = ["| slice | n | candidate F1 | champion F1 | diff | bounds | p (rule) | "
             "candidate acc | champion acc |", "|---|---|---|---|---|---|---|---|---|"]
    for s in _slice_rows(m):
        if s.startswith("domain:") and not domains:
            continue
        lines.append(
            f"| {s} | {_fmt(m.get(f'n/{s}'), '.0f')} | {_fmt(m.get(f'candidate/{s}/macro_f1'))} "
            f"| {_fmt(m.get(f'champion/{s}/macro_f1'))} "
            f"| {_fmt(m.get(f'diff/{s}/macro_f1'), '+.4f')} "
            f"| {_fmt(m.get(f'diff/{s}/macro_f1_low'), '+.4f')} to "
            f"{_fmt(m.get(f'diff/{s}/macro_f1_high'), '+.4f')} "
            f"| {_fmt(m.get(f'test/{s}/p_value'))} | {_fmt(m.get(f'candidate/{s}/accuracy'))} "
            f"| {_fmt(m.get(f'champion/{s}/accuracy'))} |"
        )
    return "\n".join(lines)


def _verdict(c: Check) -> str:
    return "warn" if c.passed and c.warning else "pass" if c.passed else "fail"


DESCRIPTION_LIMIT = 4900
"""MLflow stores a version description in a 5000-character column (Postgres/MySQL enforce it)."""
CELL_GAP = "&emsp;"


def padded(markdown: str) -> str:
    """Markdown tables as the MLflow UI can show them apart: it draws a description's tables
    with no cell padding and strips every style attribute (`1.0000+0.2810` runs together), so
    each cell but a row's last ends in an em space, as an entity (the literal character is
    trimmed)."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("|") and line.endswith("|") and set(line) - set("|-: "):
            cells = [c.strip() for c in line[1:-1].split(" | ")]
            line = "| " + " | ".join([*(f"{c}{CELL_GAP}" if c else c for c in cells[:-1]),
                                      cells[-1]]) + " |"
        out.append(line)
    return "\n".join(out)


def description(label: str, decision: Decision, m: dict[str, float]) -> str:
    """The version description in the MLflow UI: the decision, every check, the metric table.

    Kept under the registry's column size: past it, the passing domain checks go first (their
    numbers stay in the slice table), then the measurements, then the slice table's domain
    rows, then the check reasons are shortened; reports/gate.json always has everything.
    """
    head = [f"**Gate decision: {label}**", "", "| check | passed | reason |", "|---|---|---|"]
    extra = [(k, v) for k, v in sorted(m.items())
             if k.startswith(("candidate/latency", "candidate/size", "behaviour/"))]
    measurements = ["", "| measurement | value |", "|---|---|",
                    *(f"| {k} | {_measurement(k, v)} |" for k, v in extra)]
    note = ["", "(shortened to fit the registry: see reports/gate.json in the run)"]
    for reason_len, domain_checks, domains, show_extra in (
            (None, True, True, True), (None, False, True, True), (None, False, True, False),
            (None, False, False, False), (120, False, False, False), (60, False, False, False)):
        rows = [f"| {c.name} | {_verdict(c)} | "
                f"{c.reason if reason_len is None else c.reason[:reason_len]} |"
                for c in decision.checks
                if domain_checks or not c.name.startswith("domain:") or not c.passed]
        text = padded("\n".join([*head, *rows, "", metric_table(m, domains=domains),
                                 *(measurements if show_extra and extra else [])]))
        if not (domain_checks and show_extra):
            text += "\n".join(note)
        if len(text) <= DESCRIPTION_LIMIT:
            return text
    return text[: DESCRIPTION_LIMIT - 80] + "\n".join(note)


def model_card(params: Params, name: str, label: str, decision: Decision, m: dict[str, float], *,
               val: dict, drift: dict, evaluated: dict, lock: Path,
               training: dict | None = None) -> str:
    """A model card in markdown: what the model is, what it was trained and judged on, limits."""
    hashes = data_hashes(lock)
    lines = [
        f"# Model card: {name}",
        "",
        "A text classifier fine-tuned by ratchet (continual fine-tuning with a gated registry).",
        "Input: a DataFrame with a `text` column. Output: `label`, its `score`, and "
        "`probabilities` over the label set (`label_map.json`).",
        "",
        "## Training",
        f"- Base model: `{params.model.source}`, max length {params.model.max_length} tokens, "
        f"seed {params.model.seed}.",
        f"- Fine-tuning: {params.finetune.epochs:g} epochs, batch {params.finetune.batch_size}, "
        f"learning rate {params.finetune.learning_rate:g}; continued MLM pre-training "
        f"{ {True: 'on', False: 'off'}.get(params.pretrain.enabled, 'auto')} (the gate "
        "record's `pretrain` says whether it trained, and why not).",
        f"- Start: {training_line(training)}",
        f"{code_at_gate(dvc_experiment())}; params hash `{params_hash(params)}`.",
        "- Data (md5 from dvc.lock, as this run computed them):",
        *[f"  - `{p}`: `{h}`" for p, h in sorted(hashes.items())],
        f"- Validation: {'passed' if val.get('passed') else 'failed'} with "
        f"{len(val.get('warnings', []))} warning(s).",
        f"- Drift of the newest batch: {drift.get('summary', 'n/a')}",
        "",
        "## Evaluation",
        f"Compared with champion version {evaluated.get('version') or '(none: cold start)'}.",
        "",
        metric_table(m),
        "",
        "## Gate decision: " + label,
        *[f"- {_verdict(c).upper()} `{c.name}`: {c.reason}" for c in decision.checks],
        "",
        "## Limitations",
        "- Judged on the project's own test split; the drift-weighted slice estimates the current "
        "distribution from importance weights, which are clipped and noisy on small batches.",
        "- Invariance and probe checks cover casing, one-typo changes and the workspace's "
        "probes only.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    stage_main("gate", __doc__, {
        "eval_metrics": "evaluation metrics JSON",
        "eval_report": "evaluation details JSON (behaviour, label sets)",
        "validation": "validation report JSON",
        "drift": "drift report JSON",
        "candidate": "folder of the candidate model",
        "champion": "champion.json the evaluation used",
        "test": "prepared test split (to re-evaluate if `champion` moves during the run)",
        "weights": "importance weights of the test rows (idem)",
        "lock": "dvc.lock, for the data hashes (read, not a dependency)",
        "curve": "finetune's training curve CSV (logged as the run's metric history)",
        "pretrain_curve": "pretrain's training curve CSV (idem)",
        "finetune_metrics": "finetune's measurements JSON (logged as finetune/* metrics)",
        "pretrain_metrics": "pretrain's measurements JSON (logged as pretrain/* metrics)",
        "noise": "the noise stage's label-noise report JSON (a flagged newest batch blocks)",
        "report": "gate decision JSON to write",
    }, run, optional=("curve", "pretrain_curve", "finetune_metrics", "pretrain_metrics",
                      "noise"))


if __name__ == "__main__":
    main()
