"""Confusion matrix over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import label_metric_info


class Confusion(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "Counts of (reference, prediction) pairs: rows are reference labels, columns "
            "predicted ones, both in `labels` order (the sorted union of both lists)."
        )

    def _compute(self, predictions, references, sample_weight=None):
        """`matrix` as nested lists (JSON-friendly) and the `labels` naming its rows and columns.

        With `sample_weight` the cells are sums of weights instead of counts.
        """
        from sklearn.metrics import confusion_matrix

        labels = sorted(set(references) | set(predictions))
        if not labels:
            return {"matrix": [], "labels": []}
        matrix = confusion_matrix(references, predictions, labels=labels,
                                  sample_weight=sample_weight)
        return {"matrix": matrix.tolist(), "labels": labels}
