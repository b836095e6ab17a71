"""The improve loop's engine for pair tasks (reward, steering; tools/tasks): the same
nodes as agent/engine.py's text engine, over (prompt, chosen, rejected) rows.

Coverage reads the task's probe texts (each pair's chosen text is the contrast's 1, its
rejected text the 0, so F_task = features of preferred vs rejected sides); a generated
sample is a whole pair, parsed from the generator's reply, verified on its chosen side's
probe text; the label gate asks the task's own model (the reward head, the CAA vector)
whether the pair's direction holds; training and the eval metric are the task's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tools.coverage import CoverageReport, MissingFeature
from tools.data import TextDataset
from tools.errors import ConfigError
from tools.generate import GenerateSettings, Target, agenerate, plan_requests
from tools.label_gate import LabelCheck, LabelGateSettings
from tools.relevance import Relevance
from tools.rundir import Metric
from tools.synthesis import Interpreted, interpret_missing, verify_samples
from tools.tasks import Task, workspace_features
from tools.tasks.pairs import PairDataset, pairs_of, reply_to_sample
from tools.verify import Sample, VerifyReport
from tools.workspace import Workspace

if TYPE_CHECKING:
    from agent.engine import EngineLLM, ProgressFor
    from agent.steps import Rows

log = logging.getLogger(__name__)

class PairEngine:
    def __init__(
        self, ws: Workspace, task: Task[Any, Any], anchor: PairDataset,
        eval_set: PairDataset | None, llm: EngineLLM, *, relevance: Relevance = "label",
        seed: int = 0, progress: ProgressFor | None = None,
        describe: Literal["llm", "spans"] = "llm",
    ) -> None:
        if task.generate_prompt is None:
            raise ConfigError(f"the {task.name} task has no generation prompt yet")
        self.ws = ws
        self.task: Any = task.bind(ws)
        self.anchor = anchor
        self.eval_set = eval_set
        self.llm = llm
        self.relevance = relevance
        self.seed = seed
        self.describe = describe
        self.progress = progress or (lambda what, total: None)
        self.features = workspace_features(ws)
        self._anchor_texts = self.task.probe_texts(anchor).dataset()

    def _data(self, rows: Rows) -> PairDataset:
        return self.task.extend(rows.data, rows.added)

    def _texts(self, rows: Rows) -> TextDataset:
        return TextDataset(self.task.probe_texts(self._data(rows)).texts, None, "data")

    def probe(self, rows: Rows) -> None:
        todo = [self._anchor_texts, self._texts(rows)]
        if self.eval_set is not None:
            todo.append(self.task.probe_texts(self.eval_set).dataset())
        bar = self.progress("probing", sum(len(d.texts) for d in todo))
        for part in todo:
            self.ws.probe(part, bar)

    def coverage(self, rows: Rows) -> CoverageReport:
        return self.ws.coverage(self._anchor_texts, self._texts(rows))

    def error_features(self, rows: Rows, model_dir: Path, limit: int) -> list[MissingFeature]:
        raise ConfigError(f"--focus model/both needs a detector's errors; the {self.task.name} "
                          "task has none: use --focus data")

    def interpret(self, report: CoverageReport, limit: int) -> Interpreted:
        return interpret_missing(report, self.llm, self.ws, limit=limit, relevance=self.relevance,
                                 describe=self.describe, prompt=self.task.relevance_prompt)

    def generate(self, targets: Sequence[Target], settings: GenerateSettings, skip: set[int],
                 on_sample: Callable[[Sample], None]) -> list[Sample]:
        """Each request yields a whole pair (the task's generation prompt through its
        `writer`); with `settings.hosts`, it shows a real anchor row (`task.examples`)."""
        if settings.generator != "prompted":
            raise ConfigError(f"the {self.task.name} task generates with the prompted "
                              "generator only (--generator-kind prompted)")
        requests = plan_requests(targets, settings)
        hosts = None
        if settings.hosts:
            shown = self.task.examples(self.anchor)
            order = np.random.default_rng(settings.seed).permutation(len(shown))
            hosts = {q.seed: shown[j]
                     for q, j in zip(requests, np.resize(order, len(requests)), strict=True)}
        bar = self.progress("generating", sum(q.seed not in skip for q in requests))

        def seen(sample: Sample) -> None:
            on_sample(sample)
            if bar:
                bar(1)

        return asyncio.run(agenerate(
            targets, self.task.writer(self.llm, self.anchor), settings, skip=skip, on_sample=seen,
            hosts=hosts, prompt=self.task.generate_prompt, system=self.task.system,
            to_row=reply_to_sample(self.task.parse, self.task.probe_texts)))

    def verify(self, samples: Sequence[Sample], rows: Rows) -> VerifyReport:
        return verify_samples(self.ws, self._anchor_texts, self._texts(rows), samples)

    def label_check(self, samples: Sequence[Sample], model_dir: Path | None,
                    gate: LabelGateSettings) -> LabelCheck:
        """Does each pair's direction hold for the task's model of the last round (the
        gate's `quantile` of real anchor pairs is the bar)? The LLM judge reads single
        texts, so for pairs the task's model is the only judge."""
        if gate.judge in ("llm", "both"):
            log.warning("the LLM label judge reads single texts; the %s task's pairs are "
                        "checked by its own model only", self.task.name)
        if model_dir is None:
            log.warning("no model yet, so the label gate cannot check the pairs' direction")
            return LabelCheck(ok=[True] * len(samples), judged_by="none")
        model = self.task.load_model(model_dir)
        ok = self.task.gate(model, self.anchor, pairs_of(samples), self.features, gate.quantile)
        return LabelCheck(ok=[bool(x) for x in ok], judged_by="detector")

    def train(self, rows: Rows, model_dir: Path, *,
              synthetic_share: float | None = None) -> None:
        model = self.task.fit(self._data(rows), self.features, seed=self.seed,
                              synthetic=rows.synthetic, synthetic_share=synthetic_share)
        self.task.save_model(model, model_dir)

    def evaluate(self, model_dir: Path) -> Metric | None:
        if self.eval_set is None or not model_dir.exists():
            return None
        values = self.task.metric(self.task.load_model(model_dir), self.eval_set, self.features)
        return Metric(name=self.task.headline, value=values[self.task.headline], values=values)

    # the pool path is for text rows (agent/runs.py refuses --pool for pair tasks first)
    def select(self, rows: Rows, model_dir: Path, settings: Any, n: int, taken: set[int],
               seed: int) -> list[Any]:
        raise ConfigError(f"the {self.task.name} task has no pool path")

    def unfilled(self, rows: Rows, taken: set[int]) -> list[int]:
        raise ConfigError(f"the {self.task.name} task has no pool path")

    def judge_labels(self, texts: Sequence[str], model_dir: Path,
                     gate: LabelGateSettings) -> list[int | None]:
        raise ConfigError(f"the {self.task.name} task has no pool path")
