"""The tools of the chat agent and the MCP server, implemented once.

Each tool is a thin call into the pipeline (agent/pipeline.py), the workspace or the improve
loop (agent/runs.py), with bounded, typed parameters and a pydantic result. `Toolbox` holds
what they share: the settings, a workspace root every path argument must stay inside, a
lazily built `Workspace` (model, SAE, caches, feature memory) and a lazily opened LLM
(`open_llm`, closed by `close()`). Tests inject a pre-built workspace and a fake LLM.

Paths: every path argument is resolved against the root (relative) or taken as given
(absolute), with symlinks followed; anything that ends up outside the root is refused with
`PathRefused`. Datasets must be existing files (never hub ids: nothing is downloaded here).
Everything the tools write stays inside the root too: the state folder `ROOT/.facsynth`
(coverage cache, chat sessions, the managed LLM server's log) must be a real folder in the
root, not a symlink, and every state file goes through the same check (`state_path`); the
folders the pipeline writes into by file name (the state folder, an improve run folder) are
refused when a symlink inside them leads out of the root (`confine_tree`); files are
replaced atomically through a random temp name (`tools.data.write_text_atomic`).

Long tools (coverage, generate_and_verify, improve) take an optional progress callback
`progress(message, done, total)`; `done` only grows within one call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, validate_call

from agent.config import Settings
from tools.data import TextDataset, load_texts, write_text_atomic
from tools.errors import ConfigError, DataError, FacsynthError

if TYPE_CHECKING:
    from agent.workspace import Workspace
    from tools.coverage import CoverageReport
    from tools.report import RoundRecord

STATE_DIR = ".facsynth"
"""Per-root state: coverage cache, chat sessions, the managed LLM server's log."""

ProgressFn = Callable[[str, float, float | None], None]
"""progress(message, done, total)"""

# -- bounded parameter types, shared by the chat tools and the MCP tools ----------------------

PathArg = Annotated[str, Field(min_length=1, max_length=1024,
                               description="a path inside the workspace root")]
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
Relevance = Literal["label", "llm", "auto"]


class PathRefused(FacsynthError):
    """A path argument points outside the workspace root."""


# -- results ------------------------------------------------------------------------------


class LengthStats(BaseModel):
    min: int
    median: float
    mean: float
    max: int


class ExampleRow(BaseModel):
    row: int
    text: str
    label: int | None = None


class DatasetSummary(BaseModel):
    path: str
    rows: int
    labelled: bool
    positives: int = Field(description="rows labelled 1")
    negatives: int = Field(description="rows labelled 0")
    positive_share: float | None
    chars: LengthStats
    words: LengthStats
    duplicates: int = Field(description="rows repeating an earlier row (case/space-insensitive)")
    examples: list[ExampleRow]


class SpanInfo(BaseModel):
    text: str
    activation: float


class MissingInfo(BaseModel):
    feature: int
    pos_support: int = Field(description="positive anchor rows the feature is active on")
    neg_support: int = Field(description="negative anchor rows the feature is active on")
    log_odds: float = Field(description="task relevance: positives vs negatives")
    summary: str | None = Field(None, description="from the feature memory, when known")
    spans: list[SpanInfo] = Field(description="anchor spans that activate it most")


class CoverageSummary(BaseModel):
    anchor: str
    data: str
    fac: float = Field(description="task features covered by the data / task features")
    n_task: int
    n_covered: int
    n_missing: int
    anchor_fac: float
    n_anchor: int
    n_data: int
    rule: str = Field(description="when a feature counts as active")
    saturated: bool
    cached: bool = Field(description="reused a report of the same files and settings")
    report_path: str
    top_missing: list[MissingInfo]


class MissingFeatures(BaseModel):
    anchor: str
    data: str
    fac: float
    n_missing: int
    features: list[MissingInfo]


class FeatureHit(BaseModel):
    feature: int
    similarity: float
    summary: str
    interpretable: bool
    relevance: dict[str, str]


class FeatureSearch(BaseModel):
    query: str
    memory_size: int
    hits: list[FeatureHit]
    note: str | None = None


class FeatureRelevance(BaseModel):
    task_feature: bool = Field(description="judged relevant to the task by the label judge")
    missing: bool = Field(description="a task feature the data never activates")
    pos_support: int
    neg_support: int
    log_odds: float
    llm_verdict: str | None = None


