"""The pool path's graph nodes, `select` and `label` (agent/steps.py `Steps` has them).

`select` asks the engine for the round's picks (agent/pool_select.py: the strategy over the
pool's features, the current model's scores, near-duplicates skipped) and writes them to
`work/round-N.picks.jsonl`; with `--source both` it also writes which deficit features no
pool row can fill (`work/round-N.unfilled.json`), the only ones synthesis then targets.

`label` gets the picks' labels into the label journal (`labels.jsonl`): from the pool's
label column (labeler file), the label gate's judges (labeler judge: a disputed row is
recorded as skipped, never guessed), or a person (labeler human): it writes the rows still
waiting to `to-label/round-N.csv` and `.jsonl` and pauses the graph with `interrupt`; a
resumed run re-reads the journal and pauses again only for rows still waiting. Then the
round's labelled rows become `data/round-N.pool.jsonl`: real rows, with provenance.
Every write is atomic or an fsynced append, so kill -9 at any point loses no label.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langgraph.types import interrupt

from tools.data import TextDataset, write_text_atomic
from tools.pool.labels import LabelJournal, LabelRecord, PoolPick, ToLabel, write_to_label
from tools.rundir import PickedRow, RunPaths, jsonl, read_samples
from tools.verify import Provenance, Sample

if TYPE_CHECKING:
    from agent.graph import LoopState
    from tools.pool.source import PoolSource


def read_picks(path: Path) -> list[PoolPick]:
    return read_samples(path, PoolPick)


class PoolSteps:
    """The select and label nodes; mixed into `Steps`, whose attributes they use."""

    dir: Path
    paths: RunPaths
    engine: Any
    pool: PoolSource | None
    pool_rows: TextDataset | None
    loop: Any

    before: Callable[[str, int], None]

    def rows(self, upto: int) -> Any:
        raise NotImplementedError  # Steps.rows

    def _summaries(self, upto: int) -> dict[int, str]:
        raise NotImplementedError  # Steps._summaries

    def _taken(self, upto: int) -> set[int]:
        """Pool rows picked in rounds up to `upto` (labelled or not: never picked again)."""
        return {p.row for r in range(1, upto + 1) for p in read_picks(self.paths.picks(r))}

    def select(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("select", r)
        assert self.pool is not None
        room = self.pool.budget - state.get("picked_total", 0)
        n = max(0, min(self.pool.select.batch, room))
        rows = self.rows(r - 1)
        taken = self._taken(r - 1)
        picks = self.engine.select(rows, self.paths.model(r - 1), self.pool.select, n, taken,
                                   seed=1000 * r)
        found = [p.model_copy(update={"round": r}) for p in picks]
        write_text_atomic(self.paths.picks(r), jsonl(found))
        if self.pool.source == "both":
            unfilled = self.engine.unfilled(rows, taken)
            write_text_atomic(self.paths.work(r, "unfilled"), json.dumps(unfilled))
        return {"picked": len(found), "picked_total": state.get("picked_total", 0) + len(found)}

    def label(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("label", r)
        assert self.pool is not None
        picks = read_picks(self.paths.picks(r))
        journal = LabelJournal(self.paths.labels)
        labeler = self.pool.labeler
        known = journal.read()
        todo = [p for p in picks if p.row not in known]
        if labeler == "file" and todo:
            assert self.pool_rows is not None and self.pool_rows.labels is not None
            journal.add(LabelRecord(row=p.row, label=self.pool_rows.labels[p.row], round=r,
                                    source="file") for p in todo)
        elif labeler == "judge" and todo:
            said = self.engine.judge_labels([p.text for p in todo], self.paths.model(r - 1),
                                            self.loop.label_gate)
            journal.add(LabelRecord(row=p.row, label=y, round=r, source="judge")
                        for p, y in zip(todo, said, strict=True))
        elif labeler == "human":
            summaries = self._summaries(r - 1)
            while True:
                known = journal.read()
                waiting = [p for p in picks if p.row not in known]
                if not waiting:
                    break
                csv_path, _ = write_to_label(self.paths.to_label(r).parent, r, [
                    ToLabel(row=p.row, text=p.text, score=p.score, fills="; ".join(
                        f"{f}: {summaries[f]}" if summaries.get(f) else str(f)
                        for f in p.fills)) for p in waiting])
                interrupt({"round": r, "waiting": len(waiting), "to_label": str(csv_path),
                           "picked": len(picks)})
        known = journal.read()
        source = Path(self.pool.path).name  # the run's config.json has the whole path
        samples = [
            Sample(text=p.text, label=known[p.row].label, provenance=Provenance(
                feature=p.fills[0] if p.fills else -1, round=r, generator=f"pool:{source}",
                prompt_version=f"select-{p.strategy}", seed=p.row, pool_row=p.row,
                fills=p.fills, score=p.score, labeler=known[p.row].source))
            for p in picks if known[p.row].label is not None]
        write_text_atomic(self.paths.pool_data(r), jsonl(samples))
        return {}

    def pool_round(self, r: int) -> dict[str, Any]:
        """What round r of the pool path did, for its RoundRecord."""
        if self.pool is None or r == 0:
            return {}
        picks = read_picks(self.paths.picks(r))
        known = LabelJournal(self.paths.labels).read()
        summaries = self._summaries(r)
        labelled = [p for p in picks if p.row in known and known[p.row].label is not None]
        total = sum(1 for rr in range(1, r + 1) for _ in read_samples(self.paths.pool_data(rr)))
        return {
            "picked": len(picks), "labelled": len(labelled),
            "positives": sum(1 for p in labelled if known[p.row].label == 1),
            "labels_total": total, "labeler": self.pool.labeler,
            "picks": [PickedRow(row=p.row, text=p.text[:200],
                                label=known[p.row].label if p.row in known else None,
                                fills=p.fills, score=p.score,
                                summaries=[summaries.get(f, "") for f in p.fills])
                      for p in picks],
        }

    def unfilled_features(self, r: int) -> set[int] | None:
        """`--source both`: the deficit features no pool row fills (None: not both)."""
        path = self.paths.work(r, "unfilled")
        if self.pool is None or self.pool.source != "both" or not path.exists():
            return None
        return set(json.loads(path.read_text()))
