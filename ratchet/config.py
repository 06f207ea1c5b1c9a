"""Typed, frozen configuration: one model per params.yaml section, read once and validated."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ratchet.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataConfig(_Section):
    labels: list[str] = Field(
        default_factory=list,
        description="The known label set. Empty: the labels of the first batch become the set.",
    )
    require_domain: bool = Field(False, description="Refuse batches without a `domain` column.")


class ModelConfig(_Section):
    source: str = Field(
        "minilm-l6",
        description="`minilm-l6` (packaged MiniLM), `tiny` (random-init BERT for tests) "
        "or a path to a local Hugging Face model directory.",
    )
    max_length: int = Field(64, ge=8, le=512, description="Token budget per text.")
    seed: int = Field(13, description="Seed for model initialisation and training.")


class ValidateConfig(_Section):
    min_rows: int = Field(10, ge=1, description="Fewer rows than this refuses a batch.")
    max_rows: int = Field(1_000_000, ge=1, description="More rows than this refuses a batch.")
    max_chars: int = Field(2000, ge=1, description="A longer text refuses the batch.")
    max_tokens: int = Field(
        512,
        ge=8,
        description="A text with more tokens (the model's tokenizer, special tokens included) "
        "refuses the batch. Distinct from model.max_length, which only truncates in training: "
        "this bounds what no model position table can hold.",
    )
    allow_new_labels: bool = Field(False, description="Accept labels outside the known set.")
    max_duplicate_frac: float = Field(
        0.0, ge=0, le=1, description="Warn when more than this share of texts repeat (0: any)."
    )
    min_chars: int = Field(3, ge=0, description="Warn about texts shorter than this.")
    max_imbalance: float = Field(
        10.0, ge=1, description="Warn when the largest label has more than this many times "
        "the rows of the smallest."
    )
    pii: Literal["redact", "reject", "allow"] = Field(
        "redact",
        description="Emails, phone numbers and card numbers found in texts: redact (typed "
        "placeholders in the stored batch, a warning), reject (the batch is refused) or allow "
        "(a warning).",
    )


class PrepareConfig(_Section):
    val_frac: float = Field(0.15, gt=0, lt=1, description="Share of texts in the val split.")
    test_frac: float = Field(0.2, gt=0, lt=1, description="Share of texts in the test split.")
    salt: str = Field("ratchet", description="Mixed into the split hash; changing it reshuffles "
                      "the splits, so it is refused once a champion exists (see split_key).")
    split_key: Literal[1, 2] = Field(
        2, description="Which texts count as the same for dedup and the split hash: 2 ignores "
        "case, spacing, Unicode width and punctuation; 1 (workspaces made before it) keeps "
        "punctuation. With `salt` it is the split scheme, recorded with every version and held "
        "fixed while a champion exists: a champion trained on rows a new scheme puts in test "
        "would be judged on its own training rows.",
    )
    conflicts: Literal["latest", "majority", "drop"] = Field(
        "latest",
        description="The same (normalised) text with different labels: keep the latest label "
        "(a newer batch corrects an older one), the most frequent label (ties: the latest), "
        "or drop the text.",
    )
    replay_size: int = Field(
        2000, ge=0, description="Rows in the replay buffer (0: none); stratified by label, then "
        "by batch, drawn from the train split.",
    )

    def scheme(self) -> dict[str, int | str]:
        """The split scheme: what fixes every row's split besides its text or group."""
        return {"key": self.split_key, "salt": self.salt}

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> PrepareConfig:
        if self.val_frac + self.test_frac >= 0.9:
            raise ValueError("val_frac + test_frac must leave at least 10% for training")
        return self


