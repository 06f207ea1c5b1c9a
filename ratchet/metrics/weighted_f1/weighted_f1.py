"""Support-weighted F1 over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import label_metric_info


class WeightedF1(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "Mean of per-class F1 weighted by each class's (weighted) count in the references: "
            "dominated by the frequent classes, where macro F1 weighs rare ones equally."
        )

    def _compute(self, predictions, references, sample_weight=None):
        """`sample_weight`: one weight per row (e.g. drift importance weights); None: all 1."""
        from sklearn.metrics import f1_score

        if not references:
            return {"weighted_f1": float("nan")}
        score = f1_score(references, predictions, average="weighted", zero_division=0,
                         sample_weight=sample_weight)
        return {"weighted_f1": float(score)}
