"""What the facsynth tools share: the `ToolboxBase` every part of `Toolbox` builds on.

It holds the settings, the workspace root every path must stay inside (`sandbox`,
agent/sandbox.py), a lazily built `Workspace` (model, SAE, caches, feature memory), the
coverage reports per file pair (agent/coverage_cache.py), a lazily opened LLM (`open_llm`,
closed by `close()`) and the jobs of the long tools (agent/jobs.py). Tests inject a pre-built
workspace and a fake LLM. Datasets must be existing files (never hub ids: nothing is
downloaded here).
"""

from __future__ import annotations

import contextlib
import threading
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from agent.coverage_cache import CoverageCache
from agent.jobs import Jobs, Work
from agent.llm import LazyLLM
from agent.results import MissingInfo, SpanInfo
from agent.sandbox import Sandbox
from agent.tool_args import ProgressFn
from tools.data import TextDataset, load_texts
from tools.errors import ConfigError, DataError, UsageError
from tools.settings import Settings

if TYPE_CHECKING:
    from tools.coverage import CoverageReport
    from tools.workspace import Workspace


def clip(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class StepProgress:
    """A progress callback whose `done` only grows (MCP requires increasing progress);
    `round` is the improve round it is in, for messages."""

    def __init__(self, progress: ProgressFn | None, total: float | None) -> None:
        self.progress = progress
        self.total = total
        self.done = 0.0
        self.round = 0

    def __call__(self, message: str, advance: float = 1.0) -> None:
        self.done += advance
        if self.progress is not None:
            self.progress(message, self.done, self.total)

    def tick(self, message: str) -> None:
        """Report `message` without advancing (inside a long step)."""
        self(message, 0.0)


class ToolboxBase:
    """What every tool shares over one workspace root; see the module doc."""

    def __init__(
        self,
        settings: Settings | None = None,
        root: str | Path = ".",
        *,
        workspace: Workspace | None = None,
        llm: Any | None = None,
        job_worker: list[str] | None = None,
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
        self.jobs = Jobs(self._jobs_folder, self._job_work, worker=job_worker,
                         rounds=self._run_round, relative=self.sandbox.scrub)

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

    def _job_work(self, tool: str, arguments: dict[str, Any]) -> Work:
        """A job's work from its tool and arguments (agent/toolbox_runs.py has them)."""
        raise UsageError(f"{tool} runs no jobs")

    def _jobs_folder(self) -> Path:
        folder = self.sandbox.state_path("jobs")
        folder.mkdir(parents=True, exist_ok=True)
        self.sandbox.confine_tree(folder)
        return folder

    def _run_round(self, run_dir: str) -> int | None:
        """The round an improve run is in: the one after its last recorded round, or that
        round once the run has stopped (None: no history yet)."""
        from tools.rundir import History, RunPaths

        run = self.root / run_dir
        if not RunPaths(run).history.is_file():
            return None
        try:
            history = History.load(run)
        except DataError:
            return None
        if not history.rounds:
            return None
        last = history.rounds[-1]
        return last.round if last.stop_reason else last.round + 1

    def close(self) -> None:
        """Wait for this process's jobs to end, then close the LLM."""
        self.jobs.wait_all()
        self._llm_stack.close()
        self._llm_open = None

    def __enter__(self) -> Self:
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
        step = StepProgress(progress, float(len(a) + len(d)))
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
                spans=[SpanInfo(text=clip(s.text, 160), activation=round(s.activation, 3))
                       for s in m.spans[:spans]],
            )
            for m in chosen
        ]

    # -- the tools ------------------------------------------------------------------------
