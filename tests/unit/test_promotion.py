"""A promotion is one transaction (real MLflow SQLite stores, real processes, real tiny models):
undo reverts exactly the run's own moves, writers serialize through the registry lock or
lease, and the move log loses no event."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ratchet import promotion
from ratchet.config import parse_params
from ratchet.errors import LeaseLost, RegistryBusy
from ratchet.promotion import JOURNALS, Journal, Lease
from ratchet.registry import (
    CHALLENGER,
    CHAMPION,
    RUN_TOKEN_ENV,
    alias_history,
    aliases,
    connect,
    move_alias,
    tracking_uri,
)
from ratchet.runtime import write_json
from ratchet.workspace import run_guard
from tests.integration import writers
from tests.unit.test_cli import registry_workspace
from tests.unit.test_gate_stage import LABELS, TEXTS, _register, tiny_classifier
from tests.unit.test_history import NAME, fresh_store, register
from tests.unit.test_undo import register_as_this_run

QUIET = {"log": lambda msg: None}

# --- the gate inside a failing run: what undo reverts ------------------------------------------

PARAMS = {
    "model": {"source": "tiny"},
    "evaluate": {"bootstrap_resamples": 200, "latency_examples": 8, "behaviour_rows": 20},
    # The candidate below memorised the test texts: the rule's accuracy checks pass on merit;
    # robustness and probes are not what these tests are about.
    "gate": {"min_invariance": 0.0, "max_invariance_drop": 1.0, "min_probe_accuracy": 0.0,
             "max_latency_ratio": 100.0},
}


def trained_classifier(path: Path) -> Path:
    """A tiny classifier trained until it knows every test text (a few seconds): better than
    any random-init champion on every slice, so the gate promotes it."""
    import torch

    from tests.conftest import tiny_classifier as untrained

    model, tok = untrained(LABELS, seed=0)
    texts = [t for label in LABELS for t in TEXTS[label]]
    labels = torch.tensor([LABELS.index(label) for label in LABELS for _ in TEXTS[label]])
    batch = tok(texts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Made once: a stage directory with a store holding v1 and v2 (random tiny models, both
    servable), a trained candidate, and its evaluation against v1 (champion.json = v1)."""
    import pandas as pd

    from ratchet.workspace import fingerprint
    from tasks import evaluate

    ws = tmp_path_factory.mktemp("promotion-base")
    (ws / "params.yaml").write_text(json.dumps(PARAMS))
    params = parse_params(PARAMS)
    rows = [{"text": t, "label": lab, "domain": "travel" if lab == "book_flight" else "home",
             "slice": "recent" if i % 2 else "reference"}
            for lab, texts in TEXTS.items() for i, t in enumerate(texts)]
    pd.DataFrame(rows * 3).to_parquet(ws / "test.parquet")
    write_json(ws / "validation.json", {"passed": True, "warnings": []})
    write_json(ws / "drift.json", {"summary": "no drift"})
    (ws / "probes.yaml").write_text("play_music: [play jazz]\n")
    cwd = Path.cwd()
    os.chdir(ws)
    try:
        client = fresh_store(ws)
        for seed in (1, 2):
            model = tiny_classifier(ws / f"m{seed}", seed=seed)
            version = _register(ws, params, model)
            client.set_model_version_tag(NAME, version, "fingerprint", fingerprint(model))
        trained_classifier(ws / "candidate")
        write_json(ws / "champion.json", {"name": NAME, "version": "1"})
        move_alias(client, NAME, CHAMPION, "1", by="cli", expected=None, reason="first")
        evaluate.run(params, candidate=ws / "candidate", test=ws / "test.parquet",
                     champion=ws / "champion.json", metrics=ws / "eval.json",
                     predictions=ws / "pred.parquet", report=ws / "eval" / "report.json")
    finally:
        os.chdir(cwd)
    return ws


