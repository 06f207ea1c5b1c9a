"""Macro-averaged F1 over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import label_metric_info


class MacroF1(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "Unweighted mean of per-class F1 over every label in the references or predictions."
        )

    def _compute(self, predictions, references, sample_weight=None):
        """`sample_weight`: one weight per row (e.g. drift importance weights); None: all 1."""
        from sklearn.metrics import f1_score

        if not references:
            return {"macro_f1": float("nan")}
        score = f1_score(references, predictions, average="macro", zero_division=0,
                         sample_weight=sample_weight)
        return {"macro_f1": float(score)}