class NoiseConfig(_Section):
    margin: float = Field(
        0.1, ge=0, le=1, description="With a champion: a batch is flagged when its estimated "
        "label-issue rate exceeds the champion's own rate on held-out rows by this much ...",
    )
    ratio: float = Field(
        2.0, ge=1, description="... and is more than this many times that rate.",
    )
    max_rate: float = Field(
        0.3, gt=0, le=1, description="Cold start (no champion): flagged above this rate, "
        "estimated from a cross-validated logistic regression on the batch's own embeddings.",
    )
    cold_start: Literal["cross_validated", "skip"] = Field(
        "cross_validated", description="Without a champion: judge each batch by cross-validation "
        "on its own rows, or record it as not judged.",
    )
    min_rows: int = Field(
        30, ge=1, description="A batch with fewer judged rows is never flagged (too few rows "
        "for a per-class estimate).",
    )
    baseline_rows: int = Field(
        1000, ge=10, description="Held-out rows (earlier batches' test split, a seeded sample) "
        "the champion's own rate is measured on.",
    )
    folds: int = Field(5, ge=2, le=20, description="Cross-validation folds at cold start.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    seed: int = Field(0, description="Seed of the baseline sample and the folds.")
    train: Literal["exclude", "keep"] = Field(
        "exclude", description="Suspect rows of a flagged batch nobody reviewed: kept out of "
        "training too (exclude), or trained on where their hash puts them in train (keep). "
        "They are always kept out of val and test.",
    )


class TriggerConfig(_Section):
    mode: Literal["always", "drift", "rows", "drift_or_rows"] = Field(
        "always",
        description="When the flow retrains after the drift stage: `always`; `drift` (only when "
        "drift is significant); `rows` (only when the newest batch has at least min_new_rows "
        "rows); `drift_or_rows` (either). Without a champion it always retrains.",
    )
    min_new_rows: int = Field(
        1000, ge=0, description="Rows of the newest batch (the recent slice) that are enough "
        "to retrain in `rows` / `drift_or_rows` mode.",
    )


class DriftConfig(_Section):
    alpha: float = Field(
        0.01, gt=0, lt=1, description="Family-wise significance level of the drift verdict "
        "(Holm over the label, length, OOV and embedding-MMD tests).",
    )
    permutations: int = Field(
        1000, ge=19, description="Permutations of the MMD test (and Monte Carlo draws of the "
        "label test on sparse tables); the smallest p-value is 1/(permutations+1).",
    )
    max_rows: int = Field(
        1000, ge=10, description="Rows per slice embedded for the MMD test and the domain "
        "classifier (a seeded sample, stable across runs).",
    )
    weight_rows: int = Field(
        5000, ge=10, description="Test rows given importance weights (a seeded sample, stable "
        "across runs; the rest weigh 0 in the drift-weighted slice): drift embeds at most "
        "2 x max_rows + weight_rows rows, however long the history.",
    )
    batch_size: int = Field(64, ge=1, description="Texts per forward pass when embedding.")
    folds: int = Field(5, ge=2, le=20, description="Cross-validation folds of the domain "
                       "classifier (out-of-fold probabilities give the weights).")
    weight_min: float = Field(0.1, gt=0, description="Lower clip of the importance weights.")
    weight_max: float = Field(10.0, gt=0, description="Upper clip of the importance weights.")
    seed: int = Field(0, description="Seed of sampling, permutations and cross-validation.")
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)

    @model_validator(mode="after")
    def _clip_order(self) -> DriftConfig:
        if self.weight_min > self.weight_max:
            raise ValueError("weight_min must not exceed weight_max")
        # Holm's first threshold is alpha / 4 (four voting tests); a permutation p-value is at
        # least 1 / (permutations + 1), so fewer permutations could never signal drift.
        if (self.permutations + 1) * self.alpha < 4:
            raise ValueError(
                f"permutations must be at least {math.ceil(4 / self.alpha) - 1} for alpha "
                f"{self.alpha}: a smaller permutation test can never reach alpha / 4"
            )
        return self


class AugmentConfig(_Section):
    enabled: bool = Field(True, description="Add augmented copies of training rows.")
    ops: list[Literal["synonym", "insert", "swap", "delete", "contextual"]] = Field(
        default_factory=lambda: ["synonym", "insert", "swap", "delete", "contextual"],
        description="Operations drawn at random per copy: synonym (nearest neighbours in the "
        "model's word-embedding table), insert (a neighbour of a word at a random place), swap, "
        "delete, contextual (the pretrained MLM fills a masked word, when it is good enough).",
    )
    copies: int = Field(1, ge=0, le=10, description="Augmented copies per training row.")
    prob: float = Field(0.1, ge=0, le=1, description="Share of a text's words an op changes.")
    balance: bool = Field(
        True, description="Give rows of smaller classes more copies (up to max_copies), "
        "in proportion to how far each class is below the largest.",
    )
    max_copies: int = Field(4, ge=0, le=20, description="Cap on copies per row when balancing.")
    neighbours: int = Field(5, ge=1, le=50, description="Candidates per word for synonym/insert.")
    min_similarity: float = Field(
        0.45, ge=-1, le=1, description="Cosine similarity a neighbour needs to count as a synonym."
    )
    contextual_max_perplexity: float = Field(
        200.0, gt=0, description="Use the pretrained MLM only when its held-out perplexity is "
        "at most this (an untrained MLM head proposes noise).",
    )
    seed: int = Field(7, description="Seed of the augmentation.")

    @model_validator(mode="after")
    def _caps(self) -> AugmentConfig:
        if self.balance and self.max_copies < self.copies:
            raise ValueError("max_copies must be at least copies when balance is on")
        return self


