"""The real engine behind the improve graph's nodes: the workspace (model, SAE, caches,
feature memory), an LLM client, and the downstream detector. Every method delegates to
tools/; this class only binds the run's anchor, eval set, LLM and detector settings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from tools.coverage import CoverageReport, MissingFeature
from tools.data import TextDataset
from tools.detector import DetectorSettings, Metrics, evaluate, fit_detector, load_detector
from tools.focus import error_features
from tools.generate import AsyncChatClient, GenerateSettings, Target, agenerate
from tools.interpret import ChatClient
from tools.label_gate import consistent
from tools.models import resolve_model_source
from tools.probe import Progress
from tools.relevance import Relevance
from tools.synthesis import Interpreted, interpret_missing, verify_samples
from tools.verify import Sample, VerifyReport
from tools.workspace import Workspace

ProgressFor = Callable[[str, int], Progress | None]
"""(what, total) -> a progress callback, or None for silence."""


class EngineLLM(ChatClient, AsyncChatClient, Protocol):
    """The LLM the loop needs: blocking chat (interpretation), async chat (generation)."""


def _texts(texts: Sequence[str], source: str) -> TextDataset:
    return TextDataset(texts=list(texts), labels=None, source=source)


class Engine:
    def __init__(
        self, ws: Workspace, anchor: TextDataset, eval_set: TextDataset | None, llm: EngineLLM,
        *, detector: DetectorSettings | None = None, relevance: Relevance = "label",
        seed: int = 0, progress: ProgressFor | None = None,
    ) -> None:
        self.ws = ws
        self.anchor = anchor
        self.eval_set = eval_set
        self.llm = llm
        self.detector = detector or DetectorSettings()
        self.relevance = relevance
        self.seed = seed
        self.progress = progress or (lambda what, total: None)

    def probe(self, texts: Sequence[str]) -> None:
        todo = [self.anchor.texts, list(texts)]
        if self.eval_set is not None:
            todo.append(self.eval_set.texts)
        bar = self.progress("probing", sum(map(len, todo)))
        for part in todo:
            self.ws.probe(_texts(part, "probe"), bar)

    def coverage(self, texts: Sequence[str]) -> CoverageReport:
        return self.ws.coverage(self.anchor, _texts(texts, "data"))

    def error_features(self, texts: Sequence[str], labels: Sequence[int], model_dir: Path,
                       limit: int) -> list[MissingFeature]:
        """Task features over-represented in the errors of the detector in `model_dir` on
        the anchor rows (tools/focus.py). `texts` and `labels` (the training rows) are not
        used: the detector is judged on rows it never trained on."""
        return error_features(self.ws, self.anchor, model_dir, limit, self._model_folder())

    def interpret(self, report: CoverageReport, limit: int) -> Interpreted:
        return interpret_missing(report, self.llm, self.ws, limit=limit, relevance=self.relevance)

    def generate(self, targets: Sequence[Target], settings: GenerateSettings, skip: set[int],
                 on_sample: Callable[[Sample], None]) -> list[Sample]:
        bar = self.progress("generating", len(targets) * settings.per_feature - len(skip))

        def seen(sample: Sample) -> None:
            on_sample(sample)
            if bar:
                bar(1)

        return asyncio.run(agenerate(targets, self.llm, settings, skip=skip, on_sample=seen))

    def verify(self, samples: Sequence[Sample], existing: Sequence[str]) -> VerifyReport:
        return verify_samples(self.ws, self.anchor, _texts(existing, "data"), samples)

    def train(self, texts: Sequence[str], labels: Sequence[int], model_dir: Path) -> None:
        fit_detector(
            self.detector, list(texts), labels, features=self._features(texts),
            model_folder=self._model_folder() if self.detector.kind == "lora" else None,
            seed=self.seed, out_dir=model_dir, device=self.ws.settings.device,
        )

    def label_check(self, samples: Sequence[Sample], model_dir: Path,
                    quantile: float) -> list[bool]:
        """Per sample: does the detector in `model_dir` score it like real anchor rows of
        the label it claims (tools/label_gate.py)?"""
        det = load_detector(model_dir, model_folder=self._model_folder())
        texts = [s.text for s in samples]
        scores = det.score(texts, features=self._features(texts))
        real = det.score(self.anchor.texts, features=self._features(self.anchor.texts))
        ok = consistent(scores, [1 if s.label is None else s.label for s in samples], real,
                        self.anchor.labels or [], quantile)
        return [bool(x) for x in ok]

    def evaluate(self, model_dir: Path) -> Metrics | None:
        if self.eval_set is None or not model_dir.exists():
            return None  # no eval set, or no detector (unlabelled data)
        det = load_detector(model_dir, model_folder=self._model_folder())
        scores = det.score(self.eval_set.texts, features=self._features(self.eval_set.texts))
        return evaluate(scores, self.eval_set.labels or [])

    def _model_folder(self) -> str:
        return resolve_model_source(self.ws.settings.model, self.ws.settings.home)[0]

    def _features(self, texts: Sequence[str]) -> np.ndarray | None:
        if not self.detector.needs_features:
            return None
        return self.ws.probe(_texts(texts, "detector")).pooled()
