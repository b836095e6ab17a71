"""The long tools and their jobs: `generate_and_verify` and `improve` start a job and answer
with its `JobInfo` at once (agent/jobs.py); `job_status`, `job_result`, `cancel_job` and
`list_jobs` complete them; `report` writes a run's HTML report.

Arguments are checked before the job starts, so a bad path or bound fails the call itself.
A run folder read back on resume is checked like the arguments that made it: the improve
tool continues only a run it could have started itself (its paths inside the root, its
bounds, the server's model and SAE); anything else is refused with the command that
continues it on the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError, validate_call

from agent.jobs import JobInfo, JobList, Work
from agent.results import (
    GenerationResult,
    HitInfo,
    ImproveResult,
    RoundInfo,
    RunReport,
    SampleInfo,
    WaitingRow,
)
from agent.tool_args import (
    Anchor,
    Budget,
    Data,
    FeatureList,
    JobId,
    OutPath,
    PerFeature,
    ProgressFn,
    Relevance,
    Resume,
    RunDir,
    Seed,
    TaskName,
    Temperature,
    Top,
    Wait,
)
from agent.tool_args import (
    Rounds as RoundsArg,
)
from agent.toolbox_base import ToolboxBase, clip
from tools.errors import UsageError
from tools.rundir import write_rows

if TYPE_CHECKING:
    from tools.rundir import RunConfig


class RunTools(ToolboxBase):
    """The tools that write: generation, improve runs, reports, and the jobs."""

    # -- generation -------------------------------------------------------------------------
    @validate_call
    def generate_and_verify(
        self, anchor: Anchor, data: Data, features: FeatureList, per_feature: PerFeature = 2,
        out: OutPath = "synthetic.jsonl", temperature: Temperature = 0.8, seed: Seed = 0,
    ) -> JobInfo:
        """Write `per_feature` new samples for each listed missing feature and keep only those
        that activate their feature (and are no duplicates); kept rows go to `out` (JSONL),
        rejected ones with the reason beside it.

        Takes minutes, so it starts a job and answers at once with its job_id: job_result
        (job_id, wait=50) waits for it and returns the generation result."""
        out_path = self.sandbox.resolve(out)
        if out_path.suffix != ".jsonl":
            raise UsageError(f"{out}: the output must be a .jsonl file")
        rejected_path = self.sandbox.resolve(out_path.with_name(out_path.stem + ".rejected.jsonl"))
        if rejected_path == out_path:
            raise UsageError(f"{out}: its rejected-rows file {rejected_path.name} is the same "
                             "file; choose another output")
        inputs = {self._file(anchor), self._file(data)}
        if out_path in inputs or rejected_path in inputs:
            raise UsageError(f"{out}: would overwrite an input dataset; choose another file")
        args = {"anchor": anchor, "data": data, "features": features,
                "per_feature": per_feature, "out": out, "temperature": temperature, "seed": seed}
        return self.jobs.start("generate_and_verify", args)

    def _job_work(self, tool: str, arguments: dict[str, Any]) -> Work:
        """A job's work from its tool and arguments, as the tool started it (a worker
        process rebuilds it from the job's record)."""
        a = arguments
        if tool == "generate_and_verify":
            out_path = self.sandbox.resolve(a["out"])
            rejected = self.sandbox.resolve(out_path.with_name(out_path.stem +
                                                                ".rejected.jsonl"))
            return lambda progress: self._generate(
                a["anchor"], a["data"], a["features"], a["per_feature"], out_path, rejected,
                a["temperature"], a["seed"], progress)
        if tool in ("improve", "select_rows", "add_labels"):
            run = self._run_folder(a["run_dir"])
            return lambda progress: self._improve(run, self._confined_config(run),
                                                  bool(a.get("resume")), progress)
        return super()._job_work(tool, arguments)

    def _generate(self, anchor: str, data: str, features: list[int], per_feature: int,
                  out_path: Path, rejected_path: Path, temperature: float, seed: int,
                  progress: ProgressFn | None) -> GenerationResult:
        import asyncio

        from agent.toolbox_base import StepProgress
        from tools.generate import GenerateSettings, agenerate
        from tools.synthesis import interpret_missing, verify_samples

        started = time.monotonic()
        report, a, d, _, _ = self._report(anchor, data, progress)
        by_id = {m.feature: m for m in report.missing}
        wanted = list(dict.fromkeys(features))
        unknown = [f for f in wanted if f not in by_id]
        if unknown:
            some = ", ".join(str(m.feature) for m in report.missing[:10])
            raise UsageError(
                f"features {unknown} are not missing task features of {data} "
                f"(missing ones, most task-specific first: {some or 'none'})")
        total = len(wanted) * per_feature
        step = StepProgress(progress, float(total + len(wanted) + 1))
        chosen = report.model_copy(update={"missing": [by_id[f] for f in wanted]})
        with self._lock:
            found = interpret_missing(chosen, self.llm, self.workspace, limit=len(wanted),
                                      relevance="label")
        step(f"interpreted {len(wanted)} features", len(wanted))
        targets = found.targets
        gs = GenerateSettings(per_feature=per_feature, temperature=temperature, seed=seed)
        made = [0]

        def on_sample(_: Any) -> None:
            made[0] += 1
            step(f"generated {made[0]}/{total}")

        samples = asyncio.run(agenerate(targets, self.llm, gs,  # type: ignore[arg-type]
                                        on_sample=on_sample))
        with self._lock:
            result = verify_samples(self.workspace, a, d, samples)
        step("verified")
        write_rows(out_path, rejected_path, result.kept, result.rejected)
        shown = result.kept[:3] + result.rejected[:2]
        return GenerationResult(
            features=[t.feature for t in targets],
            skipped=[f for f in wanted if f not in {t.feature for t in targets}],
            generated=len(samples), kept=len(result.kept), rejected=len(result.rejected),
            hit_rate=round(result.hit_rate, 4),
            per_feature={f: HitInfo(generated=h.generated, activated=h.activated, kept=h.kept)
                         for f, h in result.per_feature.items()},
            kept_path=self.sandbox.rel(out_path), rejected_path=self.sandbox.rel(rejected_path),
            examples=[SampleInfo(feature=v.sample.provenance.feature, text=clip(v.sample.text),
                                 activation=round(v.activation, 3), reason=v.reason)
                      for v in shown],
            seconds=round(time.monotonic() - started, 1),
        )

    # -- improve runs -----------------------------------------------------------------------
    def _run_folder(self, run_dir: str) -> Path:
        run = self.sandbox.resolve(run_dir)
        if run == self.root:
            raise UsageError("run_dir: give a folder for the run, not the workspace root")
        self.sandbox.confine_tree(run)
        return run

    def _tool_config(self, *, task: str, anchor: str, data: str, relevance: str, rounds: int,
                     budget: int, top: int, per_feature: int, seed: int,
                     **extra: Any) -> RunConfig:
        """The RunConfig the improve tool writes for these arguments (paths checked inside
        the root)."""
        from tools.rundir import LoopSettings, RunConfig, RunSettings

        s = self.settings
        return RunConfig(
            task=task, anchor=str(self._file(anchor)), data=str(self._file(data)),
            relevance=relevance,  # type: ignore[arg-type]
            settings=RunSettings(model=s.model, sae=s.sae, generator=s.generator),
            loop=LoopSettings(max_rounds=rounds, budget=budget, top=top, seed=seed,
                              per_feature=per_feature), **extra)

    def _confined_config(self, run: Path) -> RunConfig:
        """The run's config.json, accepted only when the improve tool could have written it
        (see the module doc): a folder planted in the root cannot point the server at files
        outside it, nor past the tools' bounds."""
        from tools.rundir import RunConfig

        cfg = RunConfig.read(run)
        where = f"{self.sandbox.rel(run)}/config.json"
        bounded: dict[str, tuple[Any, Any]] = {
            "rounds": (RoundsArg, cfg.loop.max_rounds), "budget": (Budget, cfg.loop.budget),
            "top": (Top, cfg.loop.top), "per_feature": (PerFeature, cfg.loop.per_feature),
            "seed": (Seed, cfg.loop.seed), "task": (TaskName, cfg.task),
            "relevance": (Relevance, cfg.relevance)}
        values: dict[str, Any] = {}
        for name, (kind, value) in bounded.items():
            try:
                values[name] = TypeAdapter(kind).validate_python(value)
            except ValidationError:
                raise UsageError(f"{where}: {name} {value!r} is outside what the improve tool "
                                 "accepts; continue this run on the command line (facsynth "
                                 f"improve --resume {self.sandbox.rel(run)})") from None
        expected = self._tool_config(anchor=cfg.anchor, data=cfg.data, **values,
                                     **self._pool_config(cfg))
        if expected != cfg:
            given, wanted = cfg.model_dump(), expected.model_dump()
            differ = sorted(k for k in given if given[k] != wanted[k])
            raise UsageError(f"{where}: not a run the improve tool started here (it differs in "
                             f"{', '.join(differ)}); continue it on the command line (facsynth "
                             f"improve --resume {self.sandbox.rel(run)})")
        return cfg

    def _pool_config(self, cfg: RunConfig) -> dict[str, Any]:
        """The pool settings of `cfg` as the tool would write them (none: the base tools)."""
        return {}

    @validate_call
    def improve(
        self, anchor: Anchor, data: Data, run_dir: RunDir = "runs/improve",
        rounds: RoundsArg = 1, budget: Budget = 40, top: Top = 5,
        per_feature: PerFeature = 2, relevance: Relevance = "auto", resume: Resume = False,
        seed: Seed = 0, task: TaskName = "toxicity",
    ) -> JobInfo:
        """Run self-improvement rounds in `run_dir`: coverage, interpret, generate, verify,
        train the task's model (a detector, a reward head, a steering vector), evaluate;
        stops when FAC stops improving or at `rounds`/`budget`.

        Takes minutes, so it starts a job and answers at once with its job_id: job_result
        (job_id, wait=50) waits for it and returns the rounds. With resume=true it continues
        the run in `run_dir` with that run's own settings (the other arguments are then
        ignored), e.g. after cancel_job or a server restart."""
        from agent.runs import start_run

        run = self._run_folder(run_dir)
        if resume:
            self._confined_config(run)
        else:
            start_run(run, self._tool_config(
                task=task, anchor=anchor, data=data, relevance=relevance, rounds=rounds,
                budget=budget, top=top, per_feature=per_feature, seed=seed),
                resume_hint="resume=true")
        return self._start_improve("improve", run, {
            "anchor": anchor, "data": data, "run_dir": run_dir, "rounds": rounds,
            "budget": budget, "top": top, "per_feature": per_feature, "relevance": relevance,
            "resume": resume, "seed": seed, "task": task})

    def _start_improve(self, tool: str, run: Path, args: dict[str, Any]) -> JobInfo:
        return self.jobs.start(tool, args, run_dir=self.sandbox.rel(run), resumable=True)

    def _improve(self, run: Path, cfg: RunConfig, resume: bool,
                 progress: ProgressFn | None) -> ImproveResult:
        from agent.runs import run_loop
        from agent.toolbox_base import StepProgress
        from tools.rundir import History

        started = time.monotonic()
        step = StepProgress(progress, float(6 + 8 * cfg.loop.max_rounds))

        def bar(what: str, total: int) -> Any:
            def advance(n: int) -> None:
                step.tick(f"round {step.round}: {what}")
            return advance

        def before(node: str, r: int) -> None:
            step.round = r
            step(f"round {r}: {node}")

        with self._lock:
            state = run_loop(run, cfg, resume or self._started(run), workspace=self.workspace,
                             llm=self.llm, before=before, progress=bar)
        history = History.load(run)
        infos = [RoundInfo.of(r) for r in history.rounds]
        paused = state.get("__interrupt__")
        waiting = self._waiting(run) if paused else None
        return ImproveResult(
            run_dir=self.sandbox.rel(run), rounds=infos,
            fac_start=infos[0].fac if infos else 0.0, fac_end=infos[-1].fac if infos else 0.0,
            stop_reason=state.get("stop_reason"), seconds=round(time.monotonic() - started, 1),
            waiting_for_labels=waiting, to_label=self._waiting_rows(run) if waiting else [],
            next=(f"add_labels(run_dir={self.sandbox.rel(run)!r}, labels=FILE) with the rows "
                  "of the to-label file filled in" if paused else
                  f"report(run_dir={self.sandbox.rel(run)!r}) writes the HTML report"),
        )

    def _started(self, run: Path) -> bool:
        """The run folder has checkpoints already (a job restarted on it resumes)."""
        from tools.rundir import RunPaths

        return RunPaths(run).checkpoints.exists()

    def _waiting(self, run: Path) -> str | None:
        """The pool path's newest to-label file, when the run waits for labels."""
        return None

    def _waiting_rows(self, run: Path, limit: int = 50) -> list[WaitingRow]:
        """The rows of the newest to-label file (the chat asks the user about each)."""
        from tools.pool.labels import ToLabel
        from tools.rundir import read_samples

        files = sorted((run / "to-label").glob("round-*.jsonl"),
                       key=lambda p: int(p.name.split(".")[0].split("-")[1]))
        rows = read_samples(files[-1], ToLabel) if files else []
        return [WaitingRow(row=r.row, text=clip(r.text, 400), fills=clip(r.fills, 300),
                           score=r.score) for r in rows[:limit]]

    @validate_call
    def report(self, run_dir: RunDir) -> RunReport:
        """Write the HTML report of an improve run and summarise its rounds."""
        from tools.report import write_report
        from tools.rundir import History

        run = self.sandbox.resolve(run_dir, must_exist=True)
        self.sandbox.confine_tree(run)
        path = write_report(run)
        return RunReport(run_dir=self.sandbox.rel(run), report_path=self.sandbox.rel(path),
                         rounds=[RoundInfo.of(r) for r in History.load(run).rounds])

    # -- jobs -------------------------------------------------------------------------------
    @validate_call
    def job_status(self, job_id: JobId) -> JobInfo:
        """A job's status (running, done, failed, cancelled, interrupted), progress, round,
        last progress line and run folder; never waits."""
        return self.jobs.status(job_id)

    @validate_call
    def job_result(self, job_id: JobId, wait: Wait = 0.0,
                   progress: ProgressFn | None = None) -> JobInfo:
        """A job with its result once done (the long tool's own result, in `result`); waits
        up to `wait` seconds (at most 50) for it to end, sending progress meanwhile. Call it
        again while the status is still running."""
        return self.jobs.result(job_id, wait, progress)

    @validate_call
    def cancel_job(self, job_id: JobId) -> JobInfo:
        """Ask a running job to stop at its next step. A cancelled improve run keeps what
        it did: improve(run_dir=..., resume=true) continues it."""
        return self.jobs.cancel(job_id)

    @validate_call
    def list_jobs(self) -> JobList:
        """Every job started in this workspace root, newest first (finished ones too, and
        those a server restart interrupted)."""
        return JobList(jobs=self.jobs.list())
