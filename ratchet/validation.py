"""The batch data contract as a great-expectations suite, with critical and warning severities.

GX is the engine for every check. Checks that need more than one row or outside state (token
counts, duplicates against history, conflicting labels, class balance, PII) are computed here in
pandas as `_`-prefixed columns, and a GX expectation on that column decides; so every check is
reported, counted and rendered in Data Docs the same way.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ratchet.config import DataConfig, ValidateConfig
from ratchet.data import DOMAIN, GROUP, ID, LABEL, TEXT, TIMESTAMP, normalise
from ratchet.models import MINILM

CRITICAL, WARNING = "critical", "warning"
# C0 controls except tab, newline and carriage return; DEL; C1 controls (often cp1252 mojibake).
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
# Special tokens a tokenizer adds to one sequence, at most; with one token per UTF-8 byte at
# most (true of WordPiece, byte-level BPE and SentencePiece), this bounds the count untokenized.
_SPECIAL_TOKENS = 4


@dataclass(frozen=True)
class Problem:
    expectation: str
    severity: str
    message: str
    count: int = 0
    examples: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        ex = f"; e.g. {', '.join(map(str, self.examples))}" if self.examples else ""
        return f"{self.expectation}: {self.message}{ex}"


@dataclass
class ValidationReport:
    source: str
    rows: int
    problems: list[Problem]

    @property
    def critical(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == CRITICAL]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def passed(self) -> bool:
        return not self.critical

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "passed": self.passed,
            "critical": [asdict(p) for p in self.critical],
            "warnings": [asdict(p) for p in self.warnings],
        }

    def to_markdown(self) -> str:
        """The report for a person: verdict, then each problem with its count and examples."""
        verdict = "passed" if self.passed else "REFUSED"
        lines = [f"# Validation of `{self.source}`: {verdict}", "", f"{self.rows} rows.", ""]
        for title, problems in (("Critical", self.critical), ("Warnings", self.warnings)):
            if not problems:
                continue
            lines += [f"## {title}", ""]
            for p in problems:
                lines.append(f"- **{p.expectation}** ({p.count} rows): {p.message}")
                lines += [f"  - {ex}" for ex in p.examples]
            lines.append("")
        return "\n".join(lines)


def _suggest(label: str, known: list[str]) -> str:
    close = difflib.get_close_matches(label, known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _show(value: Any, width: int = 80) -> str:
    """A cell as it may be printed: escaped (control characters visible) and cut to a width."""
    text = repr(str(value))
    if len(text) > width:
        return f"{text[: width - 1]}… ({len(str(value))} chars)"
    return text


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str):
    """The model's tokenizer, loaded once per process and only when a text could be too long."""
    from transformers.utils import logging as hf_logging

    from ratchet.models import load_tokenizer

    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum" is the point
    return load_tokenizer(source)


def token_counts(texts: pd.Series, max_tokens: int, source: str,
                 max_chars: int | None = None) -> pd.Series:
    """Exact token counts for the texts that could exceed the budget; missing for the rest.

    A text of n UTF-8 bytes has at most n + 4 tokens, so short texts never load the tokenizer.
    Texts over `max_chars` are refused by their length already and are not tokenized either.
    """
    counts = pd.Series(pd.NA, index=texts.index, dtype="Int64")
    long = [i for i, t in texts.items()
            if isinstance(t, str) and len(t.encode("utf-8", "replace")) + _SPECIAL_TOKENS
            > max_tokens and (max_chars is None or len(t) <= max_chars)]
    if long:
        tok = _tokenizer(source)
        ids = tok([texts[i] for i in long], add_special_tokens=True)["input_ids"]
        counts.loc[long] = [len(x) for x in ids]
    return counts


def text_labels(df: pd.DataFrame) -> dict[str, set[str]]:
    """Normalised text -> the labels it carries in a frame: the memory of earlier batches."""
    out: dict[str, set[str]] = {}
    if TEXT not in df.columns:
        return out
    labels = df[LABEL] if LABEL in df.columns else pd.Series(pd.NA, index=df.index)
    for text, label in zip(df[TEXT].tolist(), labels.tolist(), strict=True):
        if isinstance(text, str):
            entry = out.setdefault(normalise(text), set())
            if isinstance(label, str):
                entry.add(label)
    return out


