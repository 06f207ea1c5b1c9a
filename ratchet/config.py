"""Typed, frozen configuration: one model per params.yaml section, read once and validated."""

from __future__ import annotations

import difflib
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
    allow_new_labels: bool = Field(False, description="Accept labels outside the known set.")
    max_duplicate_frac: float = Field(
        0.1, ge=0, le=1, description="Warn when more than this share of texts repeat."
    )


class PrepareConfig(_Section):
    val_frac: float = Field(0.15, gt=0, lt=1, description="Share of texts in the val split.")
    test_frac: float = Field(0.2, gt=0, lt=1, description="Share of texts in the test split.")
    salt: str = Field("ratchet", description="Mixed into the split hash; changing it reshuffles.")

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> PrepareConfig:
        if self.val_frac + self.test_frac >= 0.9:
            raise ValueError("val_frac + test_frac must leave at least 10% for training")
        return self


class DriftConfig(_Section):
    alpha: float = Field(0.01, gt=0, lt=1, description="Significance level of the drift tests.")


class AugmentConfig(_Section):
    enabled: bool = Field(True, description="Add augmented copies of training rows.")
    ops: list[Literal["swap", "delete"]] = Field(
        default_factory=lambda: ["swap", "delete"], description="Token-level operations to use."
    )
    copies: int = Field(1, ge=0, le=10, description="Augmented copies per training row.")
    prob: float = Field(0.1, ge=0, le=1, description="Per-token probability of an operation.")
    seed: int = Field(7, description="Seed of the augmentation.")


class PretrainConfig(_Section):
    enabled: bool = Field(True, description="Continue MLM pre-training on the domain's texts.")
    max_steps: int = Field(30, ge=0, description="Optimizer steps of MLM training.")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    mlm_probability: float = Field(0.15, gt=0, lt=1)


class FinetuneConfig(_Section):
    epochs: float = Field(3.0, gt=0, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate (after warmup).")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)


class EvaluateConfig(_Section):
    batch_size: int = Field(64, ge=1)
    bootstrap_resamples: int = Field(2000, ge=100, description="Paired bootstrap resamples.")
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="One-sided confidence of the difference's lower bound."
    )
    seed: int = Field(0)


class GateConfig(_Section):
    min_delta: float = Field(
        0.01, ge=0, description="Recent: the lower bound of the macro-F1 gain must exceed this."
    )
    max_regression: float = Field(
        0.02, ge=0, description="Reference: the lower bound of the difference must exceed -this."
    )
    min_score: float = Field(0.5, ge=0, le=1, description="Absolute floor of test macro-F1.")


class RegistryConfig(_Section):
    model_name: str = Field("ratchet-classifier", min_length=1)
    experiment: str = Field("ratchet", min_length=1)
    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI (sqlite:///... or http://server); relative sqlite "
        "paths are inside the workspace.",
    )


class Params(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
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


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run `ratchet init` to make a workspace)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, str(path))


def dump_defaults() -> dict[str, Any]:
    """The default params as a plain mapping (what params.yaml holds)."""
    return Params().model_dump(by_alias=True)
