"""The pool path's heavy work for text tasks: which pool rows to pick, which deficits no pool
row fills, and the judge labeler (the improve engine, agent/engine.py, delegates here).

The pool is probed once (through the activation cache) and read under the activity rule and
thresholds coverage uses (from the anchor); the current model is the detector the previous
round trained; the labelled rows are the run's rows so far (the starting data, kept samples
and labelled pool rows). A strategy (tools/pool/select.py) ranks the pool rows not picked
before; near-duplicates of the labelled rows and of each other are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    from tools.workspace import Workspace


class PoolSelector:
    """Picks from `pool` for a run over `anchor` (see the module doc)."""

    def __init__(self, ws: Workspace, anchor: TextDataset, pool: TextDataset,
                 model_folder: str | None = None) -> None:
        self.ws, self.anchor, self.pool = ws, anchor, pool
        self.model_folder = model_folder

    @cached_property
    def _pool_probe(self) -> Any:
        return self.ws.probe(TextDataset(list(self.pool.texts), None, "pool"))

    @cached_property
    def groups(self) -> np.ndarray:
        return near_duplicate_groups(self.pool.texts)

    def _activity(self, probe: Any, rows: Rows) -> Any:
        measured = self.ws.measure(self.anchor, TextDataset(rows.texts(), None, "data"))
        return activity(probe, self.ws.settings.activity_rule(), measured.thresholds).tocsr()

    def select(self, rows: Rows, model_dir: Path, settings: SelectSettings, n: int,
               taken: set[int], seed: int) -> list[PoolPick]:
        if n <= 0:
            return []
        measured = self.ws.measure(self.anchor, TextDataset(rows.texts(), None, "data"))
        open_ = np.array(sorted(set(range(len(self.pool))) - taken), dtype=np.int64)
        if not len(open_):
            return []
        pool_active = self._activity(self._pool_probe, rows)[open_]
        pooled = self._pool_probe.pooled()[open_]
        data_probe = self.ws.probe(TextDataset(rows.texts(), None, "data"))
        labels = rows.labels()
        scores = None
        if model_dir.exists():
            det = load_detector(model_dir, model_folder=self.model_folder)
            texts = [self.pool.texts[i] for i in open_]
            scores = det.score(texts, features=pooled if det.settings.needs_features else None)
        view = PoolView(
            active=pool_active, pooled=pooled, scores=scores,
            labelled_active=self._activity(data_probe, rows),
            labelled_pooled=data_probe.pooled(),
            labels=np.asarray(labels if labels is not None else [], dtype=int),
            groups=self.groups[open_], task=np.asarray(measured.task))
        seen = NearDuplicates(settings.near_threshold)
        seen.add_all(rows.texts())
        texts = [self.pool.texts[i] for i in open_]
        picks = pick_new(view, settings, n, texts, seen, seed=seed)
        return [PoolPick(row=int(open_[p.row]), text=texts[p.row], round=1,
                         strategy=settings.strategy, score=p.score, fills=p.fills)
                for p in picks]

    def unfilled(self, rows: Rows, taken: set[int]) -> list[int]:
        """Deficit task features (graded coverage of `rows`) that no pool row outside
        `taken` activates: what only synthesis can fill."""
        report = self.ws.coverage(self.anchor, TextDataset(rows.texts(), None, "data"))
        open_ = sorted(set(range(len(self.pool))) - taken)
        active = self._activity(self._pool_probe, rows)[open_]
        fired = set(np.flatnonzero(np.asarray((active != 0).sum(axis=0)).ravel()).tolist())
        return [m.feature for m in report.deficits if m.feature not in fired]


def judged_labels(ok_positive: Sequence[bool], ok_negative: Sequence[bool]) -> list[int | None]:
    """A row's label from the label gate's verdicts on both claims: the one label whose
    claim holds; None (disputed: dropped, not guessed) when both or neither hold."""
    out: list[int | None] = []
    for pos, neg in zip(ok_positive, ok_negative, strict=True):
        out.append(1 if pos and not neg else 0 if neg and not pos else None)
    return out