class PretrainConfig(_Section):
    enabled: bool | Literal["auto"] = Field(
        "auto", description="Continue MLM pre-training on the domain's texts. auto: only when "
        "the start model has a trained MLM head (skipped, the base encoder passed on, for a "
        "source without one such as the packaged MiniLM: benchmarks/pretrain.py measured no "
        "gain from training a random head)."
    )
    init: Literal["base", "previous"] = Field(
        "base", description="base: from model.source each run; previous: continue from the last "
        "run's pretrained encoder (where there is one)."
    )
    max_steps: int = Field(
        30, ge=0, description="Steps (optimizer steps) that train the whole model, after the "
        "head's warmup."
    )
    head_warmup_steps: int = Field(
        0, ge=0, description="Steps first that train only the MLM head, the encoder frozen: a "
        "source without an MLM head (the packaged MiniLM) starts from a random one, whose "
        "gradients would otherwise flow into the encoder."
    )
    head_learning_rate: float = Field(
        1e-3, gt=0, description="Peak learning rate of the head's warmup steps."
    )
    max_seconds: float = Field(0.0, ge=0, description="Time budget in seconds (0: none).")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    whole_word_mask: bool = Field(False, description="Mask every piece of a chosen word.")
    eval_every: int = Field(
        0, ge=0, description="Held-out perplexity every this many steps (0: only before/after)."
    )
    patience: int = Field(
        2, ge=0, description="Stop after this many evaluations without a lower perplexity."
    )
    eval_texts: int = Field(512, ge=1, description="Held-out texts for the perplexity.")
    checkpoint_every: int = Field(
        200, ge=0, description="Save a checkpoint every this many steps (0: never); a killed run "
        "resumes from the last one to the same result."
    )


# A full retrain at most every 5 batches: at most a fifth of the batches pay for the whole
# history, and no continual chain grows longer than the 4 steps benchmarks/continual.py measured
# on CLINC150 val, where auto (replay_mix 2) was never behind always-full at any depth (chosen
# on val; test in the README). Longer chains were not measured.
FULL_EVERY = 5


class FinetuneConfig(_Section):
    mode: Literal["full", "lora"] = Field(
        "full", description="full: train every weight; lora: low-rank adapters on attention "
        "(peft), merged into the weights for serving."
    )
    init: Literal["auto", "base", "champion"] = Field(
        "auto", description="auto: continue from the champion with replay for a routine batch; "
        "retrain from base every `full_every` batches, when the label set grew, without a "
        "champion, or on request (`ratchet run --full`). base: always retrain from the "
        "pretrained encoder with a new head. champion: always continue from the champion "
        "(new labels grow its head; base without one). finetune-init.json and the gate record "
        "say which ran and why."
    )
    full_every: int = Field(
        FULL_EVERY, ge=1, description="auto: retrain from base once this many batches arrived "
        "since the newest batch of the last full retrain in the registry (1: every batch)."
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, description="Examples per optimizer step (global).")
    grad_accumulation: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (batch_size is split into them)."
    )
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate (after warmup).")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warmup."
    )
    lora_learning_rate: float = Field(
        5e-3, gt=0, description="Peak learning rate in mode lora (adapters want a larger one). "
        "benchmarks/training.py chooses among 2e-3, 5e-3 and 1e-2 by CLINC150 val macro-F1 "
        "(its `lora.candidates`); the test split chooses nothing."
    )
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank (mode: lora).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (mode: lora).")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    adversarial_epsilon: float = Field(
        0.0, ge=0, description="FGM adversarial training: L2 size of the perturbation of the word "
        "embeddings (0: off)."
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight the loss by inverse class frequency."
    )
    patience: int = Field(
        2, ge=0, description="Stop after this many epochs without a better validation macro-F1 "
        "(0: never stop early). The best epoch is kept either way."
    )
    replay_mix: float = Field(
        2.0, ge=0, description="Continual mode: replay rows per new-batch row mixed into the "
        "training set (capped by the replay buffer). Chosen on CLINC150 val "
        "(benchmarks/continual.py, auto on a 7-batch stream, mean val accuracy over the batches: "
        "0.657 at 2.0 and 0.632 at 1.0 with 2 epochs; 0.746 and 0.699 with 3)."
    )
    deterministic: bool = Field(
        False, description="torch deterministic algorithms (slower; bitwise repeatable on CPU)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Numerics of training (finetune and pretrain) and of the trained "
        "model's predictions (served and gated alike): bf16 autocast with fp32 weights, or fp32. "
        "auto: bf16 where the hardware computes it natively (CPU avx512_bf16/amx_bf16, a GPU with "
        "bf16), else fp32 (fp16 with loss scaling on a GPU without bf16); bf16 on hardware without "
        "it is an error."
    )
    compile: bool = Field(False, description="torch.compile the model (first steps are slower).")
    threads: int = Field(0, ge=0, description="Torch threads (0: the cores this process may use).")


