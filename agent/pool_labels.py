"""Labels a person gives to a paused pool run: `facsynth label RUN FILE`, `improve --resume
RUN --labels FILE`, the chat and the MCP tool `add_labels` all come through `add_labels`.

The run waits in the label node of its newest round with picks (agent/pool_steps.py). The
given labels are checked against that round's rows still waiting (tools/pool/labels.py
`read_labels`: file and line for every problem), then appended to the label journal; the
caller resumes the run (agent/runs.py `run_loop`), which asks again only for rows still
waiting. Recording first and resuming second means a kill between the two loses nothing:
the journal already holds the labels when the run resumes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from tools.errors import UsageError
from tools.pool.labels import LabelJournal, LabelRecord, PoolPick, read_labels
from tools.rundir import RunConfig, RunPaths, read_samples


class LabelsAdded(BaseModel):
    round: int
    labelled: int = Field(description="rows given a 0/1 label now")
    skipped: int = Field(description="rows marked skip now (dropped from the round)")
    ignored: int = Field(0, description="lines left empty (those rows stay queued)")
    waiting: int = Field(description="rows of the round still waiting for a label")


def waiting_round(run: Path) -> tuple[int, list[PoolPick]]:
    """(round, its picks still without a label) of the newest round that has picks."""
    paths = RunPaths(run)
    rounds = sorted(int(p.name.split(".")[0].split("-")[1])
                    for p in (run / "work").glob("round-*.picks.jsonl"))
    if not rounds:
        raise UsageError(f"{run}: no pool rows were picked yet (the run has not reached its "
                         "first select step)")
    r = rounds[-1]
    known = LabelJournal(paths.labels).read()
    picks = read_samples(paths.picks(r), PoolPick)
    return r, [p for p in picks if p.row not in known]


def add_labels(run: Path, given: dict[int, int | None] | None = None, *,
               file: Path | None = None, rest_skip: bool = False) -> LabelsAdded:
    """Record labels for the waiting rows of `run`: from `file` (a filled-in to-label file)
    and/or `given` (row -> 0, 1 or None for skip); `rest_skip` skips every row still
    waiting after them. Nothing already labelled is asked or changed."""
    cfg = RunConfig.read(run)
    if cfg.pool is None or cfg.pool.labeler != "human":
        raise UsageError(f"{run}: not a pool run labelled by a person (--pool with --labeler "
                         "human); its labels come from elsewhere")
    r, waiting = waiting_round(run)
    open_rows = {p.row for p in waiting}
    labels: dict[int, int | None] = {}
    empty = 0
    if file is not None:
        labels, empty = read_labels(file, open_rows)
    for row, label in (given or {}).items():
        if row not in open_rows:
            raise UsageError(f"row {row} is not waiting for a label in round {r} of {run} "
                             f"({len(open_rows)} rows are)")
        if label not in (0, 1, None):
            raise UsageError(f"row {row}: label {label!r}: give 0, 1 or skip")
        labels[row] = label
    if rest_skip:
        labels.update({row: None for row in open_rows if row not in labels})
    LabelJournal(RunPaths(run).labels).add(
        LabelRecord(row=row, label=label, round=r, source="human")
        for row, label in sorted(labels.items()))
    return LabelsAdded(round=r, labelled=sum(v is not None for v in labels.values()),
                       skipped=sum(v is None for v in labels.values()), ignored=empty,
                       waiting=len(open_rows) - len(labels))