class FeatureExplanation(BaseModel):
    feature: int
    summary: str
    source: Literal["memory", "interpreted", "top-span"] = Field(
        description="memory: known before; interpreted: the LLM just summarised it; top-span: "
        "the LLM gave no valid summary, so its strongest span describes it")
    interpretable: bool
    confidence: float
    spans: list[SpanInfo]
    relevance: FeatureRelevance


class Estimate(BaseModel):
    samples: int = Field(description="samples the LLM will be asked for")
    seconds: float = Field(description="rough wall time")
    backend: str
    note: str


class SampleInfo(BaseModel):
    feature: int
    text: str
    activation: float
    reason: str


class HitInfo(BaseModel):
    generated: int
    activated: int
    kept: int


class GenerationResult(BaseModel):
    features: list[int] = Field(description="features samples were generated for")
    skipped: list[int] = Field(description="asked for, but judged uninterpretable")
    generated: int
    kept: int
    rejected: int
    hit_rate: float = Field(description="samples that activated their target / generated")
    per_feature: dict[int, HitInfo]
    kept_path: str
    rejected_path: str
    examples: list[SampleInfo]
    seconds: float


class RoundInfo(BaseModel):
    round: int
    fac: float
    n_missing: int
    generated: int
    kept: int
    hit_rate: float
    auprc: float | None
    n_train: int
    stop_reason: str | None


class ImproveResult(BaseModel):
    run_dir: str
    rounds: list[RoundInfo]
    fac_start: float
    fac_end: float
    stop_reason: str | None
    seconds: float
    next: str


class RunReport(BaseModel):
    run_dir: str
    report_path: str
    rounds: list[RoundInfo]


class Cancelled(BaseModel):
    cancelled: bool = True
    message: str


# -- helpers ------------------------------------------------------------------------------


def _stats(values: Sequence[int]) -> LengthStats:
    if not values:
        return LengthStats(min=0, median=0.0, mean=0.0, max=0)
    return LengthStats(min=min(values), median=float(statistics.median(values)),
                       mean=round(statistics.fmean(values), 1), max=max(values))


