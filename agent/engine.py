"""The real engine behind the improve graph's nodes: the workspace (model, SAE, caches,
feature memory), an LLM client, and the downstream detector."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from agent.pipeline import Interpreted, interpret_missing, verify_samples
from agent.workspace import Workspace
from tools.coverage import CoverageReport, MissingFeature, Span, activity, measure
from tools.data import TextDataset
from tools.detector import DetectorSettings, Metrics, evaluate, fit_detector, load_detector
from tools.generate import GenerateSettings, Target, agenerate
from tools.models import resolve_model_source
from tools.probe import Progress, top_spans
from tools.relevance import Relevance
from tools.verify import Sample, VerifyReport

ProgressFor = Callable[[str, int], Progress | None]
"""(what, total) -> a progress callback, or None for silence."""


def _texts(texts: Sequence[str], source: str) -> TextDataset:
    return TextDataset(texts=list(texts), labels=None, source=source)


class Engine:
    def __init__(
        self, ws: Workspace, anchor: TextDataset, eval_set: TextDataset | None, llm: object,
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
        """Task features over-represented in the detector's errors on the anchor rows (which
        the detector never trained on): rate among misclassified rows / rate among all."""
        s = self.ws.settings
        acts = self.ws.probe(self.anchor)
        y = np.asarray(self.anchor.labels)
        det = load_detector(model_dir, model_folder=self._model_folder())
        scores = det.score(self.anchor.texts, features=acts.pooled())
        wrong = (scores >= 0.5).astype(int) != y
        if wrong.sum() == 0:
            return []
        measured = measure(acts, self.anchor.labels, acts, s.activity_rule(), s.judge)
        active = activity(acts, s.activity_rule(), measured.thresholds).tocsc()
        rate_all = np.asarray(active.mean(axis=0)).ravel()
        n_err = np.asarray(active[wrong].sum(axis=0)).ravel()
        ratio = np.where(rate_all > 0, (n_err / wrong.sum()) / np.maximum(rate_all, 1e-9), 0)
        chosen = np.flatnonzero(measured.task & (n_err >= 2) & (ratio >= 1.5))
        chosen = chosen[np.argsort(-ratio[chosen])][:limit]
        spans = top_spans(acts, self.anchor.texts, self.ws.model.tokenizer, s.probe_settings(),
                          chosen.tolist(), s.top_spans, s.span_window)
        return [
            MissingFeature(feature=int(f), pos_support=int(n_err[f]), neg_support=0,
                           log_odds=float(np.log(ratio[f])), anchor_max=0.0,
                           spans=[Span(row=r, text=t, activation=a) for r, t, a in spans[f]])
            for f in chosen
        ]

    def interpret(self, report: CoverageReport, limit: int) -> Interpreted:
        return interpret_missing(report, self.llm, self.ws, limit=limit,  # type: ignore[arg-type]
                                 relevance=self.relevance)

    def generate(self, targets: Sequence[Target], settings: GenerateSettings, skip: set[int],
                 on_sample: Callable[[Sample], None]) -> list[Sample]:
        bar = self.progress("generating", len(targets) * settings.per_feature - len(skip))

        def seen(sample: Sample) -> None:
            on_sample(sample)
            if bar:
                bar(1)

        return asyncio.run(agenerate(targets, self.llm, settings,  # type: ignore[arg-type]
                                     skip=skip, on_sample=seen))

    def verify(self, samples: Sequence[Sample], existing: Sequence[str]) -> VerifyReport:
        return verify_samples(self.ws, self.anchor, _texts(existing, "data"), samples)

    def _model_folder(self) -> str:
        return resolve_model_source(self.ws.settings.model, self.ws.settings.home)[0]

    def _features(self, texts: Sequence[str]) -> np.ndarray | None:
        if not self.detector.needs_features:
            return None
        return self.ws.probe(_texts(texts, "detector")).pooled()

    def train(self, texts: Sequence[str], labels: Sequence[int], model_dir: Path) -> bool:
        fit_detector(
            self.detector, list(texts), labels, features=self._features(texts),
            model_folder=self._model_folder() if self.detector.kind == "lora" else None,
            seed=self.seed, out_dir=model_dir, device=self.ws.settings.device,
        )
        return True

    def evaluate(self, model_dir: Path) -> Metrics | None:
        if self.eval_set is None or not model_dir.exists():
            return None  # no eval set, or no detector (unlabelled data)
        det = load_detector(model_dir, model_folder=self._model_folder())
        scores = det.score(self.eval_set.texts, features=self._features(self.eval_set.texts))
        return evaluate(scores, self.eval_set.labels or [])
