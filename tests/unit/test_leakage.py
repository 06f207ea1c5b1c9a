"""No leakage: one text is one text whatever its punctuation, a group stays in one split, augmented
rows never reproduce a val/test text, and the split scheme cannot change under a champion.

The overlap checks use their own definition of "the same text" (`same_text` below: Unicode NFKC,
case, whitespace and punctuation ignored), not the code's, so that they judge it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from ratchet.config import PrepareConfig, parse_params
from ratchet.data import BATCH, LABEL, TEXT
from tasks.prepare import prepare_frame

CLINC = Path(__file__).resolve().parents[3] / "shared" / "data" / "clinc150"
SPLITS = ("train", "val", "test")


def same_text(text: str) -> str:
    """The test's own oracle of text identity."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = "".join(c for c in t if not unicodedata.category(c).startswith("P"))
    return re.sub(r"\s+", " ", t).strip()


def frame(texts: list[str], labels: list[str] | None = None, orders: list[int] | None = None,
          groups: list[str | None] | None = None) -> pd.DataFrame:
    orders = orders or [0] * len(texts)
    df = pd.DataFrame({TEXT: texts, LABEL: labels or ["x"] * len(texts),
                       BATCH: [f"b{o}" for o in orders], "batch_order": orders})
    if groups is not None:
        df["group"] = pd.Series(groups, dtype="string")
    return df


def overlap(a: pd.Series, b: pd.Series) -> set[str]:
    return set(a.map(same_text)) & set(b.map(same_text))


# --- the split key ------------------------------------------------------------------------------

def test_punctuation_variants_are_one_text_in_one_split():
    pairs = [(f"what's my balance number {i}?", f"Whats my  balance number {i}")
             for i in range(300)]
    pairs += [("can i get my w-2 online", "can i get my w2 online"), ("farewell!", "farewell"),
              ("ﬂip a coin, i choose heads", "flip a coin i choose heads")]
    texts = [t for pair in pairs for t in pair]
    out, stats = prepare_frame(frame(texts), PrepareConfig())
    assert len(out) == len(pairs)  # one row per text: the variants are duplicates
    assert stats["normalised_duplicates"] == len(pairs)
    # And the key is what decides the split: each variant alone lands where the pair landed.
    for a, b in pairs[:50]:
        alone_a, _ = prepare_frame(frame([a]), PrepareConfig())
        alone_b, _ = prepare_frame(frame([b]), PrepareConfig())
        assert alone_a["split"].item() == alone_b["split"].item(), (a, b)


def test_a_text_of_punctuation_only_is_still_itself():
    out, _ = prepare_frame(frame(["???", "!!!", "ok"]), PrepareConfig())
    assert len(out) == 3


# --- groups -------------------------------------------------------------------------------------

def _grouped(n_groups: int, per_group: int, order: int = 0, prefix: str = "g"
             ) -> pd.DataFrame:
    texts = [f"turn {j} of conversation {prefix}{i}" for i in range(n_groups)
             for j in range(per_group)]
    groups = [f"{prefix}{i}" for i in range(n_groups) for _ in range(per_group)]
    return frame(texts, orders=[order] * len(texts), groups=groups)


def test_every_row_of_a_group_is_in_one_split():
    out, _ = prepare_frame(_grouped(80, 6), PrepareConfig())
    per_group = out.groupby("group")["split"].nunique()
    assert (per_group == 1).all(), per_group[per_group > 1]
    # Groups, not rows, are what the hash spreads over the splits.
    assert set(out.groupby("group")["split"].first()) == set(SPLITS)


def test_groups_that_share_a_text_share_a_split_and_the_older_group_stays_put():
    """Group `a` (batch 0) and group `b` (batch 1) both hold one text: they are one unit, whose
    split is the older group's, so the rows that were there before do not move."""
    cfg = PrepareConfig()
    old = _grouped(60, 4, order=0, prefix="a")
    first, _ = prepare_frame(old, cfg)
    where = dict(zip(first["group"], first["split"], strict=False))
    # For each old group, a new group whose own hash would put it elsewhere, sharing one text.
    new_parts = []
    for i, g in enumerate(sorted(where)):
        texts = [f"fresh line {k} of talk b{i}" for k in range(3)]
        shared = first.loc[first["group"] == g, TEXT].iloc[0].upper() + "!"
        new_parts.append(frame([*texts, shared], orders=[1] * 4, groups=[f"b{i}"] * 4))
    later, _ = prepare_frame(pd.concat([old, *new_parts], ignore_index=True), cfg)
    for i, g in enumerate(sorted(where)):
        both = later[later["group"].isin([g, f"b{i}"])]
        assert both["split"].nunique() == 1 and both["split"].iloc[0] == where[g]
    for split in SPLITS:
        assert not overlap(later.loc[later.split == split, TEXT],
                           later.loc[later.split != split, TEXT])