def remember(history: dict[str, set[str]], df: pd.DataFrame) -> None:
    """Add a frame's normalised text -> labels to `history`, which later batches are checked
    against (repeats and conflicting labels)."""
    for text, labels in text_labels(df).items():
        history.setdefault(text, set()).update(labels)


def derive(
    df: pd.DataFrame,
    vcfg: ValidateConfig,
    *,
    history: Mapping[str, set[str]] | None = None,
    types: pd.DataFrame | None = None,
    model_source: str = MINILM,
) -> pd.DataFrame:
    """The canonical frame plus the pre-computed `_` columns the suite's expectations check."""
    from ratchet.pii import scan

    out = df.copy()
    if types is not None:
        for col in types.columns:
            out[f"_type_{col}"] = types[col].astype("string").to_numpy()
    if TEXT in out.columns:
        text = out[TEXT]
        out["_norm"] = [normalise(t) if isinstance(t, str) else None for t in text.tolist()]
        out["_tokens"] = token_counts(text, vcfg.max_tokens, model_source, vcfg.max_chars)
        scans = [scan(t) if isinstance(t, str) else None for t in text.tolist()]
        out["_pii"] = [",".join(s.kinds) if s and s.kinds else None for s in scans]
        out["_redacted"] = [s.redacted if s else None for s in scans]
        if history:
            out["_seen_before"] = [isinstance(n, str) and n in history for n in out["_norm"]]
    if TEXT in out.columns and LABEL in out.columns:
        out["_label_conflict"] = _conflicts(out, history or {})
        counts = out[LABEL].value_counts()
        if len(counts) >= 2:
            out["_imbalance"] = (counts.max() / out[LABEL].map(counts)).astype("Float64")
    if TIMESTAMP in out.columns:
        raw = out[TIMESTAMP]
        parsed = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
        out["_bad_timestamp"] = (raw.notna() & parsed.isna()).astype(bool)
    return out


def _conflicts(df: pd.DataFrame, history: Mapping[str, set[str]]) -> list[bool]:
    """Rows whose normalised text carries another label in this batch or an earlier one."""
    within: dict[str, set[str]] = {}
    pairs = list(zip(df["_norm"].tolist(), df[LABEL].tolist(), strict=True))
    for norm, label in pairs:
        if isinstance(norm, str) and isinstance(label, str):
            within.setdefault(norm, set()).add(label)
    flags = []
    for norm, label in pairs:
        if not (isinstance(norm, str) and isinstance(label, str)):
            flags.append(False)
            continue
        labels = within.get(norm, set()) | set(history.get(norm, ()))
        flags.append(bool(labels - {label}))
    return flags


def _meta(severity: str, name: str, what: str = "", show: str = TEXT) -> dict[str, str]:
    return {"severity": severity, "name": name, "what": what, "show": show}


