"""The project's metrics: local evaluate modules loaded by path, combined into one call."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ("accuracy", "macro_f1")


def label_metric_info(description: str):
    """The MetricInfo every label metric here shares: lists of label strings in, a float out."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description="predictions and references: lists of label strings",
        features=datasets.Features(
            {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        ),
    )


@cache
def _combined():
    import evaluate

    return evaluate.combine([evaluate.load(str(HERE / name)) for name in NAMES])


def compute(predictions: list[str], references: list[str],
            sample_weight: Sequence[float] | None = None) -> dict[str, float]:
    """Every metric of NAMES for one set of predictions; NaN for an empty set.

    `sample_weight` weights the rows (drift-weighted metrics); None weighs them all alike.
    """
    if not references:
        return {name: float("nan") for name in NAMES}
    extra = {} if sample_weight is None else {"sample_weight": list(sample_weight)}
    result = _combined().compute(predictions=list(predictions), references=list(references),
                                 **extra)
    return {k: float(v) for k, v in result.items()}
