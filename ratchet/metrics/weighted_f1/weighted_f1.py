"""Support-weighted F1 over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import f1, label_metric_info


class WeightedF1(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "Mean of per-class F1 weighted by each class's (weighted) count in the references: "
            "dominated by the frequent classes, where macro F1 weighs rare ones equally."
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"weighted_f1": f1("weighted", predictions, references, sample_weight)}
