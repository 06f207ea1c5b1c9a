"""Micro-averaged F1 over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import f1, label_metric_info


class MicroF1(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "F1 pooled over every row; for single-label classification it equals accuracy, and is "
            "kept so reports line up with tools that print micro, macro and weighted side by side."
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"micro_f1": f1("micro", predictions, references, sample_weight)}
