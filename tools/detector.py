"""Downstream detectors and their metrics.

`probe` detector: a class-balanced logistic regression on frozen features of the model
(the mean layer residual the probe already stores per text), standardised. It is the
fast default the coverage experiments and the loop use to score a training set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tools.errors import DataError


class Metrics(BaseModel):
    auprc: float
    auroc: float
    best_f1: float
    n: int
    n_positive: int


def train_probe_detector(
    x: np.ndarray, y: Sequence[int] | np.ndarray, *, c: float = 0.1, seed: int = 0
) -> Pipeline:
    """Fit standardise + balanced logistic regression on [n, d] features."""
    labels = np.asarray(y)
    if len(set(labels.tolist())) < 2:
        raise DataError("a detector needs both positive (1) and negative (0) training rows")
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed),
    )
    model.fit(x, labels)
    return model


def evaluate(scores: np.ndarray, y: Sequence[int] | np.ndarray) -> Metrics:
    """AUPRC (average precision), AUROC and best F1 of scores against 0/1 labels."""
    labels = np.asarray(y)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall + 1e-12), 0)
    return Metrics(
        auprc=float(average_precision_score(labels, scores)),
        auroc=float(roc_auc_score(labels, scores)),
        best_f1=float(f1.max()),
        n=len(labels),
        n_positive=int(labels.sum()),
    )


def score(model: Pipeline, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict_proba(x)[:, 1])
