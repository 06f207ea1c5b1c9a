"""The bad-input corpus: malformed and hostile batch files, each made to trip one thing.

Text files are committed beside this script (run it to rewrite them: `python
tests/data/bad_inputs/make_corpus.py`). Binary ones (wrong encodings, garbage, parquet, a 1 MB
text) and filesystem oddities (a directory, a symlink loop) are made at test time by
`write_generated` into a temporary folder, so the repository holds no opaque blobs.

Every accepted file uses texts no other file uses (a per-file word), so that what each file
triggers does not depend on which files were ingested before it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
LABELS = ["check_balance", "pay_bill", "transfer_money"]
_STEMS = {
    "check_balance": ["what is my {w} balance", "show the {w} account balance",
                      "how much is left in {w}", "tell me the {w} balance"],
    "pay_bill": ["pay the {w} bill", "settle my {w} invoice", "pay {w} electricity now",
                 "schedule the {w} bill payment"],
    "transfer_money": ["send money to {w}", "transfer funds to {w} today",
                       "move cash over to {w}", "wire the rent to {w}"],
}


def rows(word: str, n_per_label: int = 4) -> list[dict[str, str]]:
    """Balanced, clean rows whose texts carry `word`, so no two files share a text."""
    out = []
    for i in range(n_per_label):
        for label in LABELS:
            out.append({"text": _STEMS[label][i % 4].format(w=f"{word}{i // 4 or ''}"),
                        "label": label})
    return out


def _csv(records: list[dict[str, object]], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def _jsonl(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def committed() -> dict[str, str]:
    """file name -> content of every text-format case kept in the repository."""
    files: dict[str, str] = {}
    files["baseline.csv"] = _csv(rows("alpha"))
    files["empty.csv"] = ""
    files["header_only.csv"] = "text,label\n"
    files["too_few_rows.csv"] = _csv(rows("beta")[:5])
    files["missing_label_column.csv"] = _csv([{"text": r["text"]} for r in rows("gamma")])
    files["renamed_columns.csv"] = _csv(
        [{"utterance": r["text"], "intent": r["label"]} for r in rows("delta")])
    nulls = rows("epsilon")
    nulls[2]["text"] = ""
    nulls[7]["text"] = ""
    files["null_texts.csv"] = _csv(nulls)
    blank = rows("zeta")
    blank[4]["text"] = "   \t "
    files["blank_texts.csv"] = _csv(blank)
    null_labels: list[dict[str, object]] = list(rows("eta"))
    null_labels[3] = {"text": null_labels[3]["text"], "label": None}
    files["null_labels.jsonl"] = _jsonl(null_labels)
    files["numeric_labels.csv"] = _csv(
        [{"text": r["text"], "label": str(LABELS.index(r["label"]))} for r in rows("theta")])
    files["numeric_labels.jsonl"] = _jsonl(
        [{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows("iota")])
    typo = rows("kappa")
    typo[1]["label"] = "pay_bil"
    files["label_typo.csv"] = _csv(typo)
    unknown = rows("lambda")
    unknown[5]["label"] = "weather_forecast"
    files["unknown_label.csv"] = _csv(unknown)
    control = rows("mu")
    control[0]["text"] = "pay the bill\x1b[31m now"
    control[6]["text"] = "ring the bell\x07 twice"
    files["control_chars.csv"] = _csv(control)
    broken = _jsonl(rows("nu")).splitlines(keepends=True)
    broken[2] = '{"text": "pay the nu bill", "label": "pay_bill"\n'  # missing brace
    files["broken_line.jsonl"] = "".join(broken)
    listed = _jsonl(rows("xi")).splitlines(keepends=True)
    listed[4] = '["pay the xi bill", "pay_bill"]\n'
    files["array_line.jsonl"] = "".join(listed)
    mixed: list[dict[str, object]] = list(rows("omicron"))
    mixed[1] = {"text": 12345, "label": mixed[1]["label"]}
    mixed[4] = {"text": ["a", "list"], "label": mixed[4]["label"]}
    mixed[8] = {"text": {"nested": "object"}, "label": mixed[8]["label"]}
    files["mixed_types.jsonl"] = _jsonl(mixed)
    ragged = _csv(rows("pi")).splitlines(keepends=True)
    ragged[3] = ragged[3].rstrip("\n") + ",surplus\n"
    files["ragged.csv"] = "".join(ragged)
    files["unsupported.xlsx"] = "text,label\nnot really a spreadsheet,pay_bill\n"
    files["bad_timestamps.csv"] = _csv(
        [{**r, "when": "2026-11-20T10:00:00Z" if i % 3 else "yesterday-ish"}
         for i, r in enumerate(rows("rho"))])
    files["no_domain.csv"] = _csv(rows("sigma"))
    pii_reject = rows("tau")
    pii_reject[0]["text"] = "email me at jane.doe@example.com about the tau balance"
    files["pii_for_reject.csv"] = _csv(pii_reject)

    # Accepted, each with its own warnings (or none).
    embedded = rows("upsilon")
    embedded[0]["text"] = 'pay the "upsilon" bill,\nthen the second line'
    embedded[1]["text"] = 'she said "hi", then\nsent money, twice'
    files["embedded_newlines.csv"] = _csv(embedded)
    files["extra_columns.csv"] = _csv(
        [{**r, "notes": "n/a", "agent": "bob"} for r in rows("phi")])
    files["renamed_mapped.csv"] = _csv(
        [{"utterance": r["text"], "intent": r["label"]} for r in rows("chi")])
    dup = rows("psi")
    dup[3]["text"] = dup[0]["text"].upper()  # same text after normalising case
    dup[3]["label"] = dup[0]["label"]
    files["duplicate_rows.csv"] = _csv(dup)
    conflict = rows("omega")
    conflict[1]["text"] = conflict[0]["text"]  # the same text, another label
    files["conflicting_labels.csv"] = _csv(conflict)
    skew = [r for r in rows("aleph", 12) if r["label"] != "transfer_money"]
    skew.append({"text": "send money to aleph", "label": "transfer_money"})
    files["imbalanced.csv"] = _csv(skew)
    short = rows("beth")
    short[2]["text"] = "ok"
    files["short_texts.csv"] = _csv(short)
    files["history_repeat.csv"] = _csv(rows("alpha")[:4] + rows("gimel")[4:])
    pii = rows("daleth")
    pii[0]["text"] = "my email is sam@example.org pay the daleth bill"
    pii[1]["text"] = "call me on +44 20 7946 0958 about the daleth balance"
    pii[2]["text"] = "charge card 4111 1111 1111 1111 for daleth"
    files["pii.csv"] = _csv(pii)
    allowed = rows("zayin")
    allowed[0]["text"] = "write to kim@example.net about the zayin balance"
    files["pii_for_allow.jsonl"] = _jsonl(allowed)
    new_label = rows("teth")
    new_label[0]["label"] = "close_account"
    files["new_label.csv"] = _csv(new_label)
    files["dry_run.csv"] = _csv(rows("resh"))
    files["same_batch.csv"] = _csv(rows("he"))
    files["same_batch.jsonl"] = _jsonl(rows("he"))  # another format, the same content
    files["with_ids.csv"] = _csv(
        [{"ref": f"T-{i}", "sent": f"2026-11-2{i % 9}T10:00:00Z", "body": r["text"],
          "intent": r["label"]} for i, r in enumerate(rows("waw"))])
    return files


def _parquet(df: pd.DataFrame, path: Path) -> None:
    df.to_parquet(path, index=False)


def write_generated(out: Path) -> None:
    """Binary and filesystem cases, made fresh in a temporary folder."""
    out.mkdir(parents=True, exist_ok=True)
    latin = _csv(rows("cafe")).replace("pay the cafe bill", "pay the café bill")
    (out / "latin1.csv").write_bytes(latin.encode("latin-1"))
    (out / "utf16.csv").write_bytes(_csv(rows("koppa")).encode("utf-16"))
    (out / "utf8_bom.csv").write_bytes(b"\xef\xbb\xbf" + _csv(rows("sampi")).encode())
    rng = random.Random(7)
    (out / "binary_garbage.csv").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    (out / "garbage.parquet").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    huge = rows("digamma")
    huge[0]["text"] = "word " * 200_000 + "end"  # ~1 MB in one cell
    (out / "huge_text.csv").write_text(_csv(huge))
    budget = rows("stigma")
    budget[0]["text"] = " ".join(f"x{i}" for i in range(400))  # < max_chars, > 512 tokens
    (out / "token_budget.csv").write_text(_csv(budget))
    typed = pd.DataFrame(rows("san"))
    typed["text"] = range(len(typed))
    typed["label"] = typed["label"].map(LABELS.index).astype(float)
    _parquet(typed, out / "wrong_dtypes.parquet")
    _parquet(pd.DataFrame(rows("qoph")), out / "good.parquet")
    (out / "directory.csv").mkdir(exist_ok=True)
    loop_a, loop_b = out / "loop_a.csv", out / "loop_b.csv"
    for link, target in ((loop_a, loop_b), (loop_b, loop_a)):
        if not link.is_symlink():
            os.symlink(target, link)


def main() -> None:
    for name, content in committed().items():
        (HERE / name).write_text(content)


if __name__ == "__main__":
    main()
