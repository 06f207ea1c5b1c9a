"""Accuracy over string labels, as a local evaluate module (nothing is fetched from a hub)."""

import evaluate

from ratchet.metrics import label_metric_info


class Accuracy(evaluate.Metric):
    def _info(self):
        return label_metric_info("Share of predictions equal to the reference label.")

    def _compute(self, predictions, references):
        if not references:
            return {"accuracy": float("nan")}
        hits = sum(p == r for p, r in zip(predictions, references, strict=True))
        return {"accuracy": hits / len(references)}
