"""Expected calibration error (equal-width confidence bins), as a local evaluate module."""

import datasets
import evaluate
import numpy as np


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
        conf = np.asarray(confidences, dtype=float)
        if conf.size == 0:
            return {"ece": float("nan")}
        if n_bins < 1:
            raise ValueError(f"n_bins must be at least 1, not {n_bins}")
        if not np.all((conf >= 0) & (conf <= 1)):
            raise ValueError("confidences must lie in [0, 1] (probabilities of the prediction)")
        hit = np.asarray(correct, dtype=float)
        w = np.ones_like(conf) if sample_weight is None else np.asarray(sample_weight, float)
        if w.shape != conf.shape:
            raise ValueError(f"sample_weight has {w.size} values for {conf.size} rows")
        total = w.sum()
        if total <= 0:
            return {"ece": float("nan")}
        inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
        # side="left": a confidence equal to an edge belongs to the bin below it, (lo, hi].
        bins = np.searchsorted(inner_edges, conf, side="left")
        # Per bin, share * |acc - conf| = |sum of w * (hit - conf)| / total weight.
        gap = np.bincount(bins, weights=w * (hit - conf), minlength=n_bins)
        return {"ece": float(np.abs(gap).sum() / total)}
