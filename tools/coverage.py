"""Feature Activation Coverage (FAC) of a dataset against a task's relevant features.

F(D) = features active (a(x, f) > delta) in some row of D. F_task = features active in
the anchor set that a relevance judge accepts. FAC(D) = |F_task & F(D)| / |F_task|.

The `label` judge needs anchor labels: a feature is task-relevant when it is active on
at least `min_support` positive anchor rows and the smoothed log-odds of its activation
rate on positives vs negatives is at least `min_log_odds`. The `llm` judge (an LLM reads
each feature's explanation) plugs in through `RelevanceJudge` with the interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, Field

from tools.errors import ConfigError, DataError


class JudgeSettings(BaseModel):
    judge: Literal["label", "auto"] = "label"
    min_support: int = Field(3, ge=1, description="positive anchor rows a feature must fire on")
    min_log_odds: float = Field(1.0, description="smoothed log-odds, positives vs negatives")
    smoothing: float = Field(0.5, gt=0, description="pseudo-count added to each rate")


class FeatureStats(BaseModel):
    feature: int
    pos_support: int
    neg_support: int
    log_odds: float
    anchor_max: float


class Span(BaseModel):
    row: int
    text: str
    activation: float


class MissingFeature(FeatureStats):
    spans: list[Span] = []


class CoverageReport(BaseModel):
    delta: float
    judge: str
    n_anchor: int
    n_data: int
    n_active_anchor: int = Field(description="features active anywhere in the anchor")
    n_task: int = Field(description="|F_task|")
    n_task_in_anchor: int = Field(description="task features the anchor itself covers")
    n_covered: int = Field(description="|F_task & F(D)|")
    fac: float
    anchor_fac: float
    missing: list[MissingFeature]
    saturated: bool = Field(description="FAC >= 0.99: raise delta or use a wider SAE")


def active_features(max_acts: sp.csr_matrix, delta: float) -> np.ndarray:
    """[d_sae] bool: feature active (> delta) in at least one row."""
    return np.asarray((max_acts > delta).sum(axis=0)).ravel() > 0


def feature_stats(
    anchor_max: sp.csr_matrix, labels: Sequence[int], delta: float, smoothing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per feature: (positive support, negative support, smoothed log-odds, anchor max)."""
    y = np.asarray(labels)
    active = (anchor_max > delta).tocsc()
    pos = np.asarray(active[y == 1].sum(axis=0)).ravel()
    neg = np.asarray(active[y == 0].sum(axis=0)).ravel()
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    a = smoothing
    rate_pos = (pos + a) / (n_pos + 2 * a)
    rate_neg = (neg + a) / (n_neg + 2 * a)
    log_odds = np.log(rate_pos / (1 - rate_pos)) - np.log(rate_neg / (1 - rate_neg))
    amax = np.asarray(anchor_max.max(axis=0).todense()).ravel()
    return pos, neg, log_odds, amax


class RelevanceJudge(Protocol):
    def __call__(
        self, anchor_max: sp.csr_matrix, labels: Sequence[int] | None, delta: float
    ) -> np.ndarray:
        """[d_sae] bool mask of task-relevant features."""
        ...


def label_judge(settings: JudgeSettings) -> RelevanceJudge:
    def judge(anchor_max: sp.csr_matrix, labels: Sequence[int] | None, delta: float) -> np.ndarray:
        if labels is None:
            raise DataError(
                "the label relevance judge needs a labelled anchor set (a 0/1 `label` column)"
            )
        y = np.asarray(labels)
        if (y == 1).sum() == 0 or (y == 0).sum() == 0:
            raise DataError("the anchor set needs both positive (1) and negative (0) rows")
        pos, _, log_odds, _ = feature_stats(anchor_max, labels, delta, settings.smoothing)
        return np.asarray((pos >= settings.min_support) & (log_odds >= settings.min_log_odds))

    return judge


def make_judge(settings: JudgeSettings) -> RelevanceJudge:
    # `auto` means both judges when an LLM endpoint is configured; until the llm judge
    # exists it is the label judge alone.
    if settings.judge in ("label", "auto"):
        return label_judge(settings)
    raise ConfigError(f"unknown relevance judge {settings.judge!r}: use label or auto")


def coverage(
    anchor_max: sp.csr_matrix,
    anchor_labels: Sequence[int] | None,
    data_max: sp.csr_matrix,
    *,
    delta: float,
    judge: JudgeSettings | None = None,
) -> tuple[CoverageReport, np.ndarray]:
    """FAC of `data` against the anchor's task features; also returns the F_task mask.

    Missing features come sorted by log-odds (most task-specific first), without spans;
    `attach_spans` fills those in.
    """
    judge = judge or JudgeSettings()
    task = make_judge(judge)(anchor_max, anchor_labels, delta)
    in_anchor = active_features(anchor_max, delta)
    in_data = active_features(data_max, delta)
    n_task = int(task.sum())
    covered = task & in_data
    missing_ids = np.flatnonzero(task & ~in_data)
    labels = anchor_labels if anchor_labels is not None else [0] * anchor_max.shape[0]
    pos, neg, lo, amax = feature_stats(anchor_max, labels, delta, judge.smoothing)
    missing = sorted(
        (
            MissingFeature(
                feature=int(f), pos_support=int(pos[f]), neg_support=int(neg[f]),
                log_odds=float(lo[f]), anchor_max=float(amax[f]),
            )
            for f in missing_ids
        ),
        key=lambda m: (-m.log_odds, -m.pos_support),
    )
    fac = covered.sum() / n_task if n_task else 0.0
    report = CoverageReport(
        delta=delta, judge=judge.judge, n_anchor=anchor_max.shape[0], n_data=data_max.shape[0],
        n_active_anchor=int(in_anchor.sum()), n_task=n_task,
        n_task_in_anchor=int((task & in_anchor).sum()), n_covered=int(covered.sum()),
        fac=float(fac), anchor_fac=float((task & in_anchor).sum() / n_task) if n_task else 0.0,
        missing=missing, saturated=bool(n_task and fac >= 0.99),
    )
    return report, task


def attach_spans(
    report: CoverageReport,
    spans: dict[int, list[tuple[int, str, float]]],
) -> CoverageReport:
    """Fill each missing feature's top anchor spans (from `probe.top_spans`)."""
    for m in report.missing:
        m.spans = [Span(row=r, text=t, activation=a) for r, t, a in spans.get(m.feature, [])]
    return report
