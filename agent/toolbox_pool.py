"""The pool path's tools: `select_rows` starts an improve run that picks the pool rows worth
labelling (a job, like improve: agent/toolbox_runs.py), and `add_labels` records a person's
labels for the rows it waits on and continues it (agent/pool_labels.py). Labels come as a
filled-in to-label file or as a list (the chat asks the user row by row and passes them).
Everything stays inside the workspace root, the run folder included."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, validate_call

from agent.jobs import JobInfo
from agent.pool_labels import LabelsAdded, add_labels
from agent.tool_args import (
    Anchor,
    Batch,
    Data,
    LabelBudget,
    Labeler,
    LabelsPath,
    PoolPath,
    RunDir,
    Seed,
    Strategy,
    TaskName,
)
from agent.tool_args import Rounds as RoundsArg
from agent.toolbox_runs import RunTools
from tools.errors import UsageError

if TYPE_CHECKING:
    from tools.rundir import RunConfig


class GivenLabel(BaseModel):
    row: int = Field(ge=0, description="the row id of the to-label file")
    label: int | None = Field(None, ge=0, le=1, description="0, 1, or null to skip the row")


LabelList = Annotated[list[GivenLabel], Field(max_length=500, description="labels for "
                                               "rows waiting in the run (the chat's answers)")]


class LabelsResult(BaseModel):
    added: LabelsAdded
    job: JobInfo | None = Field(None, description="the resumed run, when no row of the round "
                                "is still waiting (else it waits for the rest)")
    next: str


class PoolTools(RunTools):
    """select_rows and add_labels (they run through the improve tool's jobs)."""

    def _pool_config(self, cfg: RunConfig) -> dict[str, Any]:
        """The pool settings `select_rows` would have written for `cfg` (see RunTools)."""
        if cfg.pool is None:
            return {}
        p = cfg.pool
        where = "the run's config.json"
        checks: list[tuple[Any, Any]] = [(Strategy, p.select.strategy), (Batch, p.select.batch),
                                         (LabelBudget, p.budget), (Labeler, p.labeler)]
        for kind, value in checks:
            try:
                TypeAdapter(kind).validate_python(value)
            except ValidationError:
                raise UsageError(f"{where}: {value!r} is outside what select_rows accepts; "
                                 "continue the run on the command line") from None
        return {"pool": self._pool_source(str(self._file(p.path)), p.select.strategy,
                                          p.select.batch, p.budget, p.labeler)}

    def _pool_source(self, pool: str, strategy: str, batch: int, budget: int,
                     labeler: str) -> Any:
        from tools.pool.select import SelectSettings
        from tools.pool.source import PoolSource

        return PoolSource(path=pool, source="pool", labeler=labeler,  # type: ignore[arg-type]
                          budget=budget, select=SelectSettings(
                              strategy=strategy, batch=batch))  # type: ignore[arg-type]

    def _waiting(self, run: Any) -> str | None:
        from agent.pool_labels import waiting_round
        from tools.rundir import RunPaths

        r, waiting = waiting_round(run)
        return self.sandbox.rel(RunPaths(run).to_label(r)) if waiting else None

    @validate_call
    def select_rows(
        self, anchor: Anchor, data: Data, pool: PoolPath, run_dir: RunDir = "runs/pool",
        strategy: Strategy = "fac", batch: Batch = 25, label_budget: LabelBudget = 100,
        labeler: Labeler = "human", rounds: RoundsArg = 3, seed: Seed = 0,
        task: TaskName = "toxicity",
    ) -> JobInfo:
        """Pick the real rows of `pool` worth labelling next (by task-feature deficits with
        strategy fac, or a baseline), in rounds of `batch`: each round's labels retrain the
        model that scores the next round's pool. With labeler human the run pauses after
        each pick and the job's result names the to-label file: give the labels with
        add_labels.

        Takes minutes, so it starts a job and answers at once with its job_id: job_result
        (job_id, wait=50) waits for it."""
        from agent.runs import start_run

        run = self._run_folder(run_dir)
        cfg = self._tool_config(
            task=task, anchor=anchor, data=data, relevance="label", rounds=rounds,
            budget=40, top=5, per_feature=2, seed=seed,
            pool=self._pool_source(str(self._file(pool)), strategy, batch, label_budget,
                                   labeler))
        start_run(run, cfg, resume_hint="add_labels, or improve(resume=true)")
        return self._start_improve("select_rows", run, {
            "anchor": anchor, "data": data, "pool": pool, "run_dir": run_dir,
            "strategy": strategy, "batch": batch, "label_budget": label_budget,
            "labeler": labeler, "rounds": rounds, "seed": seed, "task": task})

    @validate_call
    def add_labels(
        self, run_dir: RunDir, labels_file: LabelsPath | None = None,
        labels: LabelList | None = None, rest_skip: bool = False,
    ) -> LabelsResult:
        """Record labels for the rows a select_rows run waits on, from a filled-in to-label
        file (`labels_file`: CSV or JSONL with row and label = 0, 1, skip, or empty for
        later) and/or a list of {row, label} (label null skips the row), then continue the
        run when no row of the round is still waiting. `rest_skip` skips every row still
        without a label so the round goes on. Rows already labelled are never asked again."""
        run = self.sandbox.resolve(run_dir, must_exist=True)
        self.sandbox.confine_tree(run)
        self._confined_config(run)
        file = self._file(labels_file) if labels_file is not None else None
        given = {x.row: x.label for x in labels or []}
        added = add_labels(run, given, file=file, rest_skip=rest_skip)
        rel = self.sandbox.rel(run)
        if added.waiting:
            return LabelsResult(added=added, next=(
                f"{added.waiting} rows of round {added.round} still wait: add_labels("
                f"run_dir={rel!r}, ...) with them (or rest_skip=true)"))
        job = self._start_improve("add_labels", run, {"run_dir": run_dir, "resume": True})
        return LabelsResult(added=added, job=job, next=(
            f"the run goes on in job {job.job_id}: job_result(job_id={job.job_id!r}, wait=50)"))