class SweepConfig(_Section):
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="finetune keys -> values to try, every combination, "
        "e.g. {lora_rank: [4, 8], lora_learning_rate: [1.0e-3, 3.0e-3]}; empty: no sweep."
    )
    metric: Literal["best_val_macro_f1"] = Field(
        "best_val_macro_f1", description="What picks the trial that goes to the gate."
    )
    address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786); null: a local cluster."
    )
    workers: int = Field(2, ge=1, le=64, description="Local cluster: worker processes.")

    @model_validator(mode="after")
    def _keys(self) -> SweepConfig:
        unknown = sorted(set(self.grid) - set(FinetuneConfig.model_fields))
        if unknown:
            raise ValueError(f"sweep.grid keys must be finetune keys, not {unknown} (known: "
                             f"{sorted(FinetuneConfig.model_fields)})")
        empty = sorted(k for k, v in self.grid.items() if not v)
        if empty:
            raise ValueError(f"sweep.grid lists no values for {empty}")
        return self


class EvaluateConfig(_Section):
    batch_size: int = Field(64, ge=1)
    bootstrap_resamples: int = Field(2000, ge=100, description="Paired bootstrap resamples.")
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Confidence of the reported one-sided bounds."
    )
    seed: int = Field(0)
    behaviour_rows: int = Field(
        300, ge=1, description="Test texts perturbed (casing, typos) for the invariance checks."
    )
    latency_examples: int = Field(
        64, ge=1, description="Test texts timed at batch 1 and 32 (the gate's latency budget "
        "needs them; raise gate.max_latency_ms to relax it)."
    )
    probes: str = Field(
        "probes.yaml",
        description="Minimum-functionality probes: a YAML mapping of label -> texts that must "
        "get that label (a file in the workspace, made by `ratchet init`; empty: no probes).",
    )


class GateConfig(_Section):
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="Family-wise error of the tests the rule needs (Holm)."
    )
    min_delta: float = Field(
        0.01, ge=0, description="Recent: the macro-F1 gain must be significant and at least this."
    )
    max_regression: float = Field(
        0.02, ge=0, description="Reference, drift-weighted and per-domain non-inferiority margin "
        "(macro-F1)."
    )
    min_score: float = Field(0.5, ge=0, le=1, description="Absolute floor of test macro-F1.")
    max_latency_ms: float = Field(
        100.0, gt=0, description="Budget for the p95 latency per example at batch 1, judged on "
        "the fastest of the timed rounds (load from other processes only slows a round down)."
    )
    max_latency_ratio: float = Field(
        1.5, gt=0, description="With a champion: the candidate's batch-1 time over the "
        "champion's, both timed interleaved in one process (median), may be at most this."
    )
    min_invariance: float = Field(
        0.6, ge=0, le=1, description="Floor of the share of predictions that survive casing "
        "changes and a small typo (waived when the candidate is no less robust than the "
        "champion; at cold start only recorded and warned about)."
    )
    max_invariance_drop: float = Field(
        0.05, ge=0, le=1, description="With a champion: the candidate may keep at most this "
        "share fewer predictions under casing / a typo than the champion on the same rows."
    )
    min_probe_accuracy: float = Field(
        0.8, ge=0, le=1, description="Every class's minimum-functionality probes must pass at "
        "least this share."
    )
    min_domain_rows: int = Field(
        30, ge=1, description="Domains with fewer test rows are reported but not judged."
    )
    floor_models: int = Field(
        3, ge=0, le=20, description="How many of the best models the registry has served are "
        "kept as the floor: the candidate must also be non-inferior within max_regression to "
        "the best of them on reference and on every judged domain (0: the current champion "
        "only, so losses of up to max_regression per promotion can add up)."
    )
    experiments: Literal["log", "register"] = Field(
        "log", description="In a `dvc exp run`: log an MLflow run named after the experiment "
        "(params, metrics, the decision it would get) and register nothing, move no alias "
        "(log); or gate it like a real run (register; its `git_commit` is the baseline, which "
        "lacks the experiment's params)."
    )