def _clip(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _round_info(rec: RoundRecord) -> RoundInfo:
    return RoundInfo(round=rec.round, fac=rec.fac, n_missing=rec.n_missing,
                     generated=rec.generated, kept=rec.kept, hit_rate=rec.hit_rate,
                     auprc=rec.metric.auprc if rec.metric else None, n_train=rec.n_train,
                     stop_reason=rec.stop_reason)


class _Steps:
    """A progress callback whose `done` only grows (MCP requires increasing progress)."""

    def __init__(self, progress: ProgressFn | None, total: float | None) -> None:
        self.progress = progress
        self.total = total
        self.done = 0.0

    def __call__(self, message: str, advance: float = 1.0) -> None:
        self.done += advance
        if self.progress is not None:
            self.progress(message, self.done, self.total)


class LazyLLM:
    """An LLM client that opens the real one on first use (see `agent.llm.LLMClient`)."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener

    @property
    def name(self) -> str:
        return str(self._opener().name)

    def chat(self, system: str, user: str) -> str:
        return str(self._opener().chat(system, user))

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        return str(await self._opener().achat(system, user, temperature=temperature, seed=seed))

    async def acomplete(self, prompt: str, *, temperature: float, seed: int,
                        max_tokens: int | None = None) -> str:
        return str(await self._opener().acomplete(prompt, temperature=temperature, seed=seed,
                                                  max_tokens=max_tokens))

    def with_json_schema(self, schema: dict[str, Any], name: str = "reply") -> Any:
        client = self._opener()
        constrain = getattr(client, "with_json_schema", None)
        return constrain(schema, name) if constrain is not None else client


# rough seconds per generated sample / per feature interpretation, by backend (2 CPU cores:
# README and STACK.md numbers); only for the estimate shown before long tools run
_GEN_S = {"endpoint": 1.0, "vllm": 0.6, "local": 2.0, "injected": 0.05}
_INTERP_S = {"endpoint": 2.0, "vllm": 1.0, "local": 8.0, "injected": 0.05}
_VLLM_START_S = 150.0
_ROUND_S = 20.0  # probing the new rows, training and evaluating the detector


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
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ConfigError(f"workspace root {root} is not a folder")
        if workspace is not None:
            self.__dict__["workspace"] = workspace
        self._llm_injected = llm
        self._llm_open: Any | None = None
        self._llm_stack = contextlib.ExitStack()
        self._lock = threading.RLock()  # the model, SAE and caches: one user at a time
        self._reports: dict[tuple[str, str], tuple[str, CoverageReport]] = {}
        if (self.root / STATE_DIR).exists() or (self.root / STATE_DIR).is_symlink():
            # before anything (the chat's session store, the vLLM log) opens files in it
            self.confine_tree(self.state_path())

    # -- resources ------------------------------------------------------------------------

    @cached_property
    def workspace(self) -> Workspace:
        from agent.workspace import Workspace

        return Workspace(self.settings)

    @property
    def state_dir(self) -> Path:
        """ROOT/.facsynth, checked by `state_path` (it may not exist yet)."""
        return self.state_path()

    def state_path(self, *parts: str) -> Path:
        """ROOT/.facsynth/<parts...>, confined to the root: PathRefused when the state folder
        is a symlink or not a folder, or when the path resolves outside the root."""
        state = self.root / STATE_DIR
        if state.is_symlink():
            raise PathRefused(
                f"{state}: the state folder is a symlink (to {os.readlink(state)}); facsynth "
                "keeps its state (coverage cache, chat sessions, logs) in a real folder inside "
                "the workspace root only: remove the link")
        if state.exists() and not state.is_dir():
            raise PathRefused(f"{state}: the state folder is not a folder; remove or move it")
        return self.resolve(state.joinpath(*parts))

    def confine_tree(self, top: Path) -> None:
        """PathRefused when a symlink anywhere under the folder `top` (symlinked folders
        inside the root included) leads out of the root: the pipeline writes files in such
        folders by name (journals, models, reports) and would follow it."""
        seen: set[Path] = set()
        stack = [top]
        while stack:
            folder = stack.pop()
            real = folder.resolve()
            if real in seen:
                continue
            seen.add(real)
            try:
                entries = list(os.scandir(folder))
            except (NotADirectoryError, FileNotFoundError):
                continue
            for entry in entries:
                path = Path(entry.path)
                if entry.is_symlink():
                    try:
                        self.resolve(path)
                    except PathRefused:
                        raise PathRefused(
                            f"{path}: a symlink out of the workspace root {self.root} (to "
                            f"{os.readlink(path)}); files facsynth writes must stay inside the "
                            "root: remove the link") from None
                if entry.is_dir():  # follows a symlink that stays inside the root
                    stack.append(path)

    def _open_llm(self) -> Any:
        if self._llm_injected is not None:
            return self._llm_injected
        if self._llm_open is None:
            from agent.llm import open_llm

            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.confine_tree(self.state_dir)
            self.state_path("vllm.log")  # a managed vLLM server appends its log there
            self._llm_open = self._llm_stack.enter_context(
                open_llm(self.settings, self.state_dir, self.workspace))
        return self._llm_open

    def use_llm(self, llm: Any) -> None:
        """Use this already open LLM client (e.g. the chat's managed vLLM server)."""
        self._llm_injected = llm

    @property
    def llm(self) -> LazyLLM:
        return LazyLLM(self._open_llm)

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

    # -- paths ----------------------------------------------------------------------------

    def resolve(self, path: str | Path, *, must_exist: bool = False) -> Path:
        """`path` inside the root (relative to it, or absolute), symlinks followed; refused
        when it ends up outside."""
        text = str(path)
        if "\x00" in text:
            raise PathRefused(f"{text!r}: not a valid path")
        given = Path(text).expanduser()
        candidate = given if given.is_absolute() else self.root / given
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError) as e:  # symlink loops
            raise PathRefused(f"{text}: cannot be resolved ({e})") from None
        if real != self.root and not real.is_relative_to(self.root):
            raise PathRefused(
                f"{text}: outside the workspace root {self.root} (paths must stay inside it; "
                "'..' and symlinks out of it are refused)")
        if must_exist and not real.exists():
            raise DataError(f"{text}: no such file in the workspace root {self.root}")
        return real

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    def _dataset(self, path: str, *, labels: bool) -> tuple[Path, TextDataset]:
        real = self.resolve(path, must_exist=True)
        if not real.is_file():
            raise DataError(f"{path}: not a file (a JSONL, CSV or Parquet dataset is expected)")
        return real, load_texts(real, require_labels=labels)

    # -- coverage, cached per (anchor, data) ---------------------------------------------

    def _fingerprint(self, *paths: Path) -> str:
        s = self.settings
        parts: dict[str, Any] = {
            "model": s.model, "sae": s.sae, "rule": s.activity_rule().model_dump(),
            "judge": s.judge.model_dump(), "max_tokens": s.max_tokens,
            "chat_template": s.chat_template, "top_spans": s.top_spans,
            "span_window": s.span_window,
            "files": [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _cache_file(self, anchor: Path, data: Path) -> Path:
        key = hashlib.sha256(f"{anchor}\n{data}".encode()).hexdigest()[:16]
        return self.state_path("coverage", f"{key}.json")

    def _report(
        self, anchor: str, data: str, progress: ProgressFn | None = None
    ) -> tuple[CoverageReport, TextDataset, TextDataset, bool, Path]:
        """(report, anchor set, data set, reused?, cache file) for the pair."""
        from tools.coverage import CoverageReport

        a_path, a = self._dataset(anchor, labels=True)
        d_path, d = self._dataset(data, labels=False)
        fp = self._fingerprint(a_path, d_path)
        cache = self._cache_file(a_path, d_path)
        held = self._reports.get((str(a_path), str(d_path)))
        if held and held[0] == fp:
            return held[1], a, d, True, cache
        if cache.exists():
            try:
                saved = json.loads(cache.read_text(encoding="utf-8"))
                if saved.get("fingerprint") == fp:
                    report = CoverageReport.model_validate(saved["report"])
                    self._reports[(str(a_path), str(d_path))] = (fp, report)
                    return report, a, d, True, cache
            except (ValueError, KeyError):
                pass  # unreadable: measure again
        step = _Steps(progress, float(len(a) + len(d)))
        with self._lock:
            report = self.workspace.coverage(a, d, lambda n: step("probing", n))
        write_text_atomic(cache, json.dumps({
            "fingerprint": fp, "anchor": str(a_path), "data": str(d_path),
            "report": report.model_dump(mode="json"),
        }))
        self._reports[(str(a_path), str(d_path))] = (fp, report)
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
        """Rows, label balance, text lengths, duplicates and a few example rows of a dataset."""
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
            path=self.rel(real), rows=n, labelled=labels is not None, positives=pos,
            negatives=neg, positive_share=round(pos / n, 4) if labels is not None and n else None,
            chars=_stats([len(t) for t in d.texts]),
            words=_stats([len(t.split()) for t in d.texts]), duplicates=dups,
            examples=[ExampleRow(row=i, text=_clip(d.texts[i]),
                                 label=labels[i] if labels is not None else None) for i in rows],
        )

    @validate_call
    def coverage(
        self, anchor: PathArg, data: PathArg, top: Top = 10,
        progress: ProgressFn | None = None,
    ) -> CoverageSummary:
        """FAC of `data` against the task features of the labelled `anchor`, and the top
        missing features with the anchor spans that activate them."""
        report, _, _, cached, cache = self._report(anchor, data, progress)
        return CoverageSummary(
            anchor=anchor, data=data, fac=round(report.fac, 4), n_task=report.n_task,
            n_covered=report.n_covered, n_missing=len(report.missing),
            anchor_fac=round(report.anchor_fac, 4), n_anchor=report.n_anchor,
            n_data=report.n_data, rule=report.rule.describe(report.delta_used),
            saturated=report.saturated, cached=cached, report_path=self.rel(cache),
            top_missing=self._missing_info(report, top, spans=1),
        )

    @validate_call
    def missing_features(
        self, anchor: PathArg, data: PathArg, limit: Limit = 20
    ) -> MissingFeatures:
        """The task features `data` never activates, most task-specific first, with spans."""
        report, *_ = self._report(anchor, data)
        return MissingFeatures(
            anchor=anchor, data=data, fac=round(report.fac, 4), n_missing=len(report.missing),
            features=self._missing_info(report, limit, spans=3),
        )

    @validate_call
    def search_features(self, query: Query, k: K = 10) -> FeatureSearch:
        """Interpreted features whose summaries are closest in meaning to `query`."""
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
    def explain_feature(
        self, anchor: PathArg, data: PathArg, feature: FeatureId
    ) -> FeatureExplanation:
        """What one feature responds to (feature memory, else the LLM from its top anchor
        spans), its strongest anchor spans, and how relevant it is to the task."""
        from agent.pipeline import FALLBACK, interpret_missing, span_finder
        from tools.coverage import MissingFeature, activity, feature_stats, measure

        report, a, d, _, _ = self._report(anchor, data)
        ws = self.workspace
        s = self.settings
        with self._lock:
            if feature >= ws.sae.d_sae:
                raise ValueError(f"feature {feature}: this SAE has features 0..{ws.sae.d_sae - 1}")
            a_acts = ws.probe(a)
            measured = measure(a_acts, a.labels, ws.probe(d), s.activity_rule(), s.judge)
            assert a.labels is not None
            pos, neg, lo = feature_stats(activity(a_acts, s.activity_rule(), measured.thresholds),
                                         a.labels, s.judge.smoothing)
            spans = span_finder(ws, a)([feature], max(s.top_spans, 3))[feature]
            known = ws.memory.get_many([feature]).get(feature)
        missing = next((m for m in report.missing if m.feature == feature), None)
        source: Literal["memory", "interpreted", "top-span"] = "memory"
        record = known
        if record is None:
            if not spans:
                raise ValueError(f"feature {feature} never fires on the anchor set: there is "
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
    def estimate_generation(self, features: FeatureList, per_feature: PerFeature = 2) -> Estimate:
        """What generate_and_verify will cost: samples and rough wall time."""
        backend = self.backend()
        n = len(set(features)) * per_feature
        seconds = n * _GEN_S.get(backend, 1.0) + len(set(features)) * _INTERP_S.get(backend, 2.0)
        seconds += 0.05 * n + 5  # verification probe
        if backend == "vllm" and self._llm_open is None and self._llm_injected is None:
            seconds += _VLLM_START_S
        return Estimate(samples=n, seconds=round(seconds), backend=backend,
                        note="rough: depends on the backend, the machine and the features")

    @validate_call
    def generate_and_verify(
        self, anchor: PathArg, data: PathArg, features: FeatureList,
        per_feature: PerFeature = 2, out: PathArg = "synthetic.jsonl",
        temperature: Temperature = 0.8, seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        """Generate `per_feature` samples aimed at each missing feature, keep those that
        really activate their target (and are no duplicates): kept rows go to `out`, rejected
        ones (with the reason) beside it."""
        import asyncio

        from agent.pipeline import interpret_missing, verify_samples
        from tools.generate import GenerateSettings, agenerate

        started = time.monotonic()
        out_path = self.resolve(out)
        if out_path.suffix != ".jsonl":
            raise ValueError(f"{out}: the output must be a .jsonl file")
        rejected_path = self.resolve(out_path.with_name(out_path.stem + ".rejected.jsonl"))
        if rejected_path == out_path:
            raise ValueError(f"{out}: its rejected-rows file {rejected_path.name} is the same "
                             "file; choose another output")
        report, a, d, _, _ = self._report(anchor, data)
        inputs = {self.resolve(anchor), self.resolve(data)}
        if out_path in inputs or rejected_path in inputs:
            raise ValueError(f"{out}: would overwrite an input dataset; choose another file")
        by_id = {m.feature: m for m in report.missing}
        wanted = list(dict.fromkeys(features))
        unknown = [f for f in wanted if f not in by_id]
        if unknown:
            some = ", ".join(str(m.feature) for m in report.missing[:10])
            raise ValueError(
                f"features {unknown} are not missing task features of {data} "
                f"(missing ones, most task-specific first: {some or 'none'})")
        total = len(wanted) * per_feature
        step = _Steps(progress, float(total + len(wanted) + 1))
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
        write_text_atomic(out_path, "".join(v.sample.model_dump_json() + "\n"
                                            for v in result.kept))
        write_text_atomic(rejected_path, "".join(
            json.dumps({**v.sample.model_dump(), "reason": v.reason,
                        "activation": round(v.activation, 4)}) + "\n" for v in result.rejected))
        shown = result.kept[:3] + result.rejected[:2]
        return GenerationResult(
            features=[t.feature for t in targets],
            skipped=[f for f in wanted if f not in {t.feature for t in targets}],
            generated=len(samples), kept=len(result.kept), rejected=len(result.rejected),
            hit_rate=round(result.hit_rate, 4),
            per_feature={f: HitInfo(generated=h.generated, activated=h.activated, kept=h.kept)
                         for f, h in result.per_feature.items()},
            kept_path=self.rel(out_path), rejected_path=self.rel(rejected_path),
            examples=[SampleInfo(feature=v.sample.provenance.feature, text=_clip(v.sample.text),
                                 activation=round(v.activation, 3), reason=v.reason)
                      for v in shown],
            seconds=round(time.monotonic() - started, 1),
        )

    @validate_call
    def estimate_improve(
        self, rounds: Rounds = 1, budget: Budget = 40, top: Top = 5, per_feature: PerFeature = 2
    ) -> Estimate:
        """What improve will cost at most: samples and rough wall time."""
        backend = self.backend()
        n = min(budget, rounds * top * per_feature)
        seconds = (n * _GEN_S.get(backend, 1.0) + rounds * top * _INTERP_S.get(backend, 2.0)
                   + (rounds + 1) * _ROUND_S)
        if backend == "vllm" and self._llm_open is None and self._llm_injected is None:
            seconds += _VLLM_START_S
        return Estimate(samples=n, seconds=round(seconds), backend=backend,
                        note="at most: the run stops early when FAC stops improving")

    @validate_call
    def improve(
        self, anchor: PathArg, data: PathArg, run_dir: PathArg, rounds: Rounds = 1,
        budget: Budget = 40, top: Top = 5, per_feature: PerFeature = 2,
        relevance: Relevance = "auto", resume: bool = False, seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> ImproveResult:
        """Self-improvement rounds in `run_dir` (coverage -> interpret -> generate -> verify
        -> train -> evaluate) until FAC stops improving, `rounds` or `budget` is reached."""
        from agent.graph import LoopSettings
        from agent.runs import CONFIG, RunConfig, run_loop
        from tools.report import History

        started = time.monotonic()
        run = self.resolve(run_dir)
        if run == self.root:
            raise ValueError("run_dir: give a folder for the run, not the workspace root")
        self.confine_tree(run)
        if resume:
            cfg = RunConfig.read(run)
        else:
            if (run / CONFIG).exists():
                raise ValueError(f"{run_dir} already holds a run: continue it with resume=true "
                                 "or choose another run_dir")
            a_path, _ = self._dataset(anchor, labels=True)
            d_path, _ = self._dataset(data, labels=False)
            s = self.settings
            cfg = RunConfig(
                anchor=str(a_path), data=str(d_path), relevance=relevance,
                settings={k: v for k, v in {"model": s.model, "sae": s.sae,
                                            "generator": s.generator}.items() if v is not None},
                loop=LoopSettings(max_rounds=rounds, budget=budget, top=top, seed=seed,
                                  per_feature=per_feature).model_dump(),
                detector={"kind": "probe"},
            )
            write_text_atomic(run / CONFIG, cfg.model_dump_json(indent=1))
        loop_rounds = int(cfg.loop.get("max_rounds", rounds))
        step = _Steps(progress, float(6 + 8 * loop_rounds))
        with self._lock:
            state = run_loop(run, cfg, resume, workspace=self.workspace, llm=self.llm,
                             before=lambda node, r: step(f"round {r}: {node}"))
        history = History.load(run)
        infos = [_round_info(r) for r in history.rounds]
        return ImproveResult(
            run_dir=self.rel(run), rounds=infos,
            fac_start=infos[0].fac if infos else 0.0, fac_end=infos[-1].fac if infos else 0.0,
            stop_reason=state.get("stop_reason"), seconds=round(time.monotonic() - started, 1),
            next=f"report(run_dir={self.rel(run)!r}) writes the HTML report",
        )

    @validate_call
    def report(self, run_dir: PathArg) -> RunReport:
        """Write the HTML report of an improve run and summarise its rounds."""
        from tools.report import History, write_report

        run = self.resolve(run_dir, must_exist=True)
        self.confine_tree(run)
        path = write_report(run)
        return RunReport(run_dir=self.rel(run), report_path=self.rel(path),
                         rounds=[_round_info(r) for r in History.load(run).rounds])


@contextlib.contextmanager
def toolbox(settings: Settings | None = None, root: str | Path = ".") -> Iterator[Toolbox]:
    box = Toolbox(settings, root)
    try:
        yield box
    finally:
        box.close()
