"""The real engine behind the improve graph's nodes: the workspace (model, SAE, caches,
feature memory), an LLM client, and the downstream detector. Every method delegates to
tools/; this class only binds the run's anchor, eval set, LLM and detector settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from agent.pool_select import PoolSelector, judged_labels
from tools.adapted import PROMPT as ADAPTED_PROMPT
from tools.adapted import AdaptedChat, adapted_client
from tools.coverage import CoverageReport, MissingFeature
from tools.data import TextDataset, load_texts
from tools.detector import (
    DetectorSettings,
    evaluate,
    fit_detector,
    load_detector,
    score,
    train_probe_detector,
)
from tools.focus import error_features
from tools.generate import PROMPT as GENERATE_PROMPT
from tools.generate import AsyncChatClient, GenerateSettings, Target, agenerate, plan_requests
from tools.interpret import ChatClient
from tools.label_gate import (
    LabelCheck,
    LabelGateSettings,
    agreement_rows,
    balanced_agreement,
    consistent,
    llm_labels,
    plan,
    rank_average,
)
from tools.models import resolve_model_source
from tools.pool.labels import PoolPick
from tools.pool.select import SelectSettings
from tools.pool.source import PoolSource
from tools.probe import Progress
from tools.relevance import Relevance
from tools.rundir import Metric
from tools.synthesis import (
    HOST_MAX_CHARS,
    Interpreted,
    assign_hosts,
    interpret_missing,
    verify_samples,
)
from tools.verify import Provenance, Sample, VerifyReport
from tools.workspace import Workspace

if TYPE_CHECKING:
    from agent.steps import Rows

log = logging.getLogger(__name__)

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
        describe: Literal["llm", "spans"] = "llm", pool: TextDataset | None = None,
        pool_source: PoolSource | None = None,
    ) -> None:
        self.ws = ws
        self.pool = pool  # the pool's rows (None with the ray engine: they are streamed)
        self.pool_source = pool_source
        self.anchor = anchor
        self.eval_set = eval_set
        self.llm = llm
        self.detector = detector or DetectorSettings()
        self.relevance = relevance
        self.seed = seed
        self.describe = describe
        self.progress = progress or (lambda what, total: None)
        self._llm_agreement: float | None = None  # the LLM label judge's, measured once
        self._reference: tuple[str, Any] | None = None  # (path, probe fit on it)
        self._adapted: AdaptedChat | None = None  # the adapted generator, built once

    def probe(self, rows: Rows) -> None:
        todo = [self.anchor.texts, rows.texts()]
        if self.eval_set is not None:
            todo.append(self.eval_set.texts)
        bar = self.progress("probing", sum(map(len, todo)))
        for part in todo:
            self.ws.probe(_texts(part, "probe"), bar)

    def coverage(self, rows: Rows) -> CoverageReport:
        return self.ws.coverage(self.anchor, _texts(rows.texts(), "data"))

    def error_features(self, rows: Rows, model_dir: Path,
                       limit: int) -> list[MissingFeature]:
        """Task features over-represented in the errors of the detector in `model_dir` on
        the anchor rows (tools/focus.py). `rows` (the training rows) are not used: the
        detector is judged on rows it never trained on."""
        return error_features(self.ws, self.anchor, model_dir, limit, self._model_folder())

    def interpret(self, report: CoverageReport, limit: int) -> Interpreted:
        return interpret_missing(report, self.llm, self.ws, limit=limit, relevance=self.relevance,
                                 describe=self.describe)

    def generate(self, targets: Sequence[Target], settings: GenerateSettings, skip: set[int],
                 on_sample: Callable[[Sample], None]) -> list[Sample]:
        """The targets' samples; with `settings.hosts`, each request rewrites a real anchor
        row of its label (short enough for a reply of max_new_tokens, ~4 characters each).
        `settings.generator == "adapted"`: the anchor's adapted model writes them instead
        (trained on first use, then cached; hosts do not apply)."""
        requests = plan_requests(targets, settings)
        client: AsyncChatClient = self.llm
        prompt = GENERATE_PROMPT
        if settings.generator == "adapted":
            client, prompt = self._adapted_client(), ADAPTED_PROMPT
            settings = settings.model_copy(update={"hosts": False})
        hosts = None
        if settings.hosts:
            max_chars = min(HOST_MAX_CHARS, 4 * self.ws.settings.max_new_tokens)
            hosts = assign_hosts(requests, self.anchor.texts, self.anchor.labels,
                                 settings.seed, max_chars)
        bar = self.progress("generating", sum(q.seed not in skip for q in requests))

        def seen(sample: Sample) -> None:
            on_sample(sample)
            if bar:
                bar(1)

        return asyncio.run(agenerate(targets, client, settings, skip=skip, on_sample=seen,
                                     hosts=hosts, prompt=prompt))

    def _adapted_client(self) -> AdaptedChat:
        """The anchor's adapted generator, built once per engine (the adapter itself is
        cached under the workspace's home, keyed by model, anchor rows and settings)."""
        if self._adapted is None:
            bar: Progress | None = None

            def step(done: int, total: int) -> None:
                nonlocal bar
                bar = bar or self.progress("adapting the generator", total)
                if bar:
                    bar(1)

            self._adapted = adapted_client(self.ws, self.anchor, progress=step)
        return self._adapted

    def verify(self, samples: Sequence[Sample], rows: Rows) -> VerifyReport:
        return verify_samples(self.ws, self.anchor, _texts(rows.texts(), "data"), samples)

    def train(self, rows: Rows, model_dir: Path, *,
              synthetic_share: float | None = None) -> None:
        texts, labels, synthetic = rows.texts(), rows.labels(), rows.synthetic
        assert labels is not None  # Steps trains only labelled rows
        fit_detector(
            self.detector, list(texts), labels, features=self._features(texts),
            model_folder=self._model_folder() if self.detector.kind == "lora" else None,
            seed=self.seed, out_dir=model_dir, device=self.ws.settings.device,
            synthetic=synthetic, synthetic_share=synthetic_share,
        )

    def label_check(self, samples: Sequence[Sample], model_dir: Path | None,
                    gate: LabelGateSettings) -> LabelCheck:
        """Per sample: does the label it claims hold for the judges `gate` names (the
        detector in `model_dir`, None when there is none; the LLM when it measures up; see
        tools/label_gate.py)?"""
        texts = [s.text for s in samples]
        claimed = np.array([1 if s.label is None else s.label for s in samples])
        agreement = self._judge_agreement(gate) if gate.judge in ("llm", "both") else None
        judged_by = plan(gate.judge, agreement, gate.min_agreement, model_dir is not None)
        if agreement is not None and agreement < gate.min_agreement:
            log.warning("the LLM label judge agrees with real anchor labels at %.2f balanced "
                        "accuracy (< min_agreement %.2f): %s", agreement, gate.min_agreement,
                        "the detector judges instead" if judged_by != "none"
                        else "and there is no detector, so labels go unchecked")
        elif judged_by == "none" and gate.judge != "off":
            log.warning("no detector (unlabelled data), so the label gate cannot check the "
                        "kept samples' labels")
        ok = np.ones(len(samples), dtype=bool)
        if judged_by in ("llm", "both"):
            ok &= np.array([said == c for said, c in
                            zip(llm_labels(texts, self.llm), claimed, strict=True)], dtype=bool)
        if judged_by in ("detector", "both"):
            assert model_dir is not None
            ok &= self._detector_consistent(texts, claimed, model_dir, gate)
        return LabelCheck(ok=ok.tolist(), judged_by=judged_by, llm_agreement=agreement)

    def _detector_consistent(self, texts: Sequence[str], claimed: np.ndarray, model_dir: Path,
                             gate: LabelGateSettings) -> np.ndarray:
        """The detector judge: scores like real anchor rows of the claimed label, the
        current detector rank-averaged with the reference probe when there is one."""
        det = load_detector(model_dir, model_folder=self._model_folder())
        x, x_real = self._features(texts), self._features(self.anchor.texts)
        scores, real = det.score(texts, features=x), det.score(self.anchor.texts, features=x_real)
        if gate.reference is not None:
            ref = self._reference_probe(gate.reference)
            if x is None or x_real is None:  # a lora detector: the probe's features anyway
                x = self.ws.probe(_texts(texts, "detector")).pooled()
                x_real = self.ws.probe(_texts(self.anchor.texts, "detector")).pooled()
            scores, real = rank_average([(scores, real), (score(ref, x), score(ref, x_real))])
        return consistent(scores, claimed, real, self.anchor.labels or [], gate.quantile,
                          gate.negative_quantile)

    def _reference_probe(self, path: str) -> Any:
        """A probe detector fit on the labelled rows in `path` (once per engine)."""
        if self._reference is None or self._reference[0] != path:
            rows = load_texts(path, require_labels=True)
            assert rows.labels is not None
            x = self.ws.probe(_texts(rows.texts, "reference")).pooled()
            self._reference = (path, train_probe_detector(x, rows.labels, c=self.detector.c,
                                                          seed=self.seed))
            log.info("label gate reference: a probe on %d rows of %s", len(rows.texts), path)
        return self._reference[1]

    def _judge_agreement(self, gate: LabelGateSettings) -> float:
        """The LLM label judge's balanced accuracy on a fixed stratified sample of real
        anchor rows (once per engine)."""
        if self._llm_agreement is None:
            labels = self.anchor.labels or []
            rows = agreement_rows(labels, gate.agreement_rows, seed=0)
            said = llm_labels([self.anchor.texts[i] for i in rows], self.llm)
            self._llm_agreement = balanced_agreement(said, [labels[i] for i in rows])
            log.info("LLM label judge: balanced accuracy %.3f on %d real anchor rows",
                     self._llm_agreement, len(rows))
        return self._llm_agreement

    # -- the pool path (agent/pool_select.py) ----------------------------------------------
    @cached_property
    def _selector(self) -> PoolSelector:
        if self.pool is None and self.pool_source is None:
            raise ValueError("this run has no pool")
        folder = self._model_folder() if self.detector.kind == "lora" else None
        return PoolSelector(self.ws, self.anchor, self.pool, folder, self.pool_source)

    def select(self, rows: Rows, model_dir: Path, settings: SelectSettings, n: int,
               taken: set[int], seed: int) -> list[PoolPick]:
        return self._selector.select(rows, model_dir, settings, n, taken, seed)

    def unfilled(self, rows: Rows, taken: set[int]) -> list[int]:
        return self._selector.unfilled(rows, taken)

    def judge_labels(self, texts: Sequence[str], model_dir: Path,
                     gate: LabelGateSettings) -> list[int | None]:
        """The label gate's judges as the labeler: each row gets the label whose claim they
        accept, or None when they accept both or neither (tools/label_gate.py)."""
        judge = model_dir if model_dir.exists() else None

        def ok(label: int) -> list[bool]:
            claims = [Sample(text=t, label=label, provenance=Provenance(feature=-1))
                      for t in texts]
            return self.label_check(claims, judge, gate).ok

        return judged_labels(ok(1), ok(0))

    def evaluate(self, model_dir: Path) -> Metric | None:
        if self.eval_set is None or not model_dir.exists():
            return None  # no eval set, or no detector (unlabelled data)
        det = load_detector(model_dir, model_folder=self._model_folder())
        scores = det.score(self.eval_set.texts, features=self._features(self.eval_set.texts))
        m = evaluate(scores, self.eval_set.labels or [])
        return Metric(name="auprc", value=m.auprc, values={
            k: float(v) for k, v in m.model_dump().items()})

    def _model_folder(self) -> str:
        return resolve_model_source(self.ws.settings.model, self.ws.settings.home)[0]

    def _features(self, texts: Sequence[str]) -> np.ndarray | None:
        if not self.detector.needs_features:
            return None
        return self.ws.probe(_texts(texts, "detector")).pooled()
