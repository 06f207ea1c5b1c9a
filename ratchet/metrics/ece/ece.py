"""Expected calibration error (equal-width confidence bins), as a local evaluate module."""

import datasets
import evaluate

from ratchet.metrics import ece_value


class ExpectedCalibrationError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=(
                "Weighted mean, over equal-width bins of confidence, of |accuracy - mean "
                "confidence| in the bin: how far a model's stated confidence is from how often "
                "it is right (0 is perfectly calibrated)."
            ),
            citation="Guo, Pleiss, Sun, Weinberger: On Calibration of Modern Neural Networks "
                     "(ICML 2017).",
            inputs_description=(
                "confidences: probability of the predicted label, in [0, 1]; correct: whether "
                "the prediction was right. Bins are (k/n, (k+1)/n], with 0 in the first bin."
            ),
            features=datasets.Features(
                {"confidences": datasets.Value("float64"), "correct": datasets.Value("bool")}
            ),
        )

    def _compute(self, confidences, correct, n_bins=15, sample_weight=None):
        """`sample_weight`: one weight per row (e.g. drift importance weights); None: all 1."""
        # Inputs arrive as lists: the "numpy" format would hand them over as float32.
        return {"ece": ece_value(confidences, correct, n_bins, sample_weight)}
