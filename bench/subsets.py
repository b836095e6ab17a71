"""Recipes for equal-size training subsets that differ in feature activation coverage.

The FAC-vs-detector-quality experiment needs many subsets of one training pool whose
coverage of the task features spreads widely while size (and mostly class balance) stay
fixed, so that coverage, not size, is what varies. Every recipe draws only from `pool`
(so subsets never touch the eval split), returns exactly `n` distinct row ids into the
full dataset, sorted, with at least two rows of each class (a detector needs both).
Labels are binary; any non-zero label counts as positive. The pool/eval split itself
is `tools.splits.stratified_split` (the improve run holds out its eval set with it too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans

log = logging.getLogger(__name__)

MIN_PER_CLASS = 2


@dataclass(frozen=True)
class Subset:
    recipe: str
    name: str
    rows: np.ndarray  # sorted row ids into the full dataset


def _classes(pool: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pool rows split into (positives, negatives), deduplicated and sorted."""
    rows = np.unique(np.asarray(pool, dtype=np.int64))
    pos_mask = np.asarray(labels).astype(bool)[rows]
    return rows[pos_mask], rows[~pos_mask]


def _quota(n_pos: int, n_neg: int, n: int) -> int:
    """Positives in an n-row subset at the pool's positive rate, kept feasible."""
    if n_pos < MIN_PER_CLASS or n_neg < MIN_PER_CLASS:
        raise ValueError(f"pool needs >= {MIN_PER_CLASS} rows per class ({n_pos=}, {n_neg=})")
    if n > n_pos + n_neg or n < 2 * MIN_PER_CLASS:
        raise ValueError(f"n={n} must lie in [{2 * MIN_PER_CLASS}, {n_pos + n_neg}]")
    q = int(np.floor(n * n_pos / (n_pos + n_neg) + 0.5))
    q = min(max(q, MIN_PER_CLASS, n - n_neg), n - MIN_PER_CLASS, n_pos)
    return q


def _pick(rng: np.random.Generator, rows: np.ndarray, k: int) -> np.ndarray:
    return rng.choice(rows, size=k, replace=False) if k > 0 else rows[:0]


def _subset(recipe: str, name: str, *parts: np.ndarray) -> Subset:
    return Subset(recipe, name, np.sort(np.concatenate(parts)).astype(np.int64))


def random_subsets(
    pool: np.ndarray, labels: Sequence[int], n: int, k: int, seed: int
) -> list[Subset]:
    """Plain random draws: the baseline spread of coverage that chance alone gives."""
    pos, neg = _classes(pool, labels)
    _quota(len(pos), len(neg), n)  # validates
    rng = np.random.default_rng(seed)
    rows_all = np.concatenate([pos, neg])
    is_pos = np.isin(rows_all, pos)
    out = []
    for i in range(k):
        take = rng.choice(len(rows_all), size=n, replace=False)
        p, q = rows_all[take[is_pos[take]]], rows_all[take[~is_pos[take]]]
        # A draw short of one class swaps random rows of the other class for it.
        if len(p) < MIN_PER_CLASS:
            short = MIN_PER_CLASS - len(p)
            p = np.concatenate([p, _pick(rng, np.setdiff1d(pos, p), short)])
            q = np.setdiff1d(q, _pick(rng, q, short))
        elif len(q) < MIN_PER_CLASS:
            short = MIN_PER_CLASS - len(q)
            q = np.concatenate([q, _pick(rng, np.setdiff1d(neg, q), short)])
            p = np.setdiff1d(p, _pick(rng, p, short))
        out.append(_subset("random", f"random-{i}", p, q))
    return out


def stratified_subsets(
    pool: np.ndarray, labels: Sequence[int], n: int, k: int, seed: int
) -> list[Subset]:
    """Random draws at the pool's positive rate: coverage varies with content, not balance."""
    pos, neg = _classes(pool, labels)
    n_pos = _quota(len(pos), len(neg), n)
    rng = np.random.default_rng(seed)
    return [
        _subset("stratified", f"strat-{i}", _pick(rng, pos, n_pos), _pick(rng, neg, n - n_pos))
        for i in range(k)
    ]


def ablated_subsets(
    pool: np.ndarray,
    labels: Sequence[int],
    embeddings: np.ndarray,
    n: int,
    n_clusters: int,
    seed: int,
) -> list[Subset]:
    """Drop one semantic cluster of positives per subset: a realistic coverage hole."""
    pos, neg = _classes(pool, labels)
    n_pos = _quota(len(pos), len(neg), n)
    n_clusters = min(n_clusters, len(pos))
    km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed)
    cluster = km.fit_predict(np.asarray(embeddings, dtype=np.float64)[pos])
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_clusters):
        others = pos[cluster != c]
        take = min(n_pos, len(others))
        if take < MIN_PER_CLASS or n - take > len(neg):
            log.warning("skipping ablate-c%d: %d positives outside the cluster", c, len(others))
            continue
        p = _pick(rng, others, take)
        out.append(_subset("ablated", f"ablate-c{c}", p, _pick(rng, neg, n - take)))
    return out


def _task_matrix(active: sp.spmatrix, task: np.ndarray, rows: np.ndarray) -> sp.csr_matrix:
    """Binary float CSR of `rows` x task features, for gains by sparse mat-vec."""
    cols = np.flatnonzero(np.asarray(task, dtype=bool))
    m = sp.csr_matrix(sp.csr_matrix(active)[rows][:, cols], dtype=np.float32)
    m.data = (m.data != 0).astype(np.float32)
    m.eliminate_zeros()
    return m


