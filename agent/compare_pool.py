"""`facsynth compare --labels pool`: label k pool rows, picked by each strategy, and score the
model on the seed plus those k real rows (agent/compare.py runs it beside the synthesis
methods, which add k kept rows each under the seed protocol).

Per seed, the pool's rows outside the seed set (or the rows of `--pool`) are the candidates;
their labels are hidden until a pick method picks them (the label column plays the
annotator). A pick method works in rounds of `select.batch` rows: the task's model is fit on
the seed plus the rows labelled so far, scores the unpicked candidates, and the strategy
(tools/pool/select.py) picks the next batch, skipping near-duplicates of labelled rows. The
picks (rows, labels, the features each filled, the scores) are cached per seed and method,
so a rerun or a longer learning curve reuses them; the learning curve is the metric after
each curve point's number of picks.

An external `--pool` must not hold the eval rows: rows that are duplicates or near-
duplicates (MinHash, as the verifier) of an eval or also-eval row are dropped before any
pick, and the count is reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, Field

from tools.coverage import activity, feature_thresholds, max_activity
from tools.data import TextDataset, write_text_atomic
from tools.errors import ConfigError
from tools.pool.select import PoolView, SelectSettings, curve_points, pick_new
from tools.splits import near_duplicate_groups
from tools.verify import NearDuplicates

if TYPE_CHECKING:
    from tools.shards import ShardSet

log = logging.getLogger(__name__)


class PickRun(BaseModel):
    """What one pick method picked for one seed, in pick order (cached)."""

    method: str
    settings: SelectSettings
    rows: list[int] = Field(description="candidate rows, in pick order")
    labels: list[int]
    rounds: list[int] = Field(description="the round each row was picked in (1-based)")
    fills: list[list[int]] = Field(description="fac: the deficit features each row filled")
    scores: list[float | None] = Field(description="the model's score when it was picked")


class PoolArrays:
    """The candidates' and the seed rows' feature activity and pooled residuals, probed
    once (the activity rule's thresholds come from the compare pool, as fac's coverage)."""

    def __init__(self, ws: Any, pool: TextDataset, candidates: TextDataset,
                 shards: ShardSet | None = None) -> None:
        rule = ws.settings.activity_rule()
        thresholds = feature_thresholds(rule, ws.probe(pool).max_matrix())
        if shards is None:
            texts = list(dict.fromkeys([*pool.texts, *candidates.texts]))
            probe = ws.probe(TextDataset(texts, None, "pool"))
            self.index = {t: i for i, t in enumerate(texts)}
            self.active = activity(probe, rule, thresholds).tocsr()
            self.pooled = probe.pooled()
            return
        # the ray engine: the compare pool (the labelled anchor, seeds among it) probed here,
        # the external pool's other texts read from its shards
        from tools.shards import text_keys

        if rule.pooling != "max":
            raise ConfigError("--engine ray keeps each text's max activations, not its "
                              "token counts: use pooling max (the default)")
        near = list(dict.fromkeys(pool.texts))
        known = set(near)
        far = [t for t in dict.fromkeys(candidates.texts) if t not in known]
        probe = ws.probe(TextDataset(near, None, "pool"))
        keys = text_keys(far)
        far_active = max_activity(shards.max_matrix(keys), thresholds)
        self.index = {t: i for i, t in enumerate([*near, *far])}
        self.active = sp.vstack([activity(probe, rule, thresholds), far_active]).tocsr()
        self.pooled = np.concatenate([probe.pooled(), shards.pooled(keys)])
        self.far = far

    def rows(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.index[t] for t in texts], dtype=np.int64)


def drop_eval_copies(candidates: TextDataset, scored: Sequence[TextDataset],
                     threshold: float) -> tuple[TextDataset, int]:
    """`candidates` without rows that copy or nearly copy a scored row; how many went."""
    seen = NearDuplicates(threshold)
    for data in scored:
        seen.add_all(data.texts)
    keep = [i for i, t in enumerate(candidates.texts) if seen.check(t) == "new"]
    return candidates.subset(keep), len(candidates) - len(keep)


class PoolPicker:
    """Runs the pick methods of one compare (see the module doc)."""

    def __init__(self, comp: Any, external: TextDataset | None,
                 external_path: str | Path | None = None) -> None:
        self.comp = comp
        self.external = external
        self.external_path = external_path
        self._arrays: PoolArrays | None = None

    def candidates(self, rest: Sequence[int]) -> TextDataset:
        """This seed's candidates: the external pool, else the compare pool's rows outside
        the seed set."""
        if self.external is not None:
            return self.external
        return self.comp.pool.subset(list(rest))

    def arrays(self, candidates: TextDataset) -> PoolArrays:
        if self._arrays is None or any(t not in self._arrays.index for t in candidates.texts):
            comp = self.comp
            shards = self._ray_shards() if comp.s.engine == "ray" else None
            self._arrays = PoolArrays(comp.ws, comp.pool, candidates, shards)
            if shards is not None:  # the detector's features of those texts: the same rows
                far = self._arrays.far
                comp.features.add(far, self._arrays.pooled[self._arrays.rows(far)])
        return self._arrays

    def _ray_shards(self) -> ShardSet:
        """The external pool probed on Ray (a rerun probes only what its shards lack)."""
        from tools.ray_probe import ray_probe

        assert self.external_path is not None  # run_compare refuses ray without --pool
        r = self.comp.s.ray
        self.comp.progress("probing the pool on Ray")
        return ray_probe(self.external_path, settings=self.comp.ws.settings,
                         out_dir=Path(r.shards) if r.shards else None,
                         concurrency=r.concurrency, batch_size=r.batch_size,
                         address=r.address).shards

    def run(self, method: str, s: int, seed_set: TextDataset, candidates: TextDataset,
            budget: int) -> PickRun:
        """`method`'s picks for seed `s`, at least `budget` of them when the candidates
        allow (cached in the work folder; a longer run extends a cached shorter one)."""
        comp = self.comp
        settings = comp.s.select_for(method)
        path = comp.work / f"s{s}" / "picks" / f"{method}.json"  # settings checked below
        done: PickRun | None = None
        if path.exists():
            done = PickRun.model_validate_json(path.read_text())
            if done.settings != settings:
                raise_changed(path, method)
            if len(done.rows) >= budget or len(done.rows) >= len(candidates):
                return done
        comp.progress(f"seed {s}: picking {method}")
        run = self._pick(method, s, settings, seed_set, candidates, budget, done)
        write_text_atomic(path, run.model_dump_json())
        return run

    def _pick(self, method: str, s: int, settings: SelectSettings, seed_set: TextDataset,
              candidates: TextDataset, budget: int, done: PickRun | None) -> PickRun:
        comp = self.comp
        arrays = self.arrays(candidates)
        cand_rows = arrays.rows(candidates.texts)
        seed_rows = arrays.rows(seed_set.texts)
        assert candidates.labels is not None and seed_set.labels is not None
        truth = np.asarray(candidates.labels)
        groups = near_duplicate_groups(candidates.texts)
        run = done or PickRun(method=method, settings=settings, rows=[], labels=[], rounds=[],
                              fills=[], scores=[])
        seen = NearDuplicates(settings.near_threshold)
        seen.add_all(seed_set.texts)
        seen.add_all(candidates.texts[i] for i in run.rows)
        rnd = max(run.rounds, default=0)
        while len(run.rows) < budget:
            rnd += 1
            picked = np.array(run.rows, dtype=np.int64)
            labelled = np.concatenate([seed_rows, cand_rows[picked]])
            y = np.concatenate([np.asarray(seed_set.labels), truth[picked]]).astype(int)
            data = TextDataset([*seed_set.texts, *(candidates.texts[i] for i in run.rows)],
                               [int(v) for v in y], "labelled")
            model = comp.fit(data, s)
            open_ = np.setdiff1d(np.arange(len(candidates)), picked)
            if not len(open_):
                break
            scores = comp.task.scores(model, candidates.subset(list(open_)), comp.features)
            view = PoolView(active=arrays.active[cand_rows[open_]],
                            pooled=arrays.pooled[cand_rows[open_]], scores=scores,
                            labelled_active=sp.csr_matrix(arrays.active[labelled]),
                            labelled_pooled=arrays.pooled[labelled], labels=y,
                            groups=groups[open_])
            n = min(settings.batch, budget - len(run.rows))
            texts = [candidates.texts[i] for i in open_]
            picks = pick_new(view, settings, n, texts, seen, seed=s * 100_003 + rnd * 101)
            if not picks:
                break
            for p in picks:
                row = int(open_[p.row])
                run.rows.append(row)
                run.labels.append(int(truth[row]))
                run.rounds.append(rnd)
                run.fills.append(p.fills)
                run.scores.append(p.score)
        return run

    def labelled(self, run: PickRun, k: int, seed_set: TextDataset,
                 candidates: TextDataset) -> TextDataset:
        """The seed set plus the first `k` picks with their labels."""
        assert seed_set.labels is not None
        rows = run.rows[:k]
        return TextDataset([*seed_set.texts, *(candidates.texts[i] for i in rows)],
                           [*seed_set.labels, *run.labels[:k]], "labelled")

    def key(self, method: str) -> str:
        """A pick method's name in cached file names: its selection settings and learning
        curve points are part of what its row measured."""
        import hashlib

        blob = json.dumps([self.comp.s.select_for(method).model_dump(mode="json"),
                           self.points(self.comp.s.budget)], sort_keys=True)
        return f"{method}.{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def points(self, budget: int) -> list[int]:
        return curve_points(budget, self.comp.s.select.batch, self.comp.s.curve)

    def row(self, method: str, s: int, seed_set: TextDataset, rest: Sequence[int],
            kept: int) -> Any:
        """The (seed, method) row: the model on the seed plus `kept` picks (the synthesis
        methods' equal kept count, else the budget), its FAC, the positives among the picks,
        and the learning curve."""
        comp = self.comp
        candidates = self.candidates(rest)
        points = self.points(comp.s.budget)
        run = self.run(method, s, seed_set, candidates, max([kept, *points]))
        k = min(kept, len(run.rows))
        data = self.labelled(run, k, seed_set, candidates)
        row = comp.measure(method, s, data, [], len(data), lambda: None)
        headline = comp.task.headline
        curve: dict[int, float] = {}
        also: dict[str, dict[int, float]] = {name: {} for name in comp.also}
        for p in points:
            if p > len(run.rows):
                break
            model = comp.fit(self.labelled(run, p, seed_set, candidates), s)
            curve[p] = comp.task.metric(model, comp.ev, comp.features)[headline]
            for name, d in comp.also.items():
                also[name][p] = comp.task.metric(model, d, comp.features)[headline]
        return row.model_copy(update={
            "n_added": k, "curve": curve, "also_curve": also,
            "positives": int(sum(run.labels[:k]))})


def raise_changed(path: Path, method: str) -> None:
    from tools.errors import ConfigError

    raise ConfigError(f"{path}: {method} picked with other selection settings before; give "
                      "the variant a new name, or remove that file to pick again")
