"""Pool selection streamed over shards (`improve --pool P --engine ray`): the pool's rows
are read chunk by chunk from its Parquet shards (tools/shards.py), each strategy keeps a
bounded set of candidates, and the existing `pick_new` (tools/pool/select.py) decides among
them. Per chunk a row is scored by the detector (from its pooled residual) and ranked by
its strategy's first-pick key; the `candidates` best rows (default max(20 x n, 500)) are
kept with their activity, residuals and scores: memory grows with the candidates and one
chunk, not with the pool (but for `OpenRows`, ~80 bytes a row). The keys:

- `fac`: the first greedy utility, (task features with a deficit the row fires) x
  p^score_power x (1 - p)^certainty_power; also, for each such feature, the 2 rows of
  highest weight firing it, and the best rows by the fallback's key. Task features and
  deficits come from a first pass's whole-pool counts (`PoolTotals`), which the
  candidates' view carries too: they are those of the in-memory pick.
- `top-score`: the score; `uncertainty`: the margin |2p - 1| (smallest first).
- `random`, `coreset`: a seeded hash of the pool row, a uniform sample of the pool.

What is exact: `top-score` and `uncertainty` rank by a fixed key: every pick is the
in-memory one (while near-duplicate skips leave enough candidates). `fac`'s first pick is
the pool's argmax (ties: the lower row, as in memory); later ones can differ: utilities
only shrink as deficits fill, so a row outside the candidates overtakes only once every
candidate left has lost more, e.g. when the top rows all fire the same few features (the
per-feature best rows are there for that); when at most C rows fill any deficit, all are
candidates and the greedy is exact. `random` and `coreset` are exact only when the
candidates hold every open row; else `random` is uniform but not the same rows, and
`coreset`'s k-center runs on a uniform sample (it can miss the pool's outliers).
Near-duplicate groups (a row's normalised opening) are the same among the candidates.

A repeated text is one shard row: it stands for its lowest open pool row and counts once
per open row in the totals, as in memory. Only the candidates' texts are read
(`texts_of`: the caller streams the pool file once). A detector that reads texts (lora)
scores the candidates only: `fac` then ranks by deficit cover alone and no feature is
relevant by the model; `top-score` and `uncertainty` need every row's score: refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from tools.coverage import ActivityRule, max_activity
from tools.errors import ConfigError, DataError
from tools.pool.select import (
    NEEDS_SCORES,
    Pick,
    PoolTotals,
    PoolView,
    SelectSettings,
    deficits,
    fac_weight,
    pick_new,
    relevant_features,
    require_scores,
)
from tools.shards import CHUNK_ROWS, ShardSet
from tools.splits import near_duplicate_groups

PER_PICK, AT_LEAST, PER_FEATURE = 20, 500, 2
"""candidates per strategy: max(PER_PICK x n, AT_LEAST); fac: best rows per feature"""


@dataclass(frozen=True)
class StreamChunk:
    """Some open pool rows, as a strategy sees them."""

    rows: np.ndarray  # [n] pool row of each (a repeated text: its lowest open row)
    count: np.ndarray  # [n] open pool rows holding the text (1 unless repeated)
    active: sp.csr_matrix  # [n, d_sae] 0/1 under the activity rule
    pooled: np.ndarray  # [n, d_model] mean residual
    scores: np.ndarray | None  # [n] the current model's (None: not scored from features)


@dataclass(frozen=True)
class Labelled:
    """The labelled side of a `PoolView`, and the anchor's task features."""

    active: sp.csr_matrix
    pooled: np.ndarray
    labels: np.ndarray
    task: np.ndarray | None = None


class Picked(NamedTuple):
    row: int  # the pool row
    text: str
    pick: Pick  # the strategy's pick (its `row` indexes the candidates)


@dataclass(frozen=True)
class OpenRows:
    """The pool's distinct texts with a row not taken yet."""

    keys: np.ndarray  # [k] sorted text keys (tools.shards.KEY_DTYPE)
    row: np.ndarray  # [k] the lowest open pool row of each
    count: np.ndarray  # [k] its open pool rows

    @classmethod
    def of(cls, pool_keys: np.ndarray, taken: Iterable[int]) -> OpenRows:
        """From the pool's [rows] keys in file order (`ProbeRun.keys`) and the taken rows."""
        open_ = np.ones(len(pool_keys), dtype=bool)
        open_[[r for r in taken if 0 <= r < len(pool_keys)]] = False
        idx = np.flatnonzero(open_)
        keys, first, count = np.unique(pool_keys[idx], return_index=True, return_counts=True)
        return cls(keys, idx[first], count)