def _greedy(
    m: sp.csr_matrix,
    covered: np.ndarray,
    count: int,
    rng: np.random.Generator,
    maximize: bool,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Pick `count` rows of m one at a time by most/fewest new features; updates `covered`."""
    score_bias = np.zeros(m.shape[0])
    if exclude is not None:
        score_bias[exclude] = -np.inf
    chosen = []
    for _ in range(count):
        gains = m @ (~covered).astype(np.float32)
        # Gains are integers, so noise in [0, 0.5) only breaks ties, at random.
        score = (gains if maximize else -gains) + 0.5 * rng.random(len(gains)) + score_bias
        i = int(np.argmax(score))
        chosen.append(i)
        score_bias[i] = -np.inf
        covered[m.indices[m.indptr[i] : m.indptr[i + 1]]] = True
    return np.asarray(chosen, dtype=np.int64)


def greedy_coverage_subsets(
    pool: np.ndarray,
    labels: Sequence[int],
    active: sp.spmatrix,
    task: np.ndarray,
    n: int,
    seed: int,
    maximize: bool,
    k: int,
) -> list[Subset]:
    """Greedy set cover (or its opposite): the extremes of coverage at fixed size and balance."""
    pos, neg = _classes(pool, labels)
    n_pos = _quota(len(pos), len(neg), n)
    m_pos, m_neg = _task_matrix(active, task, pos), _task_matrix(active, task, neg)
    rng = np.random.default_rng(seed)
    tag = "max-cov" if maximize else "min-cov"
    out = []
    for i in range(k):
        covered = np.zeros(m_pos.shape[1], dtype=bool)
        p = pos[_greedy(m_pos, covered, n_pos, rng, maximize)]
        q = neg[_greedy(m_neg, covered, n - n_pos, rng, maximize)]
        out.append(_subset(tag, f"{tag}-{i}", p, q))
    return out


def mixed_coverage_subsets(
    pool: np.ndarray,
    labels: Sequence[int],
    active: sp.spmatrix,
    task: np.ndarray,
    n: int,
    seed: int,
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
) -> list[Subset]:
    """A fraction f of each class picked by greedy min-coverage, the rest at random: fills
    the coverage range between min-cov subsets and random draws."""
    pos, neg = _classes(pool, labels)
    n_pos = _quota(len(pos), len(neg), n)
    rng = np.random.default_rng(seed)
    out = []
    for f in fractions:
        k_pos, k_neg = round(f * n_pos), round(f * (n - n_pos))
        covered = np.zeros(int(np.asarray(task).sum()), dtype=bool)
        p = pos[_greedy(_task_matrix(active, task, pos), covered, k_pos, rng, False)]
        q = neg[_greedy(_task_matrix(active, task, neg), covered, k_neg, rng, False)]
        p = np.concatenate([p, _pick(rng, np.setdiff1d(pos, p), n_pos - k_pos)])
        q = np.concatenate([q, _pick(rng, np.setdiff1d(neg, q), n - n_pos - k_neg)])
        out.append(_subset("mixed-min-cov", f"mixed-min-cov-{f:g}", p, q))
    return out


def swap_subsets(
    pool: np.ndarray,
    labels: Sequence[int],
    active: sp.spmatrix,
    task: np.ndarray,
    n: int,
    seed: int,
    fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
) -> list[Subset]:
    """Graded coverage changes of `stratified_subsets(..., k=1, seed)[0]`, positives only.

    swap-up drops the positives that uniquely cover the fewest task features and adds the
    pool positives covering the most uncovered ones; swap-down drops those that uniquely
    cover the most and adds the least novel. Size and positive count never change.
    """
    base = stratified_subsets(pool, labels, n, 1, seed)[0].rows
    pos, _ = _classes(pool, labels)
    in_base = np.isin(pos, base)
    base_pos, base_neg = pos[in_base], np.setdiff1d(base, pos)
    cand = pos[~in_base]
    m_base = _task_matrix(active, task, base)
    m_pos, m_cand = _task_matrix(active, task, base_pos), _task_matrix(active, task, cand)
    counts = np.asarray(m_base.sum(axis=0)).ravel()
    unique = np.asarray(m_pos @ (counts == 1).astype(np.float32)).ravel()
    rng = np.random.default_rng(seed)
    out = []
    for f in fractions:
        swap = min(max(1, round(f * len(base_pos))), len(base_pos), len(cand))
        for up in (True, False):
            noise = 0.5 * rng.random(len(base_pos))
            order = np.argsort(unique + noise if up else -unique + noise, kind="stable")
            keep = base_pos[np.sort(order[swap:])]
            kept = np.concatenate([keep, base_neg])
            covered = np.asarray(_task_matrix(active, task, kept).sum(axis=0)).ravel() > 0
            add = cand[_greedy(m_cand, covered, swap, rng, maximize=up)]
            tag = "swap-up" if up else "swap-down"
            out.append(_subset(tag, f"{tag}-{f:g}", keep, add, base_neg))
    return out


def all_recipes(
    pool: np.ndarray,
    labels: Sequence[int],
    embeddings: np.ndarray,
    active: sp.spmatrix,
    task: np.ndarray,
    n: int,
    seed: int,
) -> list[Subset]:
    """The default battery (37 subsets when every ablation cluster is usable)."""
    return [
        *random_subsets(pool, labels, n, 6, seed),
        *stratified_subsets(pool, labels, n, 6, seed + 1),
        *ablated_subsets(pool, labels, embeddings, n, 8, seed + 2),
        *greedy_coverage_subsets(pool, labels, active, task, n, seed + 3, True, 3),
        *greedy_coverage_subsets(pool, labels, active, task, n, seed + 4, False, 3),
        *mixed_coverage_subsets(pool, labels, active, task, n, seed + 6),
        *swap_subsets(pool, labels, active, task, n, seed + 5),
    ]
