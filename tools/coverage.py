"""Feature Activation Coverage (FAC) of a dataset against a task's relevant features.

F(D) = features active in some row of D. F_task = features active in the anchor set that
a relevance judge accepts. FAC(D) = |F_task & F(D)| / |F_task|.

When a feature counts as active in a text is an `ActivityRule`: its max activation over
the text's tokens (or the number of tokens) above a threshold: one absolute delta for all
features; one delta set at a quantile of all the anchor's non-zero max activations
(`anchor-quantile`: scale-free, so it carries over to other SAEs); or, per feature, a
quantile of that feature's non-zero anchor activations (`quantile`).

The `label` judge needs anchor labels: a feature is task-relevant when it is active on
at least `min_support` (or `min_support_frac` of the) positive anchor rows and the
smoothed log-odds of its activation
rate on positives vs negatives is at least `min_log_odds`. The `llm` judge (an LLM reads
each feature's explanation) plugs in through `RelevanceJudge` with the interpreter.

Presence-only FAC saturates (a 10% seed of the anchor already covers most task features),
so `GradedRule` also grades each task feature by how many data rows activate it relative
to the anchor: `fac_graded` and the `deficits` the improve loop should target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from tools.errors import ConfigError, DataError

if TYPE_CHECKING:  # tools.probe imports torch: keep settings imports light
    from tools.probe import ProbeResult


class ActivityRule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    threshold: Literal["absolute", "anchor-quantile", "quantile"] = "absolute"
    delta: float = Field(1.0, ge=0, description="threshold=absolute: active when > delta")
    quantile: float = Field(
        0.5, ge=0, lt=1,
        description="threshold=anchor-quantile: this quantile of all non-zero anchor max "
        "activations; threshold=quantile: the same per feature",
    )
    pooling: Literal["max", "count"] = "max"
    min_tokens: int = Field(1, ge=1, description="pooling=count: tokens above the threshold")

    def describe(self, delta_used: float | None = None) -> str:
        """e.g. "max > anchor q0.9 (15.54)" or ">= 2 tokens > 1"."""
        pool = "max" if self.pooling == "max" else f">= {self.min_tokens} tokens"
        value = f" ({delta_used:.2f})" if delta_used is not None else ""
        thr = {
            "absolute": f"{self.delta:g}",
            "anchor-quantile": f"anchor q{self.quantile:g}{value}",
            "quantile": f"per-feature anchor q{self.quantile:g}",
        }[self.threshold]
        return f"{pool} > {thr}"


def feature_thresholds(rule: ActivityRule, anchor_max: sp.csr_matrix) -> np.ndarray:
    """[d_sae] threshold per feature (inf for features the anchor never activates)."""
    d = anchor_max.shape[1]
    if rule.threshold == "absolute":
        return np.full(d, rule.delta, dtype=np.float32)
    if rule.threshold == "anchor-quantile":
        nz = anchor_max.data[anchor_max.data > 0]
        delta = float(np.quantile(nz, rule.quantile)) if len(nz) and rule.quantile > 0 else 0.0
        return np.full(d, delta, dtype=np.float32)
    csc = anchor_max.tocsc()
    out = np.full(d, np.inf, dtype=np.float32)
    for f in np.flatnonzero(np.diff(csc.indptr)):
        vals = csc.data[csc.indptr[f] : csc.indptr[f + 1]]
        # strictly-greater test: a quantile of 0 must still leave the smallest value active
        out[f] = np.quantile(vals, rule.quantile) if rule.quantile > 0 else 0.0
    return out


def activity(result: ProbeResult, rule: ActivityRule, thresholds: np.ndarray) -> sp.csr_matrix:
    """[n_texts, d_sae] 0/1 matrix: feature active in text under `rule`."""
    if rule.pooling != "count":
        return max_activity(result.max_matrix(), thresholds)
    counts = result.count_matrix(thresholds)
    m = counts.copy()
    m.data = (counts.data >= rule.min_tokens).astype(np.float32)
    m.eliminate_zeros()
    return m


def max_activity(maxes: sp.csr_matrix, thresholds: np.ndarray) -> sp.csr_matrix:
    """[n_texts, d_sae] 0/1 matrix of max pooling: a feature is active where its max
    activation exceeds its threshold (`activity`'s rule, for max matrices read elsewhere,
    e.g. from shards; `maxes` itself is left as it is)."""
    m = maxes.copy()  # its arrays may be Arrow's, read-only
    m.data = (maxes.data > thresholds[maxes.indices]).astype(np.float32)
    m.eliminate_zeros()
    return m


class JudgeSettings(BaseModel):
    """Label judge settings. Defaults are the calibrated ones (bench/fac_predicts.py on
    ToxicChat: support 10 of 281 positives, log-odds 2); support scales with the anchor's
    positives so the same rule works on a 90-positive demo anchor and a large one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    judge: Literal["label", "auto"] = "label"
    min_support: int = Field(2, ge=1, description="positive anchor rows a feature must fire on")
    min_support_frac: float = Field(
        0.036, ge=0, le=1, description="...or this fraction of positive rows, if more"
    )
    min_log_odds: float = Field(2.0, description="smoothed log-odds, positives vs negatives")
    smoothing: float = Field(0.5, gt=0, description="pseudo-count added to each rate")
    paired: bool = Field(
        False, description="the anchor's rows are (1, 0) pairs of one item: support = pairs "
        "where the feature fires on the 1 side only, log-odds = log of that over the pairs "
        "where it fires on the 0 side only (what both sides share cancels)")
    paired_min_log_odds: float = Field(
        0.7, description="min_log_odds for paired rows: two sides of one item differ less "
        "than toxic and benign texts (on 1,500 HH-RLHF dev pairs: 0 task features at 2.0 "
        "and 3.6% support, 5 at 1.0 and 0.5%, 46 at 0.7 and 0.3%)")
    paired_min_support_frac: float = Field(0.003, ge=0, le=1,
                                           description="min_support_frac for paired rows")

    def for_pairs(self) -> JudgeSettings:
        """These settings for a paired anchor (`paired`, with the paired thresholds)."""
        return self.model_copy(update={"paired": True, "min_log_odds": self.paired_min_log_odds,
                                       "min_support_frac": self.paired_min_support_frac})

    def support_for(self, n_positive: int) -> int:
        return max(self.min_support, round(self.min_support_frac * n_positive))


