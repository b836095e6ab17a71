"""The pool path's heavy work for text tasks: which pool rows to pick, which deficits no pool
row fills, and the judge labeler (the improve engine, agent/engine.py, delegates here).

The pool is probed once (through the activation cache) and read under the activity rule and
thresholds coverage uses (from the anchor); the current model is the detector the previous
round trained; the labelled rows are the run's rows so far (the starting data, kept samples
and labelled pool rows). A strategy (tools/pool/select.py) ranks the pool rows not picked
before; near-duplicates of the labelled rows and of each other are skipped.

With the ray engine (`PoolSource.engine`), the pool is probed on Ray into shards at the
first select (tools/ray_probe.py; a rerun probes only texts the shards lack) and never
loaded: the picks stream over the shards (tools/pool/stream.py), the candidates' texts come
from one more pass over the pool file, and the unfilled deficits are an active-row count
streamed over the shards. The labelled side stays local, as coverage's anchor does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.coverage import activity
from tools.data import TextDataset
from tools.detector import load_detector
from tools.pool.labels import PoolPick
from tools.pool.select import PoolView, SelectSettings, pick_new
from tools.splits import near_duplicate_groups
from tools.verify import NearDuplicates

if TYPE_CHECKING:
    from agent.steps import Rows
    from tools.detector import Detector
    from tools.pool.source import PoolSource
    from tools.pool.stream import Labelled
    from tools.ray_probe import ProbeRun
    from tools.workspace import Workspace


class PoolSelector:
    """Picks from `pool` for a run over `anchor` (see the module doc); with `source`'s ray
    engine, `pool` is not needed (the rows are streamed from `source.path`)."""

    def __init__(self, ws: Workspace, anchor: TextDataset, pool: TextDataset | None,
                 model_folder: str | None = None, source: PoolSource | None = None) -> None:
        self.ws, self.anchor, self.model_folder, self.source = ws, anchor, model_folder, source
        self.ray = source is not None and source.engine == "ray"
        if pool is None and not self.ray:
            raise ValueError("the local engine needs the pool's rows")
        self._pool = pool

    @property
    def pool(self) -> TextDataset:
        assert self._pool is not None
        return self._pool

    @cached_property
    def _pool_probe(self) -> Any:
        return self.ws.probe(TextDataset(list(self.pool.texts), None, "pool"))

    @cached_property
    def groups(self) -> np.ndarray:
        return near_duplicate_groups(self.pool.texts)

    @cached_property
    def _ray_run(self) -> ProbeRun:
        from tools.ray_probe import ray_probe

        assert self.source is not None
        r = self.source.ray
        return ray_probe(self.source.path, settings=self.ws.settings,
                         out_dir=Path(r.shards) if r.shards else None,
                         text_field=self.source.text_field, concurrency=r.concurrency,
                         batch_size=r.batch_size, address=r.address)

    def _activity(self, probe: Any, rows: Rows) -> Any:
        measured = self.ws.measure(self.anchor, TextDataset(rows.texts(), None, "data"))
        return activity(probe, self.ws.settings.activity_rule(), measured.thresholds).tocsr()

    def select(self, rows: Rows, model_dir: Path, settings: SelectSettings, n: int,
               taken: set[int], seed: int) -> list[PoolPick]:
        if n <= 0:
            return []
        if self.ray:
            return self._select_ray(rows, model_dir, settings, n, taken, seed)
        measured = self.ws.measure(self.anchor, TextDataset(rows.texts(), None, "data"))
        open_ = np.array(sorted(set(range(len(self.pool))) - taken), dtype=np.int64)
        if not len(open_):
            return []
        pool_active = self._activity(self._pool_probe, rows)[open_]
        pooled = self._pool_probe.pooled()[open_]
        scores = None
        if model_dir.exists():
            det = load_detector(model_dir, model_folder=self.model_folder)
            texts = [self.pool.texts[i] for i in open_]
            scores = det.score(texts, features=pooled if det.settings.needs_features else None)
        lab = self._labelled(rows, measured)
        view = PoolView(
            active=pool_active, pooled=pooled, scores=scores, labelled_active=lab.active,
            labelled_pooled=lab.pooled, labels=lab.labels, groups=self.groups[open_],
            task=lab.task)
        texts = [self.pool.texts[i] for i in open_]
        picks = pick_new(view, settings, n, texts, self._seen(rows, settings), seed=seed)
        return [PoolPick(row=int(open_[p.row]), text=texts[p.row], round=1,
                         strategy=settings.strategy, score=p.score, fills=p.fills)
                for p in picks]

    def _labelled(self, rows: Rows, measured: Any) -> Labelled:
        from tools.pool.stream import Labelled  # pyarrow: not at `import agent`

        data_probe = self.ws.probe(TextDataset(rows.texts(), None, "data"))
        labels = rows.labels()
        return Labelled(active=self._activity(data_probe, rows), pooled=data_probe.pooled(),
                        labels=np.asarray(labels if labels is not None else [], dtype=int),
                        task=np.asarray(measured.task))

    @staticmethod
    def _seen(rows: Rows, settings: SelectSettings) -> NearDuplicates:
        seen = NearDuplicates(settings.near_threshold)
        seen.add_all(rows.texts())
        return seen

    def _select_ray(self, rows: Rows, model_dir: Path, settings: SelectSettings, n: int,
                    taken: set[int], seed: int) -> list[PoolPick]:
        from tools.pool.stream import OpenRows, shard_chunks, stream_pick
        from tools.ray_cluster import plan_actors, ray_cluster
        from tools.ray_io import pool_texts

        assert self.source is not None
        source = self.source
        measured = self.ws.measure(self.anchor, TextDataset(rows.texts(), None, "data"))
        with ray_cluster(source.ray.address) as cluster:  # one session: probe, then texts
            run = self._ray_run
            open_rows = OpenRows.of(run.keys, taken)
            if not len(open_rows.keys):
                return []
            det = (load_detector(model_dir, model_folder=self.model_folder)
                   if model_dir.exists() else None)
            by_features, by_texts = _scorers(det)
            rule = self.ws.settings.activity_rule()
            io_cpus = plan_actors(cluster, 1, cuda=False).io_cpus
            got = stream_pick(
                lambda: shard_chunks(run.shards, open_rows, measured.thresholds, rule,
                                     by_features),
                self._labelled(rows, measured), settings, n,
                lambda at: pool_texts(source.path, source.text_field, at, num_cpus=io_cpus),
                self._seen(rows, settings), scored=by_features is not None, seed=seed,
                candidates=source.ray.candidates, score_texts=by_texts)
        return [PoolPick(row=p.row, text=p.text, round=1, strategy=settings.strategy,
                         score=p.pick.score, fills=p.pick.fills) for p in got]

    def unfilled(self, rows: Rows, taken: set[int]) -> list[int]:
        """Deficit task features (graded coverage of `rows`) that no pool row outside
        `taken` activates: what only synthesis can fill."""
        report = self.ws.coverage(self.anchor, TextDataset(rows.texts(), None, "data"))
        if self.ray:
            from tools.pool.stream import OpenRows
            from tools.shards import active_row_counts

            measured = self.ws.measure(self.anchor, TextDataset(rows.texts(), None, "data"))
            open_keys = OpenRows.of(self._ray_run.keys, taken).keys
            counts = active_row_counts(self._ray_run.shards, measured.thresholds,
                                       self.ws.settings.activity_rule(), keys=open_keys)
            fired = set(np.flatnonzero(counts.rows).tolist())
        else:
            open_ = sorted(set(range(len(self.pool))) - taken)
            active = self._activity(self._pool_probe, rows)[open_]
            fired = set(np.flatnonzero(np.asarray((active != 0).sum(axis=0)).ravel()).tolist())
        return [m.feature for m in report.deficits if m.feature not in fired]


def _scorers(det: Detector | None) -> tuple[Callable[[np.ndarray], np.ndarray] | None,
                                           Callable[[list[str]], np.ndarray] | None]:
    """(by residuals, by texts): a probe detector scores the streamed chunks' residuals;
    one that reads texts (lora) scores only the candidates."""
    if det is None:
        return None, None
    if det.settings.needs_features:
        return (lambda x: det.score(features=x)), None
    return None, (lambda texts: det.score(texts))


def judged_labels(ok_positive: Sequence[bool], ok_negative: Sequence[bool]) -> list[int | None]:
    """A row's label from the label gate's verdicts on both claims: the one label whose
    claim holds; None (disputed: dropped, not guessed) when both or neither hold."""
    out: list[int | None] = []
    for pos, neg in zip(ok_positive, ok_negative, strict=True):
        out.append(1 if pos and not neg else 0 if neg and not pos else None)
    return out
