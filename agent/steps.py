"""The improve graph's nodes: run-directory bookkeeping (layout: tools/rundir.py) around a
`LoopEngine` that does the heavy work (model, SAE, LLM, detector; agent/engine.py). Every
node can be re-run after a crash and gives the same result: generated samples are journalled
one by one as they arrive (a resumed round asks only for the missing ones), round files are
written atomically, features are remembered in the feature memory, and state updates are
computed from the pre-node state.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from agent.graph import LoopState, decide
from agent.pool_steps import PoolSteps
from tools.coverage import CoverageReport, MissingFeature
from tools.data import TextDataset, write_text_atomic
from tools.generate import GenerateSettings, Target, plan_requests
from tools.label_gate import Judged, LabelCheck, LabelGateSettings
from tools.pool.labels import PoolPick
from tools.pool.select import SelectSettings
from tools.pool.source import PoolSource
from tools.rundir import (
    History,
    LoopSettings,
    Metric,
    MissingSummary,
    RoundRecord,
    RunPaths,
    read_samples,
    write_rows,
)
from tools.synthesis import Interpreted, round_targets
from tools.verify import FeatureHits, Sample, VerifyReport, gate_pass_rate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rows:
    """The run's rows as of a round: the starting data (the task's rows: a TextDataset, or a
    PairDataset for pair tasks) and the kept synthetic samples after it."""

    data: Any
    added: list[Sample]

    def __len__(self) -> int:
        return len(self.data) + len(self.added)

    @property
    def synthetic(self) -> list[bool]:
        """Per row: is it a kept synthetic sample (the starting rows and labelled pool rows
        are real)?"""
        return [False] * len(self.data) + [s.provenance.pool_row is None for s in self.added]

    @property
    def labelled(self) -> bool:
        """Can a downstream model train on them (a pair is its own label)?"""
        return getattr(self.data, "labels", ()) is not None

    def texts(self) -> list[str]:
        """Text rows: the data's texts, then the samples'."""
        return list(self.data.texts) + [s.text for s in self.added]

    def labels(self) -> list[int] | None:
        """Text rows' labels (a sample without one counts as 1); None for unlabelled data."""
        if self.data.labels is None:
            return None
        return list(self.data.labels) + [1 if s.label is None else s.label for s in self.added]


class LoopEngine(Protocol):
    """The heavy work behind the nodes (agent/engine.py `Engine` for text tasks,
    agent/pair_engine.py `PairEngine` for pair tasks; tests use fakes)."""

    def probe(self, rows: Rows) -> None: ...
    def coverage(self, rows: Rows) -> CoverageReport: ...
    def error_features(self, rows: Rows, model_dir: Path,
                       limit: int) -> list[MissingFeature]: ...
    def interpret(self, report: CoverageReport, limit: int) -> Interpreted: ...
    def generate(self, targets: Sequence[Target], settings: GenerateSettings,
                 skip: set[int], on_sample: Callable[[Sample], None]) -> list[Sample]: ...
    def verify(self, samples: Sequence[Sample], rows: Rows) -> VerifyReport: ...
    def label_check(self, samples: Sequence[Sample], model_dir: Path | None,
                    gate: LabelGateSettings) -> LabelCheck: ...
    def train(self, rows: Rows, model_dir: Path, *,
              synthetic_share: float | None = None) -> None: ...
    def evaluate(self, model_dir: Path) -> Metric | None: ...
    # the pool path (agent/pool_select.py)
    def select(self, rows: Rows, model_dir: Path, settings: SelectSettings, n: int,
               taken: set[int], seed: int) -> list[PoolPick]: ...
    def unfilled(self, rows: Rows, taken: set[int]) -> list[int]: ...
    def judge_labels(self, texts: Sequence[str], model_dir: Path,
                     gate: LabelGateSettings) -> list[int | None]: ...


class VerifySummary(BaseModel):
    generated: int
    kept: int
    rejected: int
    disputed: int = Field(0, description="rejected by the label gate (label_disputed)")
    hit_rate: float
    per_feature: dict[int, FeatureHits]
    label_judge: Judged | None = Field(
        None, description="the judges that checked labels (None: the gate was off or had "
        "nothing to check)")
    llm_agreement: float | None = Field(
        None, description="the LLM label judge's balanced accuracy on real anchor rows")

    @property
    def gate_pass_rate(self) -> float:
        return gate_pass_rate(self.kept, self.disputed)


Hook = Callable[[str, int], None]