def shard_chunks(
    shards: ShardSet, open_rows: OpenRows, thresholds: np.ndarray, rule: ActivityRule,
    score: Callable[[np.ndarray], np.ndarray] | None = None, *, chunk_rows: int = CHUNK_ROWS,
) -> Iterator[StreamChunk]:
    """The open rows' chunks from the shards: active where max > threshold (the rule of
    `tools.coverage.activity`), scored by `score` ([n, d_model] residuals -> [n])."""
    if rule.pooling != "max":
        raise ConfigError("pooling=count needs per-token counts, which shards do not keep: "
                          "use pooling=max with the ray engine, or --engine local")
    found = 0
    for c in shards.iter_chunks(open_rows.keys, chunk_rows=chunk_rows):
        assert c.pooled is not None
        pos = np.searchsorted(open_rows.keys, c.keys)
        found += len(pos)
        yield StreamChunk(open_rows.row[pos], open_rows.count[pos],
                          max_activity(c.max, thresholds), c.pooled,
                          None if score is None else np.asarray(score(c.pooled)))
    if found < len(open_rows.keys):
        raise DataError(f"{len(open_rows.keys) - found} of {len(open_rows.keys)} open pool "
                        f"texts are not in the shards at {shards.root}: probe the pool again "
                        "(a rerun probes only what is missing)")


def random_key(rows: np.ndarray, seed: int) -> np.ndarray:
    """[n] in [0, 1): a seeded hash (splitmix64) of each pool row, whatever the chunks."""
    z = rows.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))).astype(np.float64) / 2.0**64


Key = Callable[[StreamChunk], np.ndarray]


class _Top:
    """The `size` rows of highest key so far (ties: the lower pool row, as in memory)."""

    def __init__(self, size: int, key: Key) -> None:
        self.size, self.key = size, key
        self.values, self.rows = np.zeros(0), np.zeros(0, dtype=np.int64)

    def offer(self, chunk: StreamChunk) -> None:
        values = np.concatenate([self.values, self.key(chunk)])
        rows = np.concatenate([self.rows, chunk.rows])
        best = np.lexsort((rows, -values))[: self.size]
        self.values, self.rows = values[best], rows[best]


class _PerFeature(_Top):
    """Per feature of `on`, the `size` rows of highest key firing it (ties: lower row)."""

    def __init__(self, size: int, key: Key, on: np.ndarray) -> None:
        super().__init__(size, key)
        self.on, self.feats = on, np.zeros(0, dtype=np.int64)

    def offer(self, chunk: StreamChunk) -> None:
        a = chunk.active.tocoo()
        hit = self.on[a.col]
        feats = np.concatenate([self.feats, a.col[hit]])
        values = np.concatenate([self.values, self.key(chunk)[a.row[hit]]])
        rows = np.concatenate([self.rows, chunk.rows[a.row[hit]]])
        order = np.lexsort((rows, -values, feats))
        feats, values, rows = feats[order], values[order], rows[order]
        starts = np.flatnonzero(np.r_[True, feats[1:] != feats[:-1]])
        rank = np.arange(len(feats)) - np.repeat(starts, np.diff(np.r_[starts, len(feats)]))
        keep = rank < self.size
        self.feats, self.values, self.rows = feats[keep], values[keep], rows[keep]


class _Scan:
    """A pass's result: the rows any `_Top` holds, with their data; the pool's totals."""

    def __init__(self, d_sae: int, kept: StreamChunk | None = None) -> None:
        self.kept, self.n_rows, self.score_total, self.scored = kept, 0, 0.0, False
        self.rows, self.score_sum = np.zeros(d_sae), np.zeros(d_sae)

    def add(self, chunk: StreamChunk, tops: Iterable[_Top]) -> None:
        w = chunk.count.astype(np.float64)
        self.n_rows += int(w.sum())
        self.rows += np.asarray(chunk.active.T @ w).ravel()
        if chunk.scores is not None:
            self.scored = True
            self.score_sum += np.asarray(chunk.active.T @ (chunk.scores * w)).ravel()
            self.score_total += float(chunk.scores @ w)
        wanted = np.unique(np.concatenate([np.zeros(0, dtype=np.int64)]
                                          + [t.rows for t in tops]))
        old = [] if self.kept is None else [self.kept]
        fresh = np.isin(chunk.rows, wanted)
        for o in old:  # a second pass meets the first's rows again
            fresh &= ~np.isin(chunk.rows, o.rows)
        parts = [*(_take(o, np.flatnonzero(np.isin(o.rows, wanted))) for o in old),
                 _take(chunk, np.flatnonzero(fresh))]
        scores = [q.scores for q in parts if q.scores is not None]
        self.kept = StreamChunk(
            np.concatenate([q.rows for q in parts]), np.concatenate([q.count for q in parts]),
            sp.vstack([q.active for q in parts]).tocsr(),
            np.concatenate([q.pooled for q in parts]),
            np.concatenate(scores) if len(scores) == len(parts) else None)

    def totals(self) -> PoolTotals:
        return PoolTotals(self.n_rows, self.rows.round().astype(np.int64),
                          self.score_sum if self.scored else None,
                          self.score_total / max(self.n_rows, 1))