def test_rows_without_a_group_hash_by_text_beside_grouped_ones():
    rows = pd.concat([_grouped(30, 5), frame([f"loose text {i}" for i in range(200)])],
                     ignore_index=True)
    out, _ = prepare_frame(rows, PrepareConfig())
    loose = out[out["group"].isna()]
    assert len(loose) == 200 and set(loose["split"]) == set(SPLITS)
    assert (out.dropna(subset=["group"]).groupby("group")["split"].nunique() == 1).all()


def test_ingest_maps_a_group_column_and_prepare_keeps_it(tmp_path):
    from ratchet.cli import app
    from tasks import prepare

    runner = CliRunner()
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(ws), "--model", "tiny"]).exit_code == 0
    src = tmp_path / "talks.csv"
    pd.DataFrame({
        "text": [f"message {j} in chat {i}" for i in range(10) for j in range(4)],
        "label": ["pay_bill", "check_balance"] * 20,
        "conversation": [f"chat-{i}" for i in range(10) for _ in range(4)],
    }).to_csv(src, index=False)
    missing = runner.invoke(app, ["ingest", str(src), "-w", str(ws), "--group-col", "thread"])
    assert missing.exit_code == 1 and "--group-col" in missing.output, missing.output
    done = runner.invoke(app, ["ingest", str(src), "-w", str(ws), "--group-col", "conversation"])
    assert done.exit_code == 0, done.output
    assert "unused columns" not in done.output
    batch = next((ws / "data" / "batches").glob("*.parquet"))
    stored = pd.read_parquet(batch)
    assert list(stored.columns) == ["text", "label", "group"]
    assert stored["group"].nunique() == 10
    params = parse_params(yaml.safe_load((ws / "params.yaml").read_text()))
    prepare.run(params, batches=ws / "data" / "batches", out=tmp_path / "prepared",
                replay=tmp_path / "replay.parquet", metrics=tmp_path / "prepare.json")
    parts = pd.concat([pd.read_parquet(tmp_path / "prepared" / f"{s}.parquet").assign(split=s)
                       for s in SPLITS])
    assert len(parts) == 40 and (parts.groupby("group")["split"].nunique() == 1).all()


# --- augmentation -------------------------------------------------------------------------------

def test_augmented_rows_that_reproduce_a_val_or_test_text_are_dropped_and_counted(tmp_path):
    """Every one-swap and one-deletion variant of the training texts is a val or test text
    (some in another case or with punctuation): none of them may enter training."""
    from tasks import augment

    train = pd.DataFrame({TEXT: ["book cheap flights", "play loud music"],
                          LABEL: ["travel", "music"], "split": "train"})
    held = []
    for text in train[TEXT]:
        a, b, c = text.split()
        held += [f"{b} {a} {c}", f"{c} {b} {a}", f"{a} {c} {b}", f"{b} {c}", f"{a} {c}",
                 f"{a} {b}"]
    held = [h.upper() + "?" if i % 3 == 0 else h for i, h in enumerate(held)]
    paths = {s: tmp_path / f"{s}.parquet" for s in SPLITS}
    train.drop(columns="split").to_parquet(paths["train"])
    pd.DataFrame({TEXT: held[::2], LABEL: "x"}).to_parquet(paths["val"])
    pd.DataFrame({TEXT: held[1::2], LABEL: "x"}).to_parquet(paths["test"])
    raw = {"augment": {"ops": ["swap", "delete"], "copies": 4, "balance": False}}
    params = parse_params(raw)
    stats = augment.run(params, train=paths["train"], val=paths["val"], test=paths["test"],
                        pretrained=tmp_path / "none", pretrain_metrics=tmp_path / "none.json",
                        out=tmp_path / "aug.parquet", metrics=tmp_path / "augment.json")
    out = pd.read_parquet(tmp_path / "aug.parquet")
    assert len(out) == 2 and out["augmented_from"].isna().all()  # every copy leaked
    written = json.loads((tmp_path / "augment.json").read_text())
    assert written == stats
    assert stats["leak/dropped"] > 0 and stats["rows_augmented"] == 0
    # Without held-out rows to meet, the same draws are kept: the count is of leaks only.
    kept = augment.augment_frame(train.drop(columns="split"), params.augment)
    assert len(kept) - 2 == stats["leak/dropped"]


