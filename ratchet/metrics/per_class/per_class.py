"""Per-class precision, recall, F1 and support over string labels, as a local evaluate module."""

import evaluate

from ratchet.metrics import label_metric_info


class PerClass(evaluate.Metric):
    def _info(self):
        return label_metric_info(
            "Precision, recall, F1 and support of each label in the references or predictions "
            "(sorted): shows which classes a model gains or loses, which averages hide."
        )

    def _compute(self, predictions, references, sample_weight=None):
        """Parallel lists under `labels`, `precision`, `recall`, `f1`, `support`.

        A label seen only in the predictions has support 0 and recall 0 (zero_division=0), so a
        model inventing a class still shows up, with its precision.
        """
        from sklearn.metrics import precision_recall_fscore_support

        labels = sorted(set(references) | set(predictions))
        if not labels:
            return {"labels": [], "precision": [], "recall": [], "f1": [], "support": []}
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, labels=labels, zero_division=0, sample_weight=sample_weight
        )
        return {
            "labels": labels,
            "precision": [float(x) for x in precision],
            "recall": [float(x) for x in recall],
            "f1": [float(x) for x in f1],
            # A count of reference rows, or their summed weight when rows are weighted.
            "support": [float(x) for x in support],
        }
