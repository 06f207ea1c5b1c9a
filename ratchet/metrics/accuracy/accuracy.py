"""Accuracy over string labels, as a local evaluate module (nothing is fetched from a hub)."""

import evaluate

from ratchet.metrics import label_metric_info


class Accuracy(evaluate.Metric):
    def _info(self):
        return label_metric_info("Share of predictions equal to the reference label.")

    def _compute(self, predictions, references, sample_weight=None):
        """`sample_weight`: one weight per row (e.g. drift importance weights); None: all 1."""
        if not references:
            return {"accuracy": float("nan")}
        weights = [1.0] * len(references) if sample_weight is None else list(sample_weight)
        hits = sum(w for p, r, w in zip(predictions, references, weights, strict=True) if p == r)
        return {"accuracy": hits / sum(weights)}
