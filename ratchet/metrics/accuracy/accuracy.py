"""Accuracy over string labels, as a local evaluate module (nothing is fetched from a hub)."""

import evaluate

from ratchet.metrics import accuracy, label_metric_info


class Accuracy(evaluate.Metric):
    def _info(self):
        return label_metric_info("Share of predictions equal to the reference label.")

    def _compute(self, predictions, references, sample_weight=None):
        """`sample_weight`: one weight per row (e.g. drift importance weights); None: all 1."""
        return {"accuracy": accuracy(predictions, references, sample_weight)}
