"""The facsynth tools, implemented once: the methods of `Toolbox`.

Each tool is a thin call into the synthesis steps (tools/synthesis.py), the workspace or the
improve loop (agent/runs.py), with bounded, typed parameters (the Annotated types below) and
a pydantic result (agent/results.py); its docstring is what the chat model and MCP clients
read. agent/tool_registry.py turns these methods into the chat agent's and the MCP server's
tools. `Toolbox` holds what they share: the settings, the workspace root every path must stay
inside (`sandbox`, agent/sandbox.py), a lazily built `Workspace` (model, SAE, caches, feature
memory), the coverage reports per file pair (agent/coverage_cache.py) and a lazily opened LLM
(`open_llm`, closed by `close()`). Tests inject a pre-built workspace and a fake LLM.
Datasets must be existing files (never hub ids: nothing is downloaded here).

Mistakes in the arguments raise UsageError (PathRefused, DataError where apt). Long tools
(coverage, generate_and_verify, improve) take an optional progress callback
`progress(message, done, total)`; `done` only grows within one call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, validate_call

from agent.coverage_cache import CoverageCache
from agent.llm import LazyLLM
from agent.results import (
    CoverageSummary,
    DatasetSummary,
    ExampleRow,
    FeatureExplanation,
    FeatureHit,
    FeatureRelevance,
    FeatureSearch,
    GenerationResult,
    HitInfo,
    ImproveResult,
    LengthStats,
    MissingFeatures,
    MissingInfo,
    RoundInfo,
    RunReport,
    SampleInfo,
    SpanInfo,
)
from agent.sandbox import Sandbox
from tools.data import TextDataset, load_texts
from tools.errors import ConfigError, DataError, UsageError
from tools.rundir import write_rows
from tools.settings import Settings

if TYPE_CHECKING:
    from tools.coverage import CoverageReport
    from tools.workspace import Workspace

ProgressFn = Callable[[str, float, float | None], None]
"""progress(message, done, total)"""

# -- bounded parameter types: the tools' input schemas ----------------------------------------


def _path(description: str) -> Any:
    return Field(min_length=1, max_length=1024, description=description)


PathArg = Annotated[str, _path("a dataset file (JSONL, CSV or Parquet) in the workspace root")]
Anchor = Annotated[str, _path("the labelled anchor set (1 = harmful) that defines the task")]
Data = Annotated[str, _path("the dataset to measure against the anchor set")]
OutPath = Annotated[str, _path("the JSONL file kept rows go to (rejected ones beside it)")]
RunDir = Annotated[str, _path("the folder of the improve run, inside the workspace root")]
Limit = Annotated[int, Field(ge=1, le=200, description="how many to return")]
Top = Annotated[int, Field(ge=1, le=50, description="missing features to show or target")]
FeatureId = Annotated[int, Field(ge=0, le=10_000_000, description="an SAE feature id")]
FeatureList = Annotated[list[FeatureId], Field(min_length=1, max_length=50,
                                               description="SAE feature ids to generate for")]
PerFeature = Annotated[int, Field(ge=1, le=20, description="samples generated per feature")]
Rounds = Annotated[int, Field(ge=1, le=10, description="synthesis rounds at most")]
Budget = Annotated[int, Field(ge=1, le=5000, description="generated samples at most")]
Query = Annotated[str, Field(min_length=1, max_length=500, description="what to look for")]
K = Annotated[int, Field(ge=1, le=50, description="results")]
Examples = Annotated[int, Field(ge=0, le=10, description="example rows to show")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="sampling temperature")]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1,
                            description="random seed: the same seed repeats the sampling")]
Relevance = Annotated[Literal["label", "llm", "auto"], Field(
    description="which missing features to target: label (the anchor labels' judge), llm "
    "(the LLM must also judge them relevant) or auto")]
Resume = Annotated[bool, Field(description="continue the run already in run_dir")]
TaskName = Annotated[Literal["toxicity", "reward", "steering"], Field(
    description="what the rows are: toxicity (text + 0/1 label), reward (prompt, chosen, "
    "rejected preference pairs) or steering (A/B question, matching, not_matching)")]


def _clip(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class _Progress:
    """A progress callback whose `done` only grows (MCP requires increasing progress)."""

    def __init__(self, progress: ProgressFn | None, total: float | None) -> None:
        self.progress = progress
        self.total = total
        self.done = 0.0

    def __call__(self, message: str, advance: float = 1.0) -> None:
        self.done += advance
        if self.progress is not None:
            self.progress(message, self.done, self.total)


class Toolbox:
    """The facsynth tools over one workspace root; see the module doc."""

    def __init__(
        self,
        settings: Settings | None = None,
        root: str | Path = ".",
        *,
        workspace: Workspace | None = None,
        llm: Any | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.sandbox = Sandbox(root)
        self.root = self.sandbox.root
        if workspace is not None:
            self.__dict__["workspace"] = workspace
        self._llm_injected = llm
        self._llm_open: Any | None = None
        self._llm_stack = contextlib.ExitStack()
        self._lock = threading.RLock()  # the model, SAE and caches: one user at a time
        self.coverage_cache = CoverageCache(self.settings, self.sandbox)

    # -- resources ------------------------------------------------------------------------

    @cached_property
    def workspace(self) -> Workspace:
        from tools.workspace import Workspace

        return Workspace(self.settings)

    def _open_llm(self) -> Any:
        if self._llm_injected is not None:
            return self._llm_injected
        if self._llm_open is None:
            from agent.llm import open_llm

            state = self.sandbox.state_dir
            state.mkdir(parents=True, exist_ok=True)
            self.sandbox.confine_tree(state)
            self.sandbox.state_path("vllm.log")  # a managed vLLM server appends its log there
            self._llm_open = self._llm_stack.enter_context(
                open_llm(self.settings, state, self.workspace))
        return self._llm_open

    def use_llm(self, llm: Any) -> None:
        """Use this already open LLM client (e.g. the chat's managed vLLM server)."""
        self._llm_injected = llm

    @property
    def llm(self) -> LazyLLM:
        return LazyLLM(self._open_llm)

    @property
    def llm_ready(self) -> bool:
        """An LLM client is open or was given (no server start ahead)."""
        return self._llm_injected is not None or self._llm_open is not None

    def close(self) -> None:
        self._llm_stack.close()
        self._llm_open = None

    def __enter__(self) -> Toolbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backend(self) -> str:
        if self._llm_injected is not None:
            return "injected"
        from agent.llm import choose_backend

        try:
            return choose_backend(self.settings)
        except ConfigError:
            return "unavailable"

    def _file(self, path: str) -> Path:
        """`path` as an existing dataset file inside the root."""
        real = self.sandbox.resolve(path, must_exist=True)
        if not real.is_file():
            raise DataError(f"{path}: not a file (a JSONL, CSV or Parquet dataset is expected)")
        return real

    def _dataset(self, path: str, *, labels: bool) -> tuple[Path, TextDataset]:
        real = self._file(path)
        return real, load_texts(real, require_labels=labels)

    def _probe_set(self, path: str, task: str, *, labels: bool) -> tuple[Path, TextDataset]:
        """The texts the probe reads from a file of `task`'s rows (a pair task's contrast:
        each pair's chosen side labelled 1, its rejected side 0)."""
        if task == "toxicity":
            return self._dataset(path, labels=labels)
        from tools.tasks import probe_dataset

        real = self._file(path)
        return real, probe_dataset(task, real)

    def _report(
        self, anchor: str, data: str, progress: ProgressFn | None = None,
        task: str = "toxicity",
    ) -> tuple[CoverageReport, TextDataset, TextDataset, bool, Path]:
        """(report, anchor set, data set, reused?, cache file) for the pair."""
        a_path, a = self._probe_set(anchor, task, labels=True)
        d_path, d = self._probe_set(data, task, labels=False)
        fp, report = self.coverage_cache.lookup(a_path, d_path, task)
        cache = self.coverage_cache.file(a_path, d_path, task)
        if report is not None:
            return report, a, d, True, cache
        step = _Progress(progress, float(len(a) + len(d)))
        with self._lock:
            report = self.workspace.coverage(a, d, lambda n: step("probing", n))
        self.coverage_cache.store(a_path, d_path, fp, report, task)
        return report, a, d, False, cache

    def _missing_info(self, report: CoverageReport, limit: int, spans: int) -> list[MissingInfo]:
        chosen = report.missing[:limit]
        with self._lock:
            known = self.workspace.memory.get_many([m.feature for m in chosen])
        return [
            MissingInfo(
                feature=m.feature, pos_support=m.pos_support, neg_support=m.neg_support,
                log_odds=round(m.log_odds, 3),
                summary=known[m.feature].summary if m.feature in known else None,
                spans=[SpanInfo(text=_clip(s.text, 160), activation=round(s.activation, 3))
                       for s in m.spans[:spans]],
            )
            for m in chosen
        ]

    # -- the tools ------------------------------------------------------------------------

    @validate_call
    def describe_dataset(self, path: PathArg, examples: Examples = 3) -> DatasetSummary:
        """Rows, label balance (1 = harmful), text lengths, duplicates and a few example rows
        of a dataset file (JSONL, CSV or Parquet) in the workspace root."""
        real, d = self._dataset(path, labels=False)
        labels = d.labels
        pos = sum(1 for y in labels or [] if y == 1)
        neg = len(labels) - pos if labels is not None else 0
        seen: set[str] = set()
        dups = 0
        for t in d.texts:
            key = " ".join(t.lower().split())
            dups += key in seen
            seen.add(key)
        n = len(d)
        k = min(examples, n)
        rows = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
        return DatasetSummary(
            path=self.sandbox.rel(real), rows=n, labelled=labels is not None, positives=pos,
            negatives=neg, positive_share=round(pos / n, 4) if labels is not None and n else None,
            chars=LengthStats.of([len(t) for t in d.texts]),
            words=LengthStats.of([len(t.split()) for t in d.texts]), duplicates=dups,
            examples=[ExampleRow(row=i, text=_clip(d.texts[i]),
                                 label=labels[i] if labels is not None else None) for i in rows],
        )

    @validate_call
    def coverage(
        self, anchor: Anchor, data: Data, top: Top = 10, task: TaskName = "toxicity",
        progress: ProgressFn | None = None,
    ) -> CoverageSummary:
        """Feature Activation Coverage (FAC) of `data` against the task features of the
        labelled `anchor` set, with the top missing features and a span that activates each.

        The report is cached per anchor/data pair and task until either file changes."""
        report, _, _, cached, cache = self._report(anchor, data, progress, task)
        return CoverageSummary(
            anchor=anchor, data=data, fac=round(report.fac, 4),
            fac_graded=round(report.fac_graded, 4), n_task=report.n_task,
            n_covered=report.n_covered, n_missing=len(report.missing),
            n_deficits=len(report.deficits),
            anchor_fac=round(report.anchor_fac, 4), n_anchor=report.n_anchor,
            n_data=report.n_data, rule=report.rule.describe(report.delta_used),
            saturated=report.saturated, cached=cached, report_path=self.sandbox.rel(cache),
            top_missing=self._missing_info(report, top, spans=1),
        )

    @validate_call
    def missing_features(self, anchor: Anchor, data: Data, limit: Limit = 20,
                         task: TaskName = "toxicity") -> MissingFeatures:
        """The task features `data` never activates (most task-specific first), each with its
        strongest anchor spans and its summary when known."""
        report, *_ = self._report(anchor, data, task=task)
        return MissingFeatures(
            anchor=anchor, data=data, fac=round(report.fac, 4),
            fac_graded=round(report.fac_graded, 4), n_missing=len(report.missing),
            features=self._missing_info(report, limit, spans=3),
        )

    @validate_call
    def search_features(self, query: Query, k: K = 10) -> FeatureSearch:
        """Search the feature memory (the features interpreted so far) by meaning, e.g.
        'weapons' or 'insults'."""
        with self._lock:
            memory = self.workspace.memory
            hits = memory.search(query, k)
            size = len(memory)
        return FeatureSearch(
            query=query, memory_size=size,
            hits=[FeatureHit(feature=r.feature, similarity=round(s, 4), summary=r.summary,
                             interpretable=r.interpretable, relevance=r.relevance)
                  for r, s in hits],
            note=None if size else "the feature memory is empty: explain_feature or "
            "generate_and_verify interpret features and remember them",
        )

    @validate_call
    def explain_feature(self, anchor: Anchor, data: Data, feature: FeatureId
                        ) -> FeatureExplanation:
        """What one SAE feature responds to (a summary), its strongest anchor spans and its
        relevance to the task (support on harmful vs benign rows, missing or not).

        The summary comes from the feature memory, else the LLM writes it from the spans."""
        from tools.coverage import MissingFeature, feature_stats
        from tools.synthesis import FALLBACK, interpret_missing, span_finder

        report, a, d, _, _ = self._report(anchor, data)
        ws = self.workspace
        s = self.settings
        with self._lock:
            if feature >= ws.sae.d_sae:
                raise UsageError(
                    f"feature {feature}: this SAE has features 0..{ws.sae.d_sae - 1}")
            measured = ws.measure(a, d)
            assert a.labels is not None
            pos, neg, lo = feature_stats(measured.anchor_active, a.labels, s.judge.smoothing)
            spans = span_finder(ws, a)([feature], max(s.top_spans, 3))[feature]
            known = ws.memory.get_many([feature]).get(feature)
        missing = next((m for m in report.missing if m.feature == feature), None)
        source: Literal["memory", "interpreted", "top-span"] = "memory"
        record = known
        if record is None:
            if not spans:
                raise UsageError(f"feature {feature} never fires on the anchor set: there is "
                                 "nothing to explain it by")
            one = MissingFeature(feature=feature, pos_support=int(pos[feature]),
                                 neg_support=int(neg[feature]), log_odds=float(lo[feature]),
                                 anchor_max=spans[0].activation, spans=spans)
            with self._lock:
                found = interpret_missing(report.model_copy(update={"missing": [one]}),
                                          self.llm, ws, limit=1, relevance="label")
            record = found.features[0].record
            source = "top-span" if record.prompt_version == FALLBACK else "interpreted"
        return FeatureExplanation(
            feature=feature, summary=record.summary, source=source,
            interpretable=record.interpretable, confidence=record.confidence,
            spans=[SpanInfo(text=_clip(x.text, 160), activation=round(x.activation, 3))
                   for x in spans],
            relevance=FeatureRelevance(
                task_feature=bool(measured.task[feature]), missing=missing is not None,
                pos_support=int(pos[feature]), neg_support=int(neg[feature]),
                log_odds=round(float(lo[feature]), 3),
                llm_verdict=record.relevance.get("llm"),
            ),
        )

    @validate_call
    def generate_and_verify(
        self, anchor: Anchor, data: Data, features: FeatureList, per_feature: PerFeature = 2,
        out: OutPath = "synthetic.jsonl", temperature: Temperature = 0.8, seed: Seed = 0,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        """Write `per_feature` new samples for each listed missing feature and keep only those
        that activate their feature (and are no duplicates); kept rows go to `out` (JSONL),
        rejected ones with the reason beside it.

        Takes minutes."""
        import asyncio

        from tools.generate import GenerateSettings, agenerate
        from tools.synthesis import interpret_missing, verify_samples

        started = time.monotonic()
        out_path = self.sandbox.resolve(out)
        if out_path.suffix != ".jsonl":
            raise UsageError(f"{out}: the output must be a .jsonl file")
        rejected_path = self.sandbox.resolve(out_path.with_name(out_path.stem + ".rejected.jsonl"))
        if rejected_path == out_path:
            raise UsageError(f"{out}: its rejected-rows file {rejected_path.name} is the same "
                             "file; choose another output")
        report, a, d, _, _ = self._report(anchor, data)
        inputs = {self.sandbox.resolve(anchor), self.sandbox.resolve(data)}
        if out_path in inputs or rejected_path in inputs:
            raise UsageError(f"{out}: would overwrite an input dataset; choose another file")
        by_id = {m.feature: m for m in report.missing}
        wanted = list(dict.fromkeys(features))
        unknown = [f for f in wanted if f not in by_id]
        if unknown:
            some = ", ".join(str(m.feature) for m in report.missing[:10])
            raise UsageError(
                f"features {unknown} are not missing task features of {data} "
                f"(missing ones, most task-specific first: {some or 'none'})")
        total = len(wanted) * per_feature
        step = _Progress(progress, float(total + len(wanted) + 1))
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
            examples=[SampleInfo(feature=v.sample.provenance.feature, text=_clip(v.sample.text),
                                 activation=round(v.activation, 3), reason=v.reason)
                      for v in shown],
            seconds=round(time.monotonic() - started, 1),
        )

    @validate_call
    def improve(
        self, anchor: Anchor, data: Data, run_dir: RunDir = "runs/improve", rounds: Rounds = 1,
        budget: Budget = 40, top: Top = 5, per_feature: PerFeature = 2,
        relevance: Relevance = "auto", resume: Resume = False, seed: Seed = 0,
        task: TaskName = "toxicity", progress: ProgressFn | None = None,
    ) -> ImproveResult:
        """Run self-improvement rounds in `run_dir`: coverage, interpret, generate, verify,
        train the task's model (a detector, a reward head, a steering vector), evaluate;
        stops when FAC stops improving or at `rounds`/`budget`.

        Takes minutes. With resume=true it continues the run in `run_dir` with that run's
        own settings (the other arguments are then ignored)."""
        from agent.runs import run_loop, start_run
        from tools.rundir import History, LoopSettings, RunConfig, RunSettings

        started = time.monotonic()
        run = self.sandbox.resolve(run_dir)
        if run == self.root:
            raise UsageError("run_dir: give a folder for the run, not the workspace root")
        self.sandbox.confine_tree(run)
        if resume:
            cfg = RunConfig.read(run)
        else:
            s = self.settings
            cfg = start_run(run, RunConfig(
                task=task, anchor=str(self._file(anchor)), data=str(self._file(data)),
                relevance=relevance,
                settings=RunSettings(model=s.model, sae=s.sae, generator=s.generator),
                loop=LoopSettings(max_rounds=rounds, budget=budget, top=top, seed=seed,
                                  per_feature=per_feature)), resume_hint="resume=true")
        step = _Progress(progress, float(6 + 8 * cfg.loop.max_rounds))
        with self._lock:
            state = run_loop(run, cfg, resume, workspace=self.workspace, llm=self.llm,
                             before=lambda node, r: step(f"round {r}: {node}"))
        history = History.load(run)
        infos = [RoundInfo.of(r) for r in history.rounds]
        return ImproveResult(
            run_dir=self.sandbox.rel(run), rounds=infos,
            fac_start=infos[0].fac if infos else 0.0, fac_end=infos[-1].fac if infos else 0.0,
            stop_reason=state.get("stop_reason"), seconds=round(time.monotonic() - started, 1),
            next=f"report(run_dir={self.sandbox.rel(run)!r}) writes the HTML report",
        )

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