def build_suite(
    frame: pd.DataFrame,
    vcfg: ValidateConfig,
    dcfg: DataConfig,
    known: list[str],
    *,
    name: str = "batch_contract",
    require: Sequence[str] = (),
):
    """The contract for one derived frame: which expectations apply depends on its columns."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    C, W = CRITICAL, WARNING
    cols = set(frame.columns)
    suite = gx.ExpectationSuite(name=name)
    add = suite.add_expectation
    required = [TEXT, LABEL] + ([DOMAIN] if dcfg.require_domain else []) + list(require)
    for col in dict.fromkeys(required):
        add(gxe.ExpectColumnToExist(column=col, meta=_meta(C, f"column `{col}`")))
    add(gxe.ExpectTableRowCountToBeBetween(min_value=vcfg.min_rows, max_value=vcfg.max_rows,
                                           meta=_meta(C, "row count")))
    for col in (TEXT, LABEL, DOMAIN):
        if f"_type_{col}" in cols:
            add(gxe.ExpectColumnValuesToBeInSet(
                column=f"_type_{col}", value_set=["str"],
                meta=_meta(C, f"{col} type", f"have a {col} that is not a string", col)))
    if f"_type_{GROUP}" in cols:
        # An id: text or a whole number. A float or bool would name another group in a file
        # that writes the same id as text ("7.0" is not "7").
        add(gxe.ExpectColumnValuesToBeInSet(
            column=f"_type_{GROUP}", value_set=["str", "int"],
            meta=_meta(C, "group type", "have a group that is neither text nor a whole number",
                       GROUP)))
    if TEXT in cols:
        add(gxe.ExpectColumnValuesToNotBeNull(column=TEXT, meta=_meta(C, "text", "have no text")))
        add(gxe.ExpectColumnValuesToNotMatchRegex(
            column=TEXT, regex=r"^\s*$",
            meta=_meta(C, "text not blank", "are empty or whitespace only")))
        add(gxe.ExpectColumnValueLengthsToBeBetween(
            column=TEXT, min_value=1, max_value=vcfg.max_chars,
            meta=_meta(C, "text length", f"are longer than {vcfg.max_chars} characters "
                       "(validate.max_chars)")))
        add(gxe.ExpectColumnValuesToBeBetween(
            column="_tokens", max_value=vcfg.max_tokens,
            meta=_meta(C, "token budget", f"are longer than {vcfg.max_tokens} tokens of the "
                       "model's tokenizer (validate.max_tokens)")))
        add(gxe.ExpectColumnValuesToNotMatchRegex(
            column=TEXT, regex=CONTROL_CHARS,
            meta=_meta(C, "control characters", "contain control characters")))
        add(gxe.ExpectColumnValuesToBeUnique(
            column="_norm", mostly=1 - vcfg.max_duplicate_frac,
            meta=_meta(W, "duplicate texts", "repeat a text of the same batch (case and spaces "
                       "ignored)")))
        add(gxe.ExpectColumnValueLengthsToBeBetween(
            column=TEXT, min_value=vcfg.min_chars,
            meta=_meta(W, "very short texts", f"are shorter than {vcfg.min_chars} characters "
                       "(validate.min_chars)")))
        pii_severity = C if vcfg.pii == "reject" else W
        action = {"reject": "the policy refuses them (validate.pii: reject)",
                  "redact": "they are replaced by typed placeholders in the stored batch "
                            "(validate.pii: redact)",
                  "allow": "kept as they are (validate.pii: allow)"}[vcfg.pii]
        add(gxe.ExpectColumnValuesToBeNull(
            column="_pii", meta=_meta(pii_severity, "PII", f"contain personal data; {action}",
                                      "_redacted")))
    if "_seen_before" in cols:
        add(gxe.ExpectColumnValuesToBeInSet(
            column="_seen_before", value_set=[False],
            meta=_meta(W, "duplicates of earlier batches", "repeat a text of an earlier batch")))
    if LABEL in cols:
        add(gxe.ExpectColumnValuesToNotBeNull(column=LABEL,
                                              meta=_meta(C, "label", "have no label", LABEL)))
        if known and not vcfg.allow_new_labels:
            add(gxe.ExpectColumnValuesToBeInSet(
                column=LABEL, value_set=known, meta=_meta(C, "label in known set", show=LABEL)))
    if "_label_conflict" in cols:
        add(gxe.ExpectColumnValuesToBeInSet(
            column="_label_conflict", value_set=[False],
            meta=_meta(W, "conflicting labels", "carry a text that has another label in this "
                       "batch or an earlier one")))
    if "_imbalance" in cols:
        add(gxe.ExpectColumnValuesToBeBetween(
            column="_imbalance", max_value=vcfg.max_imbalance,
            meta=_meta(W, "class imbalance", show=LABEL)))
    if DOMAIN in cols and dcfg.require_domain:
        add(gxe.ExpectColumnValuesToNotBeNull(column=DOMAIN,
                                              meta=_meta(C, "domain", "have no domain")))
    if "_bad_timestamp" in cols:
        add(gxe.ExpectColumnValuesToBeInSet(
            column="_bad_timestamp", value_set=[False],
            meta=_meta(C, "timestamp", "have a timestamp that does not parse", TIMESTAMP)))
    if ID in cols:
        add(gxe.ExpectColumnValuesToBeUnique(
            column=ID, meta=_meta(W, "duplicate ids", "repeat an id of the same batch", ID)))
    return suite


# Names a source column commonly has for each role: a suggestion goes by role first, so that
# `body,intent` suggests `--text-col body` (and `intent` for the label), not the name that
# merely looks most like `text`.
ROLE_NAMES = {
    TEXT: ("text", "body", "utterance", "sentence", "message", "content", "query", "review",
           "comment", "description", "question", "title", "subject", "input"),
    LABEL: ("label", "intent", "category", "class", "target", "tag", "topic", "sentiment",
            "y"),
    DOMAIN: ("domain", "source", "channel", "market", "product", "queue"),
}


def _suggest_column(col: str, src: str, columns: Sequence[str]) -> str | None:
    """The column of `columns` most likely meant for role `col`: one with a name of that role,
    else the closest spelling among those that name no other role."""
    lowered = {c.lower().strip(): c for c in columns}
    for name in ROLE_NAMES.get(col, ()):
        if name in lowered:
            return lowered[name]
    others = {n for role, names in ROLE_NAMES.items() if role != col for n in names}
    free = [c for c in columns if c.lower().strip() not in others]
    close = difflib.get_close_matches(src, free, n=1, cutoff=0.5)
    return close[0] if close else None


def _missing_column(col: str, columns: Sequence[str] | None,
                    mapping: Mapping[str, str] | None) -> str:
    src = (mapping or {}).get(col, col)
    looked = f"looked for `{src}`" if src == col else f"looked for `{src}`, mapped to `{col}`"
    msg = f"required column is missing ({looked}"
    if columns is not None:
        have = ", ".join(f"`{c}`" for c in columns) or "none"
        msg += f"; the file has {have}"
        taken = set((mapping or {}).values()) - {src}
        guess = _suggest_column(col, src, [c for c in columns if c not in taken])
        close = [guess] if guess else []
        if close:
            msg += f"; did you mean `{close[0]}`? (--{col}-col {close[0]})"
        elif col in (TEXT, LABEL, DOMAIN, ID, TIMESTAMP, GROUP):
            msg += f"; map one with --{col}-col"
    return msg + ")"


def _message(meta: dict[str, str], etype: str, res: dict[str, Any], frame: pd.DataFrame,
             vcfg: ValidateConfig, known: list[str], columns: Sequence[str] | None,
             mapping: Mapping[str, str] | None, column: str | None) -> str:
    count = res.get("unexpected_count")
    rows = len(frame)
    if etype == "expect_column_to_exist":
        return _missing_column(str(column), columns, mapping)
    if etype == "expect_table_row_count_to_be_between":
        return (f"{res.get('observed_value')} rows is outside the allowed bounds "
                f"[{vcfg.min_rows}, {vcfg.max_rows}] (validate.min_rows, validate.max_rows)")
    if meta.get("name") == "label in known set":
        bad = sorted({str(v) for v in frame.loc[~frame[LABEL].isin(known) & frame[LABEL].notna(),
                                                 LABEL]})
        hints = "; ".join(f"`{b}`{_suggest(b, known)}" for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        return (f"{count} of {rows} rows have a label outside the {len(known)} known labels: "
                f"{hints}{more} (validate.allow_new_labels accepts new ones)")
    if meta.get("name") == "class imbalance":
        counts = frame[LABEL].value_counts()
        small = ", ".join(f"`{k}` {v}" for k, v in counts.sort_values().head(3).items())
        return (f"the largest label `{counts.idxmax()}` has {counts.max()} rows, "
                f"{counts.max() / counts.min():.1f} times the smallest (validate.max_imbalance "
                f"{vcfg.max_imbalance:g}); smallest: {small}")
    if column and column.startswith("_type_"):
        kinds = ", ".join(f"{c['value']}: {c['count']}" for c in
                          res.get("partial_unexpected_counts") or [])
        return f"{count} of {rows} rows {meta['what']} ({kinds})"
    return f"{count} of {rows} rows {meta.get('what') or 'failed'}"


class Validator:
    """One GX context for one or many batches; with `docs`, a Data Docs site of every run.

    The context is ephemeral (nothing written but the docs): the suite is code, built per batch
    from its columns, so there is no GX project folder to keep in sync. With `docs`, pages are
    rendered by `build_docs` (the pages of what was validated since, and the index over every
    result the context holds); `export` and `restore` carry one batch's result, suite and pages
    from one run to the next, so a later site lists a batch without validating it again.
    """

    def __init__(self, vcfg: ValidateConfig, dcfg: DataConfig, *, model_source: str = MINILM,
                 docs: Path | None = None):
        import great_expectations as gx

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        # GX pins this module's logger to INFO at import ("Created temporary directory ...").
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.ERROR)
        self.vcfg, self.dcfg, self.model_source, self.docs = vcfg, dcfg, model_source, docs
        self.ctx = gx.get_context(mode="ephemeral")
        try:
            from great_expectations.data_context.types.base import ProgressBarsConfig

            self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        except Exception:  # cosmetics only: an older or newer GX without this switch validates
            pass
        if docs is not None:
            self.ctx.add_data_docs_site(site_name="ratchet", site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs.resolve())},
            })
        self.source = self.ctx.data_sources.add_pandas("incoming")
        self._runs = 0
        self._pending: list[Any] = []  # result and suite ids whose pages build_docs renders
        self._results: dict[str, Any] = {}  # suite name -> its result's id

    def validate(
        self,
        df: pd.DataFrame,
        known_labels: list[str],
        source: str,
        *,
        history: Mapping[str, set[str]] | None = None,
        types: pd.DataFrame | None = None,
        columns: Sequence[str] | None = None,
        mapping: Mapping[str, str] | None = None,
        require: Sequence[str] = (),
        name: str | None = None,
    ) -> ValidationReport:
        """Run the contract on a canonical frame and return every problem, critical or not.

        Args:
            history: normalised text -> labels of earlier batches (duplicates, conflicts).
            types: value types per row before canonical() (refuses numbers as text).
            columns, mapping: the file's own columns and the column mapping, for hints.
            require: optional columns the user asked for by name.
            name: the suite's name in Data Docs (default: a running number and `source`).
        """
        import great_expectations as gx
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
        )

        frame = derive(df, self.vcfg, history=history, types=types,
                       model_source=self.model_source).reset_index(drop=True)
        self._runs += 1
        name = suite_name(name or f"{self._runs:03d}-{source}")
        suite = self.ctx.suites.add(build_suite(frame, self.vcfg, self.dcfg, known_labels,
                                                name=name, require=require))
        batch_def = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(
            "whole")
        vd = self.ctx.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
        params = {"dataframe": frame.copy()}  # GX may add columns; the caller's frame stays
        store = self.ctx.validation_results_store
        before = set(store.list_keys()) if self.docs is not None else set()
        results = vd.run(batch_parameters=params, result_format="SUMMARY").results
        if self.docs is not None:  # vd.run kept the result in the context's store
            (key,) = set(store.list_keys()) - before
            self._results[name] = key
            self._pending += [key, ExpectationSuiteIdentifier(name=name)]
        problems = [self._problem(r, frame, known_labels, columns, mapping)
                    for r in results if not r.success]
        return ValidationReport(source=source, rows=len(frame), problems=problems)

    def build_docs(self) -> None:
        """Render the pages of what was validated since the last call, and the site's index
        over every result and suite the context holds (validated or restored)."""
        if self.docs is None:
            return
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
        )

        # An empty list would mean "render every page": a name no suite has renders none, and
        # the index is built all the same.
        ids = self._pending or [ExpectationSuiteIdentifier(name="\x00none")]
        self.ctx.build_data_docs(site_names=["ratchet"], resource_identifiers=ids)
        self._pending = []
        try:  # no CDN: the pages read offline
            from ratchet.offline import localize_site

            localize_site(self.docs)
        except (ImportError, OSError) as err:  # the pages stay as GX wrote them: still pages
            print(f"validate: the Data Docs keep their CDN links ({type(err).__name__}: {err})")

    def export(self, name: str) -> dict[str, Any]:
        """What `restore` needs to list the batch validated under suite `name` in a later site:
        its result, its suite and its rendered pages (after `build_docs`), as JSON."""
        assert self.docs is not None
        name = suite_name(name)
        key = self._results[name]
        pages = {}
        for rel in _page_paths(key.to_tuple(), name):
            path = self.docs / rel
            if path.is_file():  # GX logs a page it failed to render and goes on without it
                pages[rel] = path.read_bytes().decode("utf-8", "surrogateescape")
        suite = self.ctx.suites.get(name).to_json_dict()
        result = self.ctx.validation_results_store.get(key).to_json_dict()
        return {"result_key": list(key.to_tuple()), "result": result, "suite": suite,
                "pages": pages}

    def restore(self, record: dict[str, Any]) -> None:
        """Put an exported batch back: its result and suite into the context (so the index
        lists it), its pages into the docs folder as they were rendered."""
        assert self.docs is not None
        from great_expectations.core.expectation_suite import ExpectationSuite
        from great_expectations.data_context.types.resource_identifiers import (
            ValidationResultIdentifier,
        )

        suite = {k: v for k, v in record["suite"].items() if k != "id"}
        self.ctx.suites.add(ExpectationSuite(**suite))
        store = self.ctx.validation_results_store
        key = ValidationResultIdentifier.from_tuple(tuple(record["result_key"]))
        store.set(key, store.deserialize(record["result"]))
        self._results[suite["name"]] = key
        for rel, page in record["pages"].items():
            path = self.docs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(page.encode("utf-8", "surrogateescape"))

    def _problem(self, r: Any, frame: pd.DataFrame, known: list[str],
                 columns: Sequence[str] | None, mapping: Mapping[str, str] | None) -> Problem:
        cfg = r.expectation_config
        meta = cfg.meta or {}
        res = r.result or {}
        column = cfg.kwargs.get("column")
        show = meta.get("show", TEXT)
        examples = []
        for i in (res.get("partial_unexpected_index_list") or [])[:3]:
            value = frame.at[i, show] if show in frame.columns and i in frame.index else None
            examples.append(f"row {int(i) + 1}: {_show(value)}")
        count = res.get("unexpected_count")
        if count is None and cfg.type == "expect_table_row_count_to_be_between":
            count = res.get("observed_value")
        return Problem(
            expectation=meta.get("name", cfg.type),
            severity=meta.get("severity", CRITICAL),
            message=_message(meta, cfg.type, res, frame, self.vcfg, known, columns, mapping,
                             column),
            count=int(count or 0),
            examples=examples,
        )


def suite_name(name: str) -> str:
    """A suite name Data Docs can use as a path (its dots become folders)."""
    return re.sub(r"[^\w.-]+", "_", name)


def _page_paths(result_key: tuple[str, ...], suite: str) -> list[str]:
    """The Data Docs pages of one result and its suite, as GX's site store lays them out."""
    return ["/".join(("validations", *result_key)) + ".html",
            "/".join(("expectations", *suite.split("."))) + ".html"]


def validate_frame(
    df: pd.DataFrame,
    vcfg: ValidateConfig,
    dcfg: DataConfig,
    known_labels: list[str],
    source: str,
    *,
    model_source: str = MINILM,
    **kwargs: Any,
) -> ValidationReport:
    """Run the batch contract once on a frame with canonical columns (see Validator.validate)."""
    return Validator(vcfg, dcfg, model_source=model_source).validate(
        df, known_labels, source, **kwargs)


def redact(df: pd.DataFrame) -> pd.DataFrame:
    """The frame with PII in its texts replaced by typed placeholders (<EMAIL> <PHONE> <CARD>)."""
    from ratchet.pii import scan

    out = df.copy()
    if TEXT in out.columns:
        out[TEXT] = pd.array([scan(t).redacted if isinstance(t, str) else t
                              for t in out[TEXT].tolist()], dtype="string")
    return out