def test_augment_is_given_val_and_test_in_the_pipeline():
    from ratchet.workspace import template

    stage = yaml.safe_load(template("dvc.yaml").read_text())["stages"]["augment"]
    for split in ("val", "test"):
        path = f"data/prepared/{split}.parquet"
        assert path in stage["deps"] and f"--{split} {path}" in stage["cmd"]


# --- CLINC150 end to end: prepare, then augment, through the stages' own code -------------------

@pytest.mark.skipif(not CLINC.is_dir(), reason="shared CLINC150 data not present")
def test_clinc150_has_no_normalised_overlap_after_prepare_and_augment(tmp_path):
    from ratchet.models import source_dir
    from tasks import augment, prepare

    batches = tmp_path / "batches"
    batches.mkdir()
    # Two batches as they would arrive: the published train file, then val and test.
    first = pd.read_csv(CLINC / "train.csv", dtype=str, keep_default_na=False)
    second = pd.concat([pd.read_csv(CLINC / f"{s}.csv", dtype=str, keep_default_na=False)
                        for s in ("val", "test")], ignore_index=True)
    first.to_parquet(batches / "0001-aaaaaaaaaaaa.parquet")
    second.to_parquet(batches / "0002-bbbbbbbbbbbb.parquet")
    params = parse_params({"augment": {"ops": ["synonym", "insert", "swap", "delete"]}})
    prepared = tmp_path / "prepared"
    prepare.run(params, batches=batches, out=prepared, replay=tmp_path / "replay.parquet",
                metrics=tmp_path / "prepare.json")
    parts = {s: pd.read_parquet(prepared / f"{s}.parquet") for s in SPLITS}
    held = pd.concat([parts["val"][TEXT], parts["test"][TEXT]])
    assert not overlap(parts["train"][TEXT], held)
    assert not overlap(parts["val"][TEXT], parts["test"][TEXT])
    stats = augment.run(params, train=prepared / "train.parquet", val=prepared / "val.parquet",
                        test=prepared / "test.parquet", pretrained=source_dir("minilm-l6"),
                        pretrain_metrics=tmp_path / "none.json", out=tmp_path / "aug.parquet",
                        metrics=tmp_path / "augment.json")
    aug = pd.read_parquet(tmp_path / "aug.parquet")
    assert stats["rows_augmented"] > 1000
    assert not overlap(aug[TEXT], held)
    print(f"clinc150: {stats['leak/dropped']} augmented rows dropped as val/test texts")


# --- the split scheme under a champion ----------------------------------------------------------

def _flat(params) -> dict[str, str]:
    """The params as the gate logs them with a version's run."""
    return {f"{k}.{kk}": str(vv)[:500] for k, v in params.model_dump(by_alias=True).items()
            for kk, vv in v.items()}


def _edit(ws: Path, section: str, **values) -> None:
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_prepare_refuses_a_new_salt_under_the_champion_and_writes_nothing(tmp_path):
    """The quick variant of the workspace test below: the stage itself, no DVC."""
    from ratchet.demo_data import demo_batches
    from ratchet.errors import ConfigError
    from ratchet.runtime import write_json
    from tasks import prepare

    batches = tmp_path / "batches"
    batches.mkdir()
    demo_batches(scale=0.1)[0].frame.to_parquet(batches / "0001-aaaaaaaaaaaa.parquet")
    champion = tmp_path / "champion.json"
    name = parse_params({}).registry.model_name
    write_json(champion, {"name": name, "version": "4", "fingerprint": "f",
                          "split_scheme": {"key": 2, "salt": "ratchet"}})
    paths = {"batches": batches, "out": tmp_path / "prepared", "champion": champion,
             "replay": tmp_path / "replay.parquet", "metrics": tmp_path / "prepare.json"}
    with pytest.raises(ConfigError, match=f"champion {name} version 4"):
        prepare.run(parse_params({"prepare": {"salt": "new"}}), **paths)
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepare.json").exists()
    prepare.run(parse_params({}), **paths)
    assert (tmp_path / "prepared" / "test.parquet").is_file()
    # A new model name is a fresh baseline: nothing of the old champion to hold.
    prepare.run(parse_params({"prepare": {"salt": "new"},
                              "registry": {"model_name": "fresh"}}), **paths)