class GradedRule(BaseModel):
    """When a task feature counts as covered *enough*, relative to the anchor.

    Binary FAC only asks whether some data row activates a feature, so a small seed of
    the anchor already scores ~0.95 and the improve loop has nothing left to aim at.
    Graded coverage asks for a number of rows instead. For task feature f, active
    (under the activity rule) in anchor_rows_f of the n_anchor anchor rows:

        a_f         = anchor_rows_f / n_anchor            (the anchor's activation rate)
        needed_f    = min(anchor_rows_f, max(min_rows, ceil(rate_frac * a_f * n_data)))
        data_rows_f = data rows where f is active
        deficit_f   = max(0, needed_f - data_rows_f)
        fac_graded  = mean over task features of min(1, data_rows_f / needed_f)

    i.e. the data's activation rate should reach `rate_frac` of the anchor's, and never
    fewer than `min_rows` rows (one lucky row is no evidence). The cap at the anchor's own
    count is the reference: data with as many active rows as the anchor has matched it,
    however large the data is, so the anchor measured against itself scores 1.0.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_rows: int = Field(3, ge=1, description="rows a task feature needs at least")
    rate_frac: float = Field(
        0.5, gt=0, le=1, description="...or this fraction of the anchor's activation rate, "
        "if more rows (both capped at the anchor's own active rows)"
    )

    def needed(self, anchor_rows: np.ndarray, n_anchor: int, n_data: int) -> np.ndarray:
        """[n] int rows needed per feature, from its [n] anchor active-row counts."""
        rows = np.asarray(anchor_rows, dtype=np.int64)
        # the tolerance keeps e.g. 0.1 * 6 * 50 / 10 = 3.0000000000000004 from becoming 4
        by_rate = np.ceil(self.rate_frac * rows * n_data / max(n_anchor, 1) - 1e-9)
        want = np.maximum(self.min_rows, by_rate.astype(np.int64))
        # at least 1: a judge may accept a feature the anchor never activates (not the label
        # judge); it then needs one row rather than dividing by zero
        return np.asarray(np.maximum(1, np.minimum(rows, want)), dtype=np.int64)

    def describe(self) -> str:
        """e.g. ">= 3 rows or 0.5 x the anchor's rate (at most its rows)"."""
        return (f">= {self.min_rows} rows or {self.rate_frac:g} x the anchor's rate "
                "(at most its rows)")


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
    data_rows: int = Field(0, description="rows of the data where the feature is active")
    needed: int = Field(0, description="rows the graded rule asks for (see GradedRule)")
    deficit: int = Field(0, description="max(0, needed - data_rows)")


class CoverageReport(BaseModel):
    rule: ActivityRule
    delta_used: float | None = Field(None, description="the one threshold, when uniform")
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
    fac_graded: float = Field(
        0.0, description="mean over task features of min(1, data_rows / needed)")
    deficits: list[MissingFeature] = Field(
        default_factory=list, description="task features with deficit > 0 (the missing ones "
        "included), largest deficit first, with spans")
    graded: GradedRule = Field(
        default_factory=GradedRule, description="the rule fac_graded was graded by")
    saturated: bool = Field(description="FAC >= 0.99: raise the threshold or use a wider SAE")


def active_features(active: sp.csr_matrix) -> np.ndarray:
    """[d_sae] bool: feature active in at least one row of a 0/1 activity matrix."""
    return active_rows(active) > 0


def active_rows(active: sp.csr_matrix) -> np.ndarray:
    """[d_sae] int: rows of a 0/1 activity matrix where each feature is active."""
    return np.asarray((active != 0).sum(axis=0)).ravel().astype(np.int64)


def feature_stats(
    anchor_active: sp.csr_matrix, labels: Sequence[int], smoothing: float,
    paired: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature: (positive support, negative support, smoothed log-odds). `paired`:
    rows 2i and 2i+1 are one item's 1 and 0 sides; supports count the pairs where the
    feature fires on that side only, and the log-odds compares the two (a paired,
    McNemar-style contrast: a feature both sides share says nothing)."""
    if paired:
        active = (anchor_active.tocsr() != 0).astype(np.int8)
        one, zero = active[0::2], active[1::2]
        only_one = np.asarray((one > zero).sum(axis=0)).ravel()
        only_zero = np.asarray((zero > one).sum(axis=0)).ravel()
        a = smoothing
        return only_one, only_zero, np.log((only_one + a) / (only_zero + a))
    y = np.asarray(labels)
    active = anchor_active.tocsc()
    pos = np.asarray(active[y == 1].sum(axis=0)).ravel()
    neg = np.asarray(active[y == 0].sum(axis=0)).ravel()
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    a = smoothing
    rate_pos = (pos + a) / (n_pos + 2 * a)
    rate_neg = (neg + a) / (n_neg + 2 * a)
    log_odds = np.log(rate_pos / (1 - rate_pos)) - np.log(rate_neg / (1 - rate_neg))
    return pos, neg, log_odds