@pytest.fixture
def stage(base, tmp_path, monkeypatch):
    """A copy of `base` to change (the store's artifacts stay in base, read only): the stage's
    working directory, as DVC runs it, and a client on its store."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, ignore=shutil.ignore_patterns("mlartifacts"))
    monkeypatch.chdir(ws)
    monkeypatch.delenv(RUN_TOKEN_ENV, raising=False)
    return ws, connect(parse_params(PARAMS).registry, ws)


def run_gate(ws: Path) -> dict:
    from tasks import gate

    return gate.run(parse_params(PARAMS), eval_metrics=ws / "eval.json",
                    eval_report=ws / "eval" / "report.json", validation=ws / "validation.json",
                    drift=ws / "drift.json", candidate=ws / "candidate",
                    champion=ws / "champion.json", test=ws / "test.parquet",
                    weights=ws / "absent.parquet", lock=ws / "dvc.lock", report=ws / "gate.json")


def moves(client) -> list[tuple]:
    return [(e["alias"], e["from"], e["to"], e["by"], e["rollback"])
            for e in alias_history(client, NAME)]


@pytest.mark.slow  # the real gate stage; quick variant: ..._person_chose_mid_run_quick
def test_undo_keeps_the_champion_a_person_chose_mid_run(stage):
    """champion=1; a person moves it to 2 mid-run; the gate re-evaluates and promotes 3 over 2;
    `dvc push` fails: undo moves champion 3 -> 2 (the person's choice), not back to 1."""
    ws, client = stage
    with pytest.raises(RuntimeError, match="dvc push"), run_guard(ws, **QUIET):
        move_alias(client, NAME, CHAMPION, "2", by="cli", expected="1", reason="a person")
        record = run_gate(ws)
        assert record["decision"] == "promoted", record["checks"]
        assert record["evaluated_against"] == "2" and record["version"] == "3"
        assert aliases(client, NAME) == {CHAMPION: "3", CHALLENGER: "3"}
        raise RuntimeError("dvc push: remote unreachable")

    assert aliases(client, NAME) == {CHAMPION: "2"}
    assert {str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")} == {
        "1", "2"}
    assert moves(client) == [
        (CHAMPION, None, "1", "cli", False), (CHAMPION, "1", "2", "cli", False),
        (CHAMPION, "2", "3", "gate", False), (CHALLENGER, None, "3", "gate", False),
        (CHALLENGER, "3", None, "gate", True), (CHAMPION, "3", "2", "gate", True)]
    assert not list((ws / JOURNALS).glob("*"))


@pytest.mark.slow  # the real gate stage (find_version); the journal's side is quick below
def test_undo_reverts_the_move_of_a_version_reused_from_an_earlier_run(stage):
    """A version found by `find_version` (same model, same baseline) was registered by an
    earlier run, under that run's token: the failing run's move of it is still undone, and the
    version, not this run's, stays."""
    ws, client = stage
    with run_guard(ws, **QUIET):  # run 1 promotes 3 over 1, and is recorded
        assert run_gate(ws)["decision"] == "promoted"
    assert aliases(client, NAME) == {CHAMPION: "3", CHALLENGER: "3"}
    move_alias(client, NAME, CHAMPION, "1", by="cli", expected="3", reason="a person",
               rollback=True)

    with pytest.raises(RuntimeError, match="dvc push"), run_guard(ws, **QUIET):
        record = run_gate(ws)  # the same candidate against the same champion: v3 again
        assert record["decision"] == "promoted" and record["version"] == "3"
        assert len(client.search_model_versions(f"name = '{NAME}'")) == 3  # reused
        raise RuntimeError("dvc push: remote unreachable")

    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "3"}
    assert {str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")} == {
        "1", "2", "3"}
    assert moves(client)[-2:] == [(CHAMPION, "1", "3", "gate", False),
                                  (CHAMPION, "3", "1", "gate", True)]


# --- the journal: a run killed at any point ----------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A workspace's registry side: params.yaml and a store with v1 (champion) and v2."""
    from ratchet.workspace import template

    monkeypatch.delenv(RUN_TOKEN_ENV, raising=False)
    shutil.copyfile(template("params.yaml"), tmp_path / "params.yaml")
    client = fresh_store(tmp_path)
    register(client, 2)
    move_alias(client, NAME, CHAMPION, "1", by="gate", expected=None, reason="first")
    return tmp_path, client