def _take(c: StreamChunk, idx: np.ndarray) -> StreamChunk:
    return StreamChunk(c.rows[idx], c.count[idx], c.active[idx], c.pooled[idx],
                       None if c.scores is None else c.scores[idx])


def _scan(chunks: Iterable[StreamChunk], tops: list[_Top], offer: list[_Top],
          scan: _Scan) -> _Scan:
    """Stream `chunks`: `offer` them to those tops, keep the rows any of `tops` holds."""
    for chunk in chunks:
        for top in offer:
            top.offer(chunk)
        scan.add(chunk, tops)
    return scan


def _score(c: StreamChunk) -> np.ndarray:
    assert c.scores is not None
    return c.scores


def _margin(c: StreamChunk) -> np.ndarray:
    return np.asarray(-np.abs(2 * _score(c) - 1))


def _view(pool: StreamChunk, lab: Labelled, scores: np.ndarray | None,
          groups: np.ndarray, totals: PoolTotals | None) -> PoolView:
    return PoolView(active=pool.active, pooled=pool.pooled, scores=scores,
                    labelled_active=lab.active, labelled_pooled=lab.pooled, labels=lab.labels,
                    groups=groups, task=lab.task, totals=totals)


def stream_pick(
    chunks: Callable[[], Iterable[StreamChunk]], lab: Labelled, settings: SelectSettings,
    n: int, texts_of: Callable[[np.ndarray], list[str]], seen: Any, *, scored: bool,
    seed: int = 0, candidates: int | None = None,
    score_texts: Callable[[list[str]], np.ndarray] | None = None,
) -> list[Picked]:
    """Up to `n` picks by `settings.strategy` (see the module doc). `chunks()`: a pass over
    the open pool (fac makes two), with scores when `scored`; else `score_texts` scores the
    candidates, or there is no model. `texts_of(rows)`: pool rows' texts."""
    name = settings.strategy
    require_scores(name, scored or score_texts is not None)
    if name in ("top-score", "uncertainty") and not scored:
        raise ConfigError(f"the {name} strategy ranks every pool row by the model's score, "
                          "and the ray engine scores only from the shards' residuals, which "
                          "this detector does not read: use --detector probe, or --engine "
                          "local")
    size = candidates or max(PER_PICK * n, AT_LEAST)
    by_score = name == "top-score" or name == "fac" and settings.fallback == "top-score"
    key: Key = (_score if by_score else _margin) if name in NEEDS_SCORES else (
        lambda c: random_key(c.rows, seed))
    tops = [_Top(size, key)] if scored or name not in NEEDS_SCORES else []
    scan = _scan(chunks(), tops, tops, _Scan(lab.active.shape[1]))
    if scan.kept is None:
        return []
    totals = scan.totals()
    if name == "fac":
        empty = _take(scan.kept, np.zeros(0, dtype=np.int64))
        bare = _view(empty, lab, np.zeros(0) if scored else None, np.zeros(0, dtype=int),
                     totals)
        task = relevant_features(bare, settings)
        fills = deficits(bare, settings, task, len(lab.labels) + n) > 0

        def weight(c: StreamChunk) -> np.ndarray:
            return np.ones(len(c.rows)) if c.scores is None else fac_weight(c.scores, settings)

        def gain(c: StreamChunk) -> np.ndarray:
            return np.asarray(np.asarray(c.active @ fills.astype(np.float64)).ravel()
                              * weight(c))

        more = [_Top(size, gain), _PerFeature(PER_FEATURE, weight, fills)]
        scan = _scan(chunks(), [*tops, *more], more,
                     _Scan(lab.active.shape[1], scan.kept))  # totals: the first pass's
    assert scan.kept is not None
    pool = _take(scan.kept, np.argsort(scan.kept.rows))  # in pool order, as in memory
    texts = texts_of(pool.rows)
    scores = pool.scores if scored else score_texts(texts) if score_texts else None
    view = _view(pool, lab, scores, near_duplicate_groups(texts), totals)
    return [Picked(int(pool.rows[p.row]), texts[p.row], p)
            for p in pick_new(view, settings, n, texts, seen, seed=seed)]