class RelevanceJudge(Protocol):
    def __call__(self, anchor_active: sp.csr_matrix, labels: Sequence[int] | None) -> np.ndarray:
        """[d_sae] bool mask of task-relevant features."""
        ...


def label_judge(settings: JudgeSettings) -> RelevanceJudge:
    def judge(anchor_active: sp.csr_matrix, labels: Sequence[int] | None) -> np.ndarray:
        if labels is None:
            raise DataError(
                "the label relevance judge needs a labelled anchor set (a 0/1 `label` column)"
            )
        y = np.asarray(labels)
        if (y == 1).sum() == 0 or (y == 0).sum() == 0:
            raise DataError("the anchor set needs both positive (1) and negative (0) rows")
        pos, _, log_odds = feature_stats(anchor_active, labels, settings.smoothing,
                                         settings.paired)
        support = settings.support_for(int((y == 1).sum()))
        return np.asarray((pos >= support) & (log_odds >= settings.min_log_odds))

    return judge


def make_judge(settings: JudgeSettings) -> RelevanceJudge:
    # `auto` means both judges when an LLM endpoint is configured; until the llm judge
    # exists it is the label judge alone.
    if settings.judge in ("label", "auto"):
        return label_judge(settings)
    raise ConfigError(f"unknown relevance judge {settings.judge!r}: use label or auto")