def test_undo_keeps_the_champion_a_person_chose_mid_run_quick(store):
    """The stale-snapshot case on the journal alone: champion=1, a person moves it to 2, the
    run's gate moves 2 -> 3, the run fails: champion ends at 2, not at the run's start 1."""
    path, client = store
    with pytest.raises(RuntimeError, match="dvc push"), run_guard(path, **QUIET):
        version = register_as_this_run(client, path)
        journal = Journal.of_run(path)
        journal.version(version, registered=True)
        move_alias(client, NAME, CHAMPION, "2", by="cli", expected="1", reason="a person")
        promotion.move_alias(client, NAME, CHAMPION, version, ws=path, by="gate",
                             expected="2", reason="promoted", journal=journal)
        raise RuntimeError("dvc push: remote unreachable")
    assert aliases(client, NAME) == {CHAMPION: "2"}
    assert moves(client)[-1] == (CHAMPION, version, "2", "gate", True)


def test_undo_reverts_a_journaled_move_of_a_version_registered_by_an_earlier_run(store):
    """A reused version carries an older run's token: the journal, not the token, says the
    failing run moved it, so the move is undone and the version kept."""
    path, client = store
    with pytest.raises(KeyboardInterrupt), run_guard(path, **QUIET):
        journal = Journal.of_run(path)
        journal.version("2", registered=False)  # reused: registered before this run
        promotion.move_alias(client, NAME, CHAMPION, "2", ws=path, by="gate", expected="1",
                             reason="promoted", journal=journal)
        raise KeyboardInterrupt
    assert aliases(client, NAME) == {CHAMPION: "1"}
    assert "2" in {str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")}


def test_a_run_killed_between_its_move_and_the_log_entry_is_undone_and_logged(store):
    path, client = store
    killed = run_guard(path, **QUIET)
    killed.__enter__()  # the process dies inside: never exited
    version = register_as_this_run(client, path)
    journal = Journal.of_run(path)
    journal.version(version, registered=True)
    journal.intent(CHAMPION, "1", version)
    client.set_registered_model_alias(NAME, CHAMPION, version)  # then killed: no log entry
    os.environ.pop(RUN_TOKEN_ENV)

    with run_guard(path, **QUIET):
        assert aliases(client, NAME) == {CHAMPION: "1"}
    assert moves(client) == [(CHAMPION, None, "1", "gate", False),
                             (CHAMPION, "1", version, "gate", False),  # logged by the undo
                             (CHAMPION, version, "1", "gate", True)]
    assert version not in {str(mv.version) for mv in
                           client.search_model_versions(f"name = '{NAME}'")}
    del killed


def test_undo_keeps_a_version_someone_else_aliased_since(store):
    path, client = store
    with pytest.raises(KeyboardInterrupt), run_guard(path, **QUIET):
        version = register_as_this_run(client, path)
        journal = Journal.of_run(path)
        journal.version(version, registered=True)
        promotion.move_alias(client, NAME, CHALLENGER, version, ws=path, by="gate",
                             expected=None, reason="latest", journal=journal)
        # A person makes the new version champion before the run ends.
        move_alias(client, NAME, CHAMPION, version, by="cli", expected="1", reason="a person")
        raise KeyboardInterrupt
    assert aliases(client, NAME) == {CHAMPION: version}  # challenger removed, champion stays
    assert version in {str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")}


# --- serialization: real processes -------------------------------------------------------------


def test_writers_with_the_same_expected_serialize_through_the_workspace_lock(tmp_path):
    ws = tmp_path / "ws"
    client = registry_workspace(ws)
    register(client, 5)
    move_alias(client, NAME, CHAMPION, "1", by="cli", expected=None, reason="first")
    uri = tracking_uri(parse_params({}).registry, ws)
    writers.race(client, uri, ws, NAME, n=4, log_dir=tmp_path)
    assert (ws / promotion.LOCK_FILE).is_file()


def test_promote_waits_for_the_registry_lock_held_by_another_process(tmp_path):
    """`ratchet promote` while another process holds the registry lock (a gate mid-move): it
    waits, and when the holder moved `champion` meanwhile it overwrites nothing and says so."""
    ws = tmp_path / "ws"
    client = registry_workspace(ws)
    register(client, 3)
    move_alias(client, NAME, CHAMPION, "1", by="cli", expected=None, reason="first")
    lock = ws / promotion.LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys\nfh = open(sys.argv[1], 'a+')\n"
         "fcntl.flock(fh, fcntl.LOCK_EX)\nfh.write('the gate of run 7'); fh.flush()\n"
         "print('held', flush=True)\nsys.stdin.readline()", str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    promote = None
    try:
        assert holder.stdout.readline().strip() == "held"
        promote = subprocess.Popen(
            [sys.executable, "-c", "from ratchet.cli import app; app()", "promote", "2",
             "--reason", "a person", "-w", str(ws)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "COLUMNS": "200"})
        said = [promote.stderr.readline()]  # a warning first: version 2 has no decision
        while said[-1] and "waiting" not in said[-1]:
            said.append(promote.stderr.readline())
        assert "waiting for the registry lock held by the gate of run 7" in said[-1], said
        assert promote.poll() is None and aliases(client, NAME) == {CHAMPION: "1"}
        # The holder promotes 3 (as a gate would, under the lock), then releases it.
        move_alias(client, NAME, CHAMPION, "3", by="gate", expected="1", reason="gate")
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(10)
        out, err = promote.communicate(timeout=60)
    finally:
        for proc in (holder, promote):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert promote.returncode == 1, (out, err)
    assert "error:" in err and "expected version 1, it is now 3" in " ".join(err.split())
    assert aliases(client, NAME) == {CHAMPION: "3"}
    assert [m[2] for m in moves(client)] == ["1", "3"]


def test_a_lock_held_too_long_is_one_clear_error(tmp_path):
    ws = tmp_path / "ws"
    client = registry_workspace(ws)
    register(client, 2)
    with promotion.registry_lock(client, NAME, ws):
        code = ("import sys; from pathlib import Path; from mlflow import MlflowClient\n"
                "from ratchet import promotion\nc = MlflowClient(sys.argv[1], sys.argv[1])\n"
                "with promotion.registry_lock(c, sys.argv[2], Path(sys.argv[3]), timeout=0.3):"
                "\n    pass")
        proc = subprocess.run([sys.executable, "-c", code, client.tracking_uri, NAME, str(ws)],
                              capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "RegistryBusy" in proc.stderr
    assert "another promotion is under way; try again" in proc.stderr
    with promotion.registry_lock(client, NAME, ws, timeout=1):  # released with the block
        pass


# --- the lease, on a real store (the same code a tracking server runs) ---------------------------


def test_a_lease_read_without_its_tags_is_not_taken_for_expired(tmp_path):
    """A read of the lease that catches no tags (on a server, a read between a rename and its
    tags, as a busy PostgreSQL-backed race showed) must not count as an expired lease: that
    broke a live lease and left a `.stale.untagged` grave behind. Without an expiry tag, the
    lease expires a TTL after it was last updated."""
    client = fresh_store(tmp_path)
    holder = f"{NAME}{promotion.LEASE_SUFFIX}"
    client.create_registered_model(holder)  # a lease as such a read shows it: no tags at all
    with pytest.raises(RegistryBusy):
        Lease(client, NAME, ttl=60).acquire(timeout=0.5, on_wait=None)
    assert {m.name for m in client.search_registered_models()} == {holder}
    # Untouched for longer than the TTL: a dead holder's, broken as any expired lease.
    late = Lease(client, NAME, ttl=0.2)
    time.sleep(0.5)
    late.acquire(timeout=2, on_wait=None)
    late.verify()


def test_one_lease_at_a_time_and_a_stale_one_is_broken_once(tmp_path):
    client = fresh_store(tmp_path)
    first = Lease(client, NAME)
    first.acquire(timeout=1, on_wait=None)
    said: list[str] = []
    with pytest.raises(RegistryBusy, match="held by .* pid"):
        Lease(client, NAME).acquire(timeout=0.3, on_wait=said.append)
    assert said and "waiting for the registry lease" in said[0]

    # The holder dies (never releases): once its lease expires, the next writer breaks it.
    client.set_registered_model_tag(first.name, promotion.EXPIRES, f"{time.time() - 1:.3f}")
    second = Lease(client, NAME)
    second.acquire(timeout=2, on_wait=None)
    second.verify()
    with pytest.raises(LeaseLost, match="no longer this writer's"):
        first.verify()  # the dead holder, had it only been slow, moves nothing more
    first.release()  # ... and its release leaves the new holder's lease alone
    second.verify()
    # A second writer that saw the same stale lease cannot rename the live one away.
    first._break(first.token)
    second.verify()
    second.release()
    left = {m.name for m in client.search_registered_models()}
    assert left == {f"{NAME}.lease.stale.{first.token}"}  # kept a while, to block such breaks