class Steps(PoolSteps):
    """One method per graph node. `before(node, round)` runs first in every node (progress
    display; tests inject crashes there); `on_round(record)` after each round's decision.
    With `pool` (the pool path), `pool_rows` are the pool's rows (agent/pool_steps.py)."""

    def __init__(self, run_dir: Path, engine: LoopEngine, loop: LoopSettings, data: Any,
                 before: Hook | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None, *,
                 pool: PoolSource | None = None, pool_rows: TextDataset | None = None) -> None:
        self.dir = run_dir
        self.paths = RunPaths(run_dir)
        self.engine = engine
        self.loop = loop
        self.data = data
        self.pool = pool
        self.pool_rows = pool_rows
        self.before = before or (lambda node, r: None)
        self.on_round = on_round or (lambda rec: None)
        self._started = time.monotonic()

    def rows(self, upto: int) -> Rows:
        """The data as of the end of round `upto`: the starting rows plus kept samples and
        labelled pool rows, round by round."""
        return Rows(self.data, [s for r in range(1, upto + 1)
                                for path in (self.paths.data(r), self.paths.pool_data(r))
                                for s in read_samples(path)])

    # -- nodes -------------------------------------------------------------------------
    def load(self, state: LoopState) -> dict[str, Any]:
        self.before("load", 0)
        self.paths.make()
        return {"round": 0, "generated_total": 0, "metric": [], "stop_reason": None,
                "picked_total": 0, "picked": 0}

    def probe(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("probe", r)
        self.engine.probe(self.rows(r - 1))
        return {}

    def coverage(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("coverage", r)
        report = self.engine.coverage(self.rows(r - 1))
        write_text_atomic(self.paths.work(r, "coverage"), report.model_dump_json(indent=1))
        return {"fac_before": report.fac, "fac": report.fac, "n_task": report.n_task,
                "missing": [m.feature for m in report.missing]}

    def interpret(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("interpret", r)
        report = CoverageReport.model_validate_json(self.paths.work(r, "coverage").read_text())
        # graded coverage: features short of rows, largest deficit first (the missing ones
        # included); a report without it (older coverage): the binary missing list
        chosen = report.deficits or report.missing
        unfilled = self.unfilled_features(r)
        if unfilled is not None:  # --source both: only what no pool row fills
            chosen = [m for m in chosen if m.feature in unfilled]
        if self.loop.focus != "data":
            rows = self.rows(r - 1)
            if not rows.labelled:
                raise ValueError("model-centric focus needs labelled data")
            errors = self.engine.error_features(rows, self.paths.model(r - 1), self.loop.top)
            if self.loop.focus == "both":
                seen = {m.feature for m in errors}
                errors += [m for m in chosen if m.feature not in seen]
            chosen = errors
        found = self.engine.interpret(report.model_copy(update={"missing": chosen}),
                                      self.loop.top)
        write_text_atomic(self.paths.work(r, "features"), found.model_dump_json(indent=1))
        room = max(0, self.loop.budget - state.get("generated_total", 0))
        if self.loop.per_round is not None:
            room = min(room, self.loop.per_round)
        # per_feature is the round's mean per feature (fill: all of the room), spread by
        # deficit with at least 1 and at most max_per_feature (never below per_feature) each
        n = len(found.targets)
        per = self.loop.per_feature
        if self.loop.fill and n:
            per = max(per, room // n)
        total = room if self.loop.fill else min(room, per * n)
        targets = round_targets(
            found, {m.feature: m.deficit for m in chosen}, total,
            cap=max(self.loop.max_per_feature, self.loop.per_feature),
            negatives=self.loop.negatives)
        return {"targets": [t.model_dump() for t in targets], "per_feature": per}

    def _gen_settings(self, state: LoopState) -> GenerateSettings:
        r = state["round"]
        return GenerateSettings(per_feature=state.get("per_feature", self.loop.per_feature),
                                round=r, temperature=self.loop.temperature,
                                seed=self.loop.seed * 1000 + r, hosts=self.loop.hosts,
                                steer=self.loop.steer, concurrency=self.loop.concurrency,
                                generator=self.loop.generator)

    def _jobs(self, state: LoopState) -> tuple[list[Target], list[int]]:
        """The round's targets and its request seeds, in order: the one list generate
        journals against and verify reads back (targets without their own `n`, from runs
        before it, get the state's per_feature)."""
        targets = [Target.model_validate(t) for t in state.get("targets", [])]
        return targets, [q.seed for q in plan_requests(targets, self._gen_settings(state))]

    def generate(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("generate", r)
        targets, seeds = self._jobs(state)
        journal = self.paths.journal(r)
        done = {s.provenance.seed for s in read_samples(journal, torn_ok=True)}
        _truncate_torn_line(journal)
        with journal.open("a", encoding="utf-8") as f:

            def record(sample: Sample) -> None:
                f.write(sample.model_dump_json() + "\n")
                f.flush()
                os.fsync(f.fileno())

            self.engine.generate(targets, self._gen_settings(state),
                                 {s for s in done if s is not None}, record)
        return {"generated_total": state.get("generated_total", 0) + len(seeds)}

    def verify(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("verify", r)
        _, seeds = self._jobs(state)
        by_seed = {s.provenance.seed: s for s in read_samples(self.paths.journal(r))}
        lost = [s for s in seeds if s not in by_seed]
        if lost:
            raise RuntimeError(f"round {r}: {len(lost)} generated samples missing from the "
                               "journal; rerun with --resume to generate them")
        samples = [by_seed[s] for s in seeds]
        report = self.engine.verify(samples, self.rows(r - 1))
        gate, detector = self.loop.label_gate, self.paths.model(r - 1)
        check = None
        if gate.judge != "off" and report.kept:
            check = self.engine.label_check([v.sample for v in report.kept],
                                            detector if detector.exists() else None, gate)
            report = report.gated(check.ok)
        write_rows(self.paths.data(r), self.paths.rejected(r), report.kept, report.rejected)
        disputed = sum(v.reason == "label_disputed" for v in report.rejected)
        summary = VerifySummary(generated=len(samples), kept=len(report.kept),
                                rejected=len(report.rejected), disputed=disputed,
                                hit_rate=report.hit_rate, per_feature=report.per_feature,
                                label_judge=check.judged_by if check else None,
                                llm_agreement=check.llm_agreement if check else None)
        write_text_atomic(self.paths.work(r, "verify"), summary.model_dump_json(indent=1))
        return {}

    def train(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("train", r)
        rows = self.rows(r)
        if not rows.labelled:
            log.warning("the data has no labels: no detector is trained, metric stays empty")
            return {}
        self.engine.train(rows, self.paths.model(r), synthetic_share=self.loop.synthetic_share)
        return {}

    def evaluate(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("evaluate", r)
        rows = self.rows(r)
        metric = self.engine.evaluate(self.paths.model(r))
        report = self.engine.coverage(rows)
        summaries = self._summaries(r)
        verify_file = self.paths.work(r, "verify")
        verified = (VerifySummary.model_validate_json(verify_file.read_text())
                    if r > 0 and verify_file.exists() else None)
        history = History.load_or_new(self.dir)
        history.record(RoundRecord(
            round=r, fac=report.fac, fac_graded=report.fac_graded, n_task=report.n_task,
            n_missing=len(report.missing),
            missing=[MissingSummary(feature=m.feature, summary=summaries.get(m.feature, ""),
                                    log_odds=m.log_odds) for m in report.missing],
            generated=verified.generated if verified else 0,
            kept=verified.kept if verified else 0,
            rejected=verified.rejected if verified else 0,
            disputed=verified.disputed if verified else 0,
            hit_rate=verified.hit_rate if verified else 0.0,
            per_feature=verified.per_feature if verified else {},
            metric=metric, n_train=len(rows), seconds=round(time.monotonic() - self._started, 1),
            **self.pool_round(r),
        ))
        history.save(self.dir)
        return {"fac": report.fac, "missing": [m.feature for m in report.missing],
                "metric": [*state.get("metric", []), metric.value if metric else None]}

    def _summaries(self, upto: int) -> dict[int, str]:
        out: dict[int, str] = {}
        for r in range(1, upto + 1):
            path = self.paths.work(r, "features")
            if path.exists():
                found = Interpreted.model_validate_json(path.read_text())
                out.update({f.record.feature: f.record.summary for f in found.features})
        return out

    def decide(self, state: LoopState) -> dict[str, Any]:
        r = state["round"]
        self.before("decide", r)
        reason = decide(state, self.loop, self.pool)
        history = History.load(self.dir)
        record = next(x for x in history.rounds if x.round == r)
        record.stop_reason = reason
        history.save(self.dir)
        self.on_round(record)
        return {"stop_reason": reason} if reason else {"round": r + 1, "stop_reason": None}


def _truncate_torn_line(path: Path) -> None:
    """Drop a trailing partial line so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
