"""Which pool rows to label next: five strategies behind one interface (`pick`).

A strategy sees a `PoolView`: per pool row, which SAE features are active (the activity rule
coverage uses) and its pooled residual; the current model's score of each pool row (the
probability it is positive); and the rows labelled so far (their activity, residuals and
labels). It returns `Pick`s in the order chosen; the caller drops near-duplicates of the
labelled data and of each other (`tools.verify.NearDuplicates`, as for synthetic samples) and
asks again for the rest.

- `random`: uniform over the candidates (seeded).
- `uncertainty`: breaking ties, the smallest margin between the two classes' probabilities
  (small-text's `BreakingTies`; for two classes the same order as prediction entropy).
- `top-score`: the rows the current model scores highest.
- `coreset`: greedy k-center on the pooled residuals, standardised (small-text's
  `greedy_coreset`, Euclidean): each pick is the candidate farthest from everything labelled
  or picked.
Both small-text strategies are small-text 1.4's own code, called on our arrays.
- `fac`: deficit cover. The task features are those relevant by the labels known so far
  (the label judge on the labelled rows: tools/coverage.py) and/or by the current model (a
  feature whose pool rows the model scores `min_lift` x above the pool's mean), plus the
  anchor's F_task when a labelled anchor defines one. Each needs rows in the labelled set in
  proportion to its rate in the pool (the graded rule: at least `min_rows`, or `rate_frac` of
  the pool's rate); its deficit is what the labelled rows lack. Greedily, the candidate whose
  active task features carry the most remaining deficit, times its score to the power
  `score_power` (0: coverage alone; the higher, the closer to top-score), is picked and the
  deficits it fills are counted down; at most one pick per near-duplicate group. When no
  candidate fills a deficit any more, the rest go by `fallback` (uncertainty, or score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from tools.coverage import JudgeSettings, feature_stats
from tools.errors import ConfigError

StrategyName = Literal["fac", "random", "uncertainty", "top-score", "coreset"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
NEEDS_SCORES = ("fac", "uncertainty", "top-score")


class SelectSettings(BaseModel):
    """How rows are picked (`improve --source pool|both`, `compare --labels pool`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    strategy: StrategyName = Field("fac", description="fac (deficit cover), random, "
                                   "uncertainty, top-score or coreset")
    batch: int = Field(25, ge=1, description="rows picked (and labelled) per round: each "
                       "round's labels retrain the model that scores the next round's pool")
    relevance: Literal["labels", "model", "both"] = Field(
        "both", description="fac: task features are those the labels known so far make "
        "relevant (label judge), those the current model's scores make relevant (lift), or "
        "either; a labelled anchor's task features always count")
    min_lift: float = Field(2.0, gt=1, description="fac: model relevance needs the pool rows "
                            "firing a feature to score this many times the pool's mean")
    min_pool_rows: int = Field(3, ge=1, description="fac: model relevance needs the feature "
                               "active on at least this many pool rows")
    min_rows: int = Field(3, ge=1, description="fac: rows a task feature needs at least in "
                          "the labelled set")
    rate_frac: float = Field(0.5, gt=0, le=1, description="fac: ...or this fraction of its "
                             "pool rate times the labelled set's size, if more")
    score_power: float = Field(1.0, ge=0, description="fac: weight of the model's score in "
                               "the pick (0: coverage alone)")
    certainty_power: float = Field(
        0.5, ge=0, description="fac: weight of the model's doubt (1 - score) in the pick; with "
        "score_power, a pick's weight is p^score_power * (1 - p)^certainty_power (both 1: "
        "rows near the boundary; 0: only the score). 0.5 on the ToxicChat dev split (10 "
        "seeds): as good as 0 on ToxicChat and 2-5 AUPRC better on ConvAbuse "
        "(bench/README.md)")
    fallback: Literal["uncertainty", "top-score"] = Field(
        "uncertainty", description="fac: how the rest of a batch is picked once no candidate "
        "fills a deficit")
    near_threshold: float = Field(0.8, gt=0, le=1, description="picks that are near-"
                                  "duplicates (MinHash Jaccard) of labelled rows or of each "
                                  "other are skipped")


@dataclass(frozen=True)
class PoolTotals:
    """The whole open pool's counts, for a view that holds only some of its rows (the ray
    engine's candidates, tools/pool/stream.py): fac's task features and deficits are then
    computed from these, as they would be over the whole pool."""

    n_rows: int
    """open pool rows"""
    rows: np.ndarray
    """[d_sae] open pool rows where the feature is active"""
    score_sum: np.ndarray | None
    """[d_sae] the model's scores summed over those rows (None: the pool was not scored,
    so no feature is relevant by the model)"""
    score_mean: float
    """the model's mean score over the open pool rows"""


@dataclass(frozen=True)
class PoolView:
    """What a strategy knows. Pool arrays are over the candidate rows the caller passes
    (row i of `active` is candidate i); labelled arrays over the rows labelled so far."""

    active: sp.csr_matrix
    """[n_pool, d_sae] 0/1: feature active in the pool row"""
    pooled: np.ndarray
    """[n_pool, d_model] mean residual of each pool row"""
    scores: np.ndarray | None
    """[n_pool] the current model's probability that the row is positive (None: no model)"""
    labelled_active: sp.csr_matrix
    """[n_lab, d_sae] 0/1"""
    labelled_pooled: np.ndarray
    """[n_lab, d_model]"""
    labels: np.ndarray
    """[n_lab] 0/1"""
    groups: np.ndarray
    """[n_pool] near-duplicate group of each pool row (tools/splits.py)"""
    task: np.ndarray | None = None
    """[d_sae] bool: the anchor's task features, when a labelled anchor defines them"""
    totals: PoolTotals | None = None
    """the whole pool's counts when the pool arrays hold only candidates (None: they hold
    every open row)"""


class Pick(BaseModel):
    """One picked pool row, with why."""

    row: int = Field(description="index into the candidates given to `pick`")
    score: float | None = Field(None, description="the current model's score of the row")
    fills: list[int] = Field(default_factory=list, description="fac: the task features "
                             "with a deficit this row fills")


def pick(view: PoolView, settings: SelectSettings, n: int, *, seed: int = 0,
         exclude: Sequence[int] = ()) -> list[Pick]:
    """Up to `n` candidates by `settings.strategy`, in pick order, none of `exclude`."""
    name = settings.strategy
    require_scores(name, view.scores is not None)
    n_pool = view.active.shape[0]
    open_ = np.ones(n_pool, dtype=bool)
    open_[list(exclude)] = False
    n = min(n, int(open_.sum()))
    if n <= 0:
        return []
    rows: list[int]
    fills: dict[int, list[int]] = {}
    if name == "random":
        rows = list(np.random.default_rng(seed).permutation(np.flatnonzero(open_))[:n])
    elif name == "top-score":
        rows = _by_score(view, open_, n)
    elif name == "uncertainty":
        rows = _breaking_ties(view, open_, n)
    elif name == "coreset":
        rows = _coreset(view, open_, n)
    else:
        rows, fills = _deficit_cover(view, settings, open_, n)
    return [Pick(row=int(r), fills=fills.get(int(r), []),
                 score=None if view.scores is None else round(float(view.scores[r]), 6))
            for r in rows]


def require_scores(strategy: str, scored: bool) -> None:
    """ConfigError when `strategy` ranks by the model's scores and there are none."""
    if strategy in NEEDS_SCORES and not scored:
        raise ConfigError(f"the {strategy} strategy needs the current model's scores; there "
                          "is no model yet (label some rows, or use random or coreset)")


def _by_score(view: PoolView, open_: np.ndarray, n: int) -> list[int]:
    assert view.scores is not None
    cand = np.flatnonzero(open_)
    order = np.lexsort((cand, -view.scores[cand]))  # ties: lower row first
    return [int(r) for r in cand[order[:n]]]


class _Probabilities:
    """The classifier small-text's strategies ask: the scores as [n, 2] probabilities."""

    def __init__(self, scores: np.ndarray) -> None:
        self.proba = np.column_stack([1.0 - scores, scores])

    def predict_proba(self, _dataset: object) -> np.ndarray:
        return self.proba


def _breaking_ties(view: PoolView, open_: np.ndarray, n: int) -> list[int]:
    from small_text.query_strategies import BreakingTies

    assert view.scores is not None
    cand = np.flatnonzero(open_)
    strategy = BreakingTies()
    got = strategy.query(_Probabilities(view.scores), None, cand, np.zeros(0, dtype=int),
                         np.zeros(0, dtype=int), n=n)
    margin = np.abs(2 * view.scores - 1)  # what BreakingTies ranks by, for ordering the batch
    return [int(r) for r in sorted(got, key=lambda r: (margin[r], r))]


def _coreset(view: PoolView, open_: np.ndarray, n: int) -> list[int]:
    from small_text.query_strategies.coresets import greedy_coreset

    cand = np.flatnonzero(open_)
    # the candidates first, then the labelled rows: small-text 1.4's greedy_coreset takes the
    # positions it picks within `indices_unlabeled` as rows of `x` too, which is right only
    # when the unlabelled rows are x's first rows
    x = np.vstack([view.pooled[cand], view.labelled_pooled]).astype(np.float64)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    labelled = len(cand) + np.arange(len(view.labelled_pooled))
    got = greedy_coreset(x, np.arange(len(cand)), labelled, n, distance_metric="euclidean",
                         normalized=False)
    return [int(cand[i]) for i in got]


def relevant_features(view: PoolView, settings: SelectSettings) -> np.ndarray:
    """[d_sae] bool: the task features fac covers (see the module doc)."""
    d = view.active.shape[1]
    out = np.zeros(d, dtype=bool) if view.task is None else view.task.copy()
    if settings.relevance in ("labels", "both"):
        y = view.labels
        if (y == 1).any() and (y == 0).any():
            judge = JudgeSettings()
            pos, _, log_odds = feature_stats(view.labelled_active, y.tolist(), judge.smoothing)
            support = judge.support_for(int((y == 1).sum()))
            out |= (pos >= support) & (log_odds >= judge.min_log_odds)
    if settings.relevance in ("model", "both") and view.scores is not None:
        t = view.totals
        if t is None:
            out |= model_relevant(view.active, view.scores, settings.min_lift,
                                  settings.min_pool_rows)
        elif t.score_sum is not None:
            out |= lifted(t.rows, t.score_sum, t.score_mean, settings.min_lift,
                          settings.min_pool_rows)
    return out


def model_relevant(active: sp.csr_matrix, scores: np.ndarray, min_lift: float,
                   min_rows: int) -> np.ndarray:
    """[d_sae] bool: features whose active pool rows the model scores `min_lift` x above
    the pool's mean score, on at least `min_rows` rows."""
    a = (active != 0).astype(np.float64).tocsc()
    rows = np.asarray(a.sum(axis=0)).ravel()
    mean = float(np.mean(scores)) if len(scores) else 0.0
    return lifted(rows, np.asarray(a.T @ scores).ravel(), mean, min_lift, min_rows)


def lifted(rows: np.ndarray, score_sum: np.ndarray, mean: float, min_lift: float,
           min_rows: int) -> np.ndarray:
    """[d_sae] bool from per-feature active rows, the scores summed over them and the
    pool's mean score (`model_relevant`'s rule)."""
    by_feature = score_sum / np.maximum(rows, 1)
    return np.asarray((rows >= min_rows) & (by_feature >= min_lift * max(mean, 1e-12)))


def deficits(view: PoolView, settings: SelectSettings, task: np.ndarray,
             n_after: int) -> np.ndarray:
    """[d_sae] int: rows each task feature still needs in the labelled set once it holds
    `n_after` rows (0 off the task)."""
    if view.totals is None:
        pool_rows = np.asarray((view.active != 0).sum(axis=0)).ravel()
        n_pool = max(view.active.shape[0], 1)
    else:
        pool_rows, n_pool = view.totals.rows, max(view.totals.n_rows, 1)
    have = np.asarray((view.labelled_active != 0).sum(axis=0)).ravel()
    by_rate = np.ceil(settings.rate_frac * pool_rows * n_after / n_pool - 1e-9)
    needed = np.minimum(pool_rows + have, np.maximum(settings.min_rows, by_rate))
    return np.where(task, np.maximum(0, needed - have), 0).astype(np.int64)


def fac_weight(scores: np.ndarray, settings: SelectSettings) -> np.ndarray:
    """[n] fac's weight of each row: p^score_power * (1 - p)^certainty_power."""
    p = np.clip(scores, 1e-6, 1.0 - 1e-6)
    return np.asarray(np.power(p, settings.score_power)
                      * np.power(1.0 - p, settings.certainty_power))


def _deficit_cover(view: PoolView, settings: SelectSettings, open_: np.ndarray,
                   n: int) -> tuple[list[int], dict[int, list[int]]]:
    assert view.scores is not None
    task = relevant_features(view, settings)
    left = deficits(view, settings, task, len(view.labels) + n).astype(np.float64)
    a = (view.active != 0).astype(np.float64).tocsr()
    weight = fac_weight(view.scores, settings)
    open_ = open_.copy()
    used_groups: set[int] = set()
    rows: list[int] = []
    fills: dict[int, list[int]] = {}
    while len(rows) < n and open_.any():
        cover = np.asarray(a @ (left > 0)).ravel()
        utility = np.where(open_, cover * weight, -1.0)
        best = int(np.argmax(utility))
        if utility[best] <= 0:
            break
        open_[best] = False
        group = int(view.groups[best])
        if group in used_groups:
            continue
        used_groups.add(group)
        row_features = a.indices[a.indptr[best]:a.indptr[best + 1]]
        filled = [int(f) for f in row_features if left[f] > 0]
        left[filled] -= 1
        rows.append(best)
        fills[best] = filled
    if len(rows) < n:  # nothing left to cover: the rest by the fallback
        rest = (_by_score if settings.fallback == "top-score" else _breaking_ties)(
            view, open_, n - len(rows))
        rows += rest
    return rows, fills


def pick_new(view: PoolView, settings: SelectSettings, n: int, texts: Sequence[str], seen: Any,
             *, seed: int = 0) -> list[Pick]:
    """Up to `n` picks whose texts (`texts[i]` is candidate i's) are neither duplicates nor
    near-duplicates of what `seen` holds (a `tools.verify.NearDuplicates` of the labelled
    rows) or of each other; each accepted pick is added to `seen`. A strategy is asked again
    for what the check removed, until `n` or the candidates run out."""
    got: list[Pick] = []
    tried: list[int] = []
    while len(got) < n:
        picks = pick(view, settings, n - len(got), seed=seed + len(tried), exclude=tried)
        if not picks:
            break
        for p in picks:
            tried.append(p.row)
            if seen.check(texts[p.row]) == "new":
                seen.add(texts[p.row])
                got.append(p)
    return got


def needed_batches(total: int, batch: int) -> list[int]:
    """The batch sizes that add up to `total` labels, `batch` at a time."""
    full, rest = divmod(total, batch)
    return [batch] * full + ([rest] if rest else [])


def curve_points(budget: int, batch: int, points: Sequence[int] | None) -> list[int]:
    """The label counts a learning curve reports: `points` within the budget (default: each
    doubling from the first batch up to the budget, and the budget)."""
    if points:
        got = sorted({p for p in points if 0 < p <= budget} | {budget})
        return got
    out, k = [], batch
    while k < budget:
        out.append(k)
        k *= 2
    return [*out, budget] if budget not in out else out

