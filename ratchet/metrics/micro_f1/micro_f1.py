"""Micro-averaged F1 over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import label_metric_info


class MicroF1(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "F1 pooled over every row; for single-label classification it equals accuracy, and is "
            "kept so reports line up with tools that print micro, macro and weighted side by side."
        )

    def _compute(self, predictions, references, sample_weight=None):
        """`sample_weight`: one weight per row (e.g. drift importance weights); None: all 1."""
        from sklearn.metrics import f1_score

        if not references:
            return {"micro_f1": float("nan")}
        score = f1_score(references, predictions, average="micro", zero_division=0,
                         sample_weight=sample_weight)
        return {"micro_f1": float(score)}