class RegistryConfig(_Section):
    model_name: str = Field("ratchet-classifier", min_length=1)
    experiment: str = Field("ratchet", min_length=1)
    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI (sqlite:///... or http://server); relative sqlite "
        "paths are inside the workspace.",
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Seconds a tracking server (http/https) is waited for, retrying, before a "
        "command or stage fails with one `unreachable` error; also bounds MLflow's own request "
        "retries (MLFLOW_HTTP_REQUEST_* set in the environment win).",
    )


class Params(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at `loc` (all but the last element), for a did-you-mean hint."""
    for part in loc[:-1]:
        field = next(
            (f for name, f in model.model_fields.items() if (f.alias or name) == part), None
        )
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Params, e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            lines.append(f"`{key}`: unknown key{hint}")
        else:
            lines.append(f"`{key}`: {e['msg']} (got {e.get('input')!r})")
    return f"{source}: invalid params:\n" + "\n".join(f"  - {line}" for line in lines)


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def _dvc_reads(dvc_yaml: Path) -> list[str]:
    """The params.yaml keys a dvc.yaml names: its stages' `params:` entries and its `${...}`
    interpolations (DVC fails mid-run on one that is missing)."""
    import re

    try:
        text = dvc_yaml.read_text()
        stages = (yaml.safe_load(text) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []  # DVC reports a broken dvc.yaml itself
    keys = re.findall(r"\$\{\s*([\w.]+)\s*\}", text)
    for stage in stages.values():
        for entry in (stage or {}).get("params") or []:
            if isinstance(entry, str):
                keys.append(entry)
            elif isinstance(entry, dict):  # {file: [keys]}: only this file's
                keys += [k for k in entry.get("params.yaml") or [] if isinstance(k, str)]
    return sorted(set(keys))


def _check_complete(raw: dict[str, Any], path: Path) -> None:
    """A workspace's params.yaml holds every section, and every key its dvc.yaml reads: one
    that lacks them was emptied or truncated (a full disk, an editor killed mid-save), and
    reading it as defaults would train, gate and record under settings nobody chose."""
    restore = f"restore it with `git checkout {path.name}`"
    if not raw:
        raise ConfigError(f"{path} is empty: {restore}")
    sections = [f.alias or name for name, f in Params.model_fields.items()]
    missing = [s for s in sections if s not in raw]
    if missing:
        raise ConfigError(f"{path} is missing sections {', '.join(missing)}: it looks "
                          f"truncated; {restore}")
    absent = []
    for key in _dvc_reads(path.parent / "dvc.yaml"):
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                absent.append(key)
                break
            node = node[part]
    if absent:
        names = ", ".join(f"`{k}`" for k in absent)
        raise ConfigError(f"{path} is missing {names} (read by dvc.yaml's stages): it looks "
                          f"truncated; {restore}")


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml.

    An empty file is an error; so, in a workspace (a dvc.yaml beside it), is one without every
    section or without a key dvc.yaml reads. A params file elsewhere (a stage run by hand, a
    test) may hold only what it changes: the rest are the defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run `ratchet init` to make a workspace)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    if not raw:
        raise ConfigError(f"{path} is empty: restore it with `git checkout {path.name}`")
    params = parse_params(raw, str(path))  # an unknown key or a bad value first: more precise
    if (path.parent / "dvc.yaml").is_file():
        _check_complete(raw, path)
    return params


def dump_defaults() -> dict[str, Any]:
    """The default params as a plain mapping (what params.yaml holds)."""
    return Params().model_dump(by_alias=True)