@pytest.mark.slow
def test_changing_the_split_scheme_under_a_champion_is_refused(tmp_path):
    """A real workspace: prepare runs, a tiny model becomes champion, then `prepare.salt`
    changes: `dvc repro` refuses and the splits stay as they were; with a new model name (a
    fresh baseline, no champion) the new splits are made."""
    from ratchet import workspace
    from ratchet.demo_data import demo_batches
    from ratchet.errors import WorkspaceError
    from ratchet.registry import CHAMPION, connect, log_candidate, move_alias
    from tests.conftest import save_tiny_classifier

    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"},
                                          "noise": {"cold_start": "skip"}})
    src = tmp_path / "batch.csv"
    demo_batches(scale=0.2)[0].frame.to_csv(src, index=False)
    workspace.ingest(ws, src)
    workspace.dvc(ws, "repro", "prepare")
    train = ws / "data" / "prepared" / "train.parquet"
    before = train.read_bytes()

    params = parse_params(yaml.safe_load((ws / "params.yaml").read_text()))
    model = save_tiny_classifier(tmp_path / "model", sorted(demo_batches(scale=0.2)[0].frame
                                                             [LABEL].unique()))
    del model
    name = params.registry.model_name
    client = connect(params.registry, ws)
    _, version = log_candidate(tmp_path / "model", name=name, params=_flat(params), metrics={},
                               artifacts=[], run_tags={})
    move_alias(client, name, CHAMPION, version, by="cli", reason="test", expected=None)
    workspace.refresh_champion(ws)

    # Only prepare from here (`--single-item`): the stages before it have nothing to add.
    _edit(ws, "prepare", salt="another salt")
    with pytest.raises(WorkspaceError) as refused:
        workspace.dvc(ws, "repro", "--single-item", "prepare")
    message = str(refused.value)
    assert "prepare.salt `ratchet` -> `another salt`" in message, message
    assert "registry.model_name" in message and f"version {version}" in message, message
    # DVC clears a stage's outputs before running it: none were written in their place.
    assert not train.exists() or train.read_bytes() == before

    _edit(ws, "prepare", salt="ratchet")  # set back: the same splits, nothing to refuse
    workspace.dvc(ws, "repro", "--single-item", "prepare")
    assert train.read_bytes() == before

    _edit(ws, "prepare", salt="another salt")
    _edit(ws, "registry", model_name="fresh-baseline")
    workspace.refresh_champion(ws)
    assert json.loads((ws / "champion.json").read_text())["version"] is None
    workspace.dvc(ws, "repro", "--single-item", "prepare")
    assert train.read_bytes() != before


def test_the_scheme_check_names_what_changed_and_how_to_start_afresh():
    from ratchet.errors import ConfigError
    from tasks.prepare import check_split_scheme

    held = {"name": "m", "version": "3", "split_scheme": {"key": 2, "salt": "a"}}
    check_split_scheme(held, "m", PrepareConfig(salt="a"))
    check_split_scheme({"name": None, "version": None}, "m", PrepareConfig(salt="b"))
    check_split_scheme(held, "another-model", PrepareConfig(salt="b"))  # a fresh baseline
    check_split_scheme({**held, "split_scheme": None}, "m", PrepareConfig(salt="b"))  # unknown
    with pytest.raises(ConfigError, match=r"prepare\.salt `a` -> `b`") as err:
        check_split_scheme(held, "m", PrepareConfig(salt="b"))
    assert "\n" not in str(err.value)
    # A version registered before split keys existed was split by the old key (punctuation kept).
    legacy = {**held, "split_scheme": {"key": 1, "salt": "a"}}
    with pytest.raises(ConfigError, match=r"prepare\.split_key: 1"):
        check_split_scheme(legacy, "m", PrepareConfig(salt="a"))
    check_split_scheme(legacy, "m", PrepareConfig(salt="a", split_key=1))


def test_a_versions_split_scheme_from_its_tag_or_its_logged_params(tmp_path):
    from ratchet.config import Params
    from ratchet.registry import SPLIT_SCHEME_TAG, split_scheme
    from tests.unit.test_history import NAME, fresh_store, register

    client = fresh_store(tmp_path)
    legacy, bare, tagged = register(client, 3)
    old = _flat(Params())
    del old["prepare.split_key"]  # what the gate logged before the key had a version
    for key, value in old.items():
        client.log_param(client.get_model_version(NAME, legacy).run_id, key, value)
    assert split_scheme(client, NAME, legacy) == {"key": 1, "salt": "ratchet"}
    assert split_scheme(client, NAME, bare) is None  # nothing recorded: nothing to hold
    client.set_model_version_tag(NAME, tagged, SPLIT_SCHEME_TAG,
                                 json.dumps({"key": 2, "salt": "s"}))
    assert split_scheme(client, NAME, tagged) == {"key": 2, "salt": "s"}
    assert split_scheme(client, NAME, "99") is None
