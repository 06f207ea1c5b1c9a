"""Macro-averaged F1 over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import f1, label_metric_info


class MacroF1(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "Unweighted mean of per-class F1 over every label in the references or predictions."
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"macro_f1": f1("macro", predictions, references, sample_weight)}
