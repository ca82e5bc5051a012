"""Are generated digits recognisable? A pixel-space logistic-regression classifier (trained on the real train
split) labels each sample; we report the share it labels with probability >= a threshold and the class histogram.

A deliberately simple, transparent check for the CPU quickstart: it needs no feature network and no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass
class RecognizabilityReport:
    """share_confident: fraction of samples whose top class probability >= threshold; histogram: (K,) counts of
    the predicted classes over all samples; confident_histogram: the same over confident samples only."""

    share_confident: float
    threshold: float
    histogram: np.ndarray
    confident_histogram: np.ndarray
    mean_top_probability: float

    def as_dict(self) -> dict[str, object]:
        return {
            "share_confident": self.share_confident,
            "threshold": self.threshold,
            "histogram": self.histogram.tolist(),
            "confident_histogram": self.confident_histogram.tolist(),
            "mean_top_probability": self.mean_top_probability,
        }


def fit_pixel_classifier(x_train: np.ndarray, labels: np.ndarray, C: float = 0.1, seed: int = 0) -> Pipeline:
    """Standardised-pixel multinomial logistic regression. x_train: (N, ...) in [-1, 1]; labels: (N,)."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    return clf.fit(np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1), np.asarray(labels))


def recognizability(clf: Pipeline, samples: np.ndarray, threshold: float = 0.5) -> RecognizabilityReport:
    """Score samples (N, ...) in [-1, 1] with a classifier from :func:`fit_pixel_classifier`."""
    flat = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    n_features = clf.named_steps["standardscaler"].n_features_in_
    if flat.shape[1] != n_features:
        raise ValueError(f"samples have {flat.shape[1]} pixels but the classifier was trained on {n_features}")
    probs = clf.predict_proba(flat)
    top, pred = probs.max(1), clf.classes_[probs.argmax(1)]
    k = len(clf.classes_)
    confident = top >= threshold
    return RecognizabilityReport(
        share_confident=float(confident.mean()),
        threshold=threshold,
        histogram=np.bincount(pred, minlength=k),
        confident_histogram=np.bincount(pred[confident], minlength=k),
        mean_top_probability=float(top.mean()),
    )