def coverage(
    anchor_active: sp.csr_matrix,
    anchor_labels: Sequence[int] | None,
    data_active: sp.csr_matrix | tuple[int, np.ndarray],
    *,
    anchor_max: sp.csr_matrix,
    rule: ActivityRule,
    judge: JudgeSettings | None = None,
    graded: GradedRule | None = None,
) -> tuple[CoverageReport, np.ndarray]:
    """FAC of `data` against the anchor's task features; also returns the F_task mask.

    Takes 0/1 activity matrices (see `activity`); `anchor_max` only feeds the report.
    Missing features come sorted by log-odds (most task-specific first), deficits by
    deficit then log-odds (see `GradedRule`; its defaults when `graded` is None), both
    without spans; `attach_spans` fills those in.
    """
    judge = judge or JudgeSettings()
    graded = graded or GradedRule()
    task = make_judge(judge)(anchor_active, anchor_labels)
    anchor_rows = active_rows(anchor_active)
    if isinstance(data_active, tuple):  # (rows, active rows per feature): shards.ActiveCounts
        n_data, data_rows = data_active
    else:
        n_data, data_rows = data_active.shape[0], active_rows(data_active)
    in_anchor, in_data = anchor_rows > 0, data_rows > 0
    n_task = int(task.sum())
    covered = task & in_data
    n_anchor = anchor_active.shape[0]
    task_ids = np.flatnonzero(task)
    needed = np.zeros_like(anchor_rows)
    needed[task_ids] = graded.needed(anchor_rows[task_ids], n_anchor, n_data)
    deficit = np.maximum(0, needed - data_rows)  # 0 off the task: needed is 0 there
    labels = anchor_labels if anchor_labels is not None else [0] * n_anchor
    pos, neg, lo = feature_stats(anchor_active, labels, judge.smoothing, judge.paired)
    amax = np.asarray(anchor_max.max(axis=0).todense()).ravel()

    def entry(f: int) -> MissingFeature:
        return MissingFeature(
            feature=f, pos_support=int(pos[f]), neg_support=int(neg[f]),
            log_odds=float(lo[f]), anchor_max=float(amax[f]), data_rows=int(data_rows[f]),
            needed=int(needed[f]), deficit=int(deficit[f]),
        )

    missing = sorted((entry(int(f)) for f in np.flatnonzero(task & ~in_data)),
                     key=lambda m: (-m.log_odds, -m.pos_support, m.feature))
    deficits = sorted((entry(int(f)) for f in np.flatnonzero(deficit > 0)),
                      key=lambda m: (-m.deficit, -m.log_odds, m.feature))
    fac = covered.sum() / n_task if n_task else 0.0
    graded_fac = (np.minimum(1.0, data_rows[task_ids] / needed[task_ids]).mean()
                  if n_task else 0.0)
    report = CoverageReport(
        rule=rule, judge=judge.judge, n_anchor=n_anchor,
        n_data=n_data, n_active_anchor=int(in_anchor.sum()), n_task=n_task,
        n_task_in_anchor=int((task & in_anchor).sum()), n_covered=int(covered.sum()),
        fac=float(fac), anchor_fac=float((task & in_anchor).sum() / n_task) if n_task else 0.0,
        missing=missing, fac_graded=float(graded_fac), deficits=deficits, graded=graded,
        saturated=bool(n_task and fac >= 0.99),
    )
    return report, task


@dataclass(frozen=True)
class Coverage:
    """One coverage measurement of a dataset against an anchor, with everything later
    steps need so none of them recomputes it (verification reuses `thresholds`,
    model-centric focus reuses `task` and `anchor_active`). `Workspace.measure` memoises
    it and attaches the missing features' spans; treat it as read-only (the arrays are)."""

    report: CoverageReport
    task: np.ndarray
    """[d_sae] bool: F_task, the task-relevant features"""
    thresholds: np.ndarray
    """[d_sae] float: per-feature thresholds the rule resolved to (inf: never active)"""
    anchor_active: sp.csr_matrix
    """[n_anchor, d_sae] 0/1: which features are active in which anchor row"""


def measure(
    anchor_acts: ProbeResult,
    anchor_labels: Sequence[int] | None,
    data_acts: ProbeResult,
    rule: ActivityRule,
    judge: JudgeSettings | None = None,
    graded: GradedRule | None = None,
) -> Coverage:
    """Coverage straight from probe results: thresholds from the anchor, activity of both
    sets under `rule`, then `coverage`. Missing and deficit features come without spans."""
    anchor_max = anchor_acts.max_matrix()
    thresholds = feature_thresholds(rule, anchor_max)
    anchor_active = activity(anchor_acts, rule, thresholds)
    report, task = coverage(
        anchor_active, anchor_labels, activity(data_acts, rule, thresholds),
        anchor_max=anchor_max, rule=rule, judge=judge, graded=graded,
    )
    if thresholds.size and np.all(thresholds == thresholds[0]):
        report.delta_used = float(thresholds[0])
    for array in (task, thresholds):
        array.setflags(write=False)
    return Coverage(report, task, thresholds, anchor_active)


def attach_spans(
    report: CoverageReport,
    spans: dict[int, list[tuple[int, str, float]]],
) -> CoverageReport:
    """Fill each missing and deficit feature's top anchor spans (from `probe.top_spans`)."""
    for m in [*report.missing, *report.deficits]:
        m.spans = [Span(row=r, text=t, activation=a) for r, t, a in spans.get(m.feature, [])]
    return report
