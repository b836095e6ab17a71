"""The results of the facsynth tools (agent/toolbox.py): pydantic models, so the chat agent gets
JSON and MCP clients get structured content with a JSON schema in the tool list."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from tools.rundir import RoundRecord


class LengthStats(BaseModel):
    min: int
    median: float
    mean: float
    max: int

    @classmethod
    def of(cls, values: Sequence[int]) -> LengthStats:
        if not values:
            return cls(min=0, median=0.0, mean=0.0, max=0)
        return cls(min=min(values), median=float(statistics.median(values)),
                   mean=round(statistics.fmean(values), 1), max=max(values))


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
    fac_graded: float = Field(0.0, description="the same, a feature counting in proportion to "
                              "its active data rows against the rows it needs")
    n_task: int
    n_covered: int
    n_missing: int
    n_deficits: int = Field(0, description="task features with fewer active rows than needed")
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
    fac_graded: float = 0.0
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
    fac_graded: float = 0.0
    n_missing: int
    generated: int
    kept: int
    hit_rate: float
    metric: float | None = Field(None, description="the eval set's headline metric")
    metric_name: str | None = Field(None, description="which: auprc (toxicity), "
                                    "pairwise_accuracy (reward), scr (steering)")
    n_train: int
    stop_reason: str | None

    @classmethod
    def of(cls, rec: RoundRecord) -> RoundInfo:
        return cls(round=rec.round, fac=rec.fac, fac_graded=rec.fac_graded,
                   n_missing=rec.n_missing,
                   generated=rec.generated, kept=rec.kept, hit_rate=rec.hit_rate,
                   metric=rec.metric.value if rec.metric else None,
                   metric_name=rec.metric.name if rec.metric else None, n_train=rec.n_train,
                   stop_reason=rec.stop_reason)


class WaitingRow(BaseModel):
    """A pool row waiting for a person's label (the pool path)."""

    row: int = Field(description="its id: give it to add_labels")
    text: str
    fills: str = Field("", description="the task features it fills, with their summaries")
    score: float | None = Field(None, description="the current model's score (1 = harmful)")


class ImproveResult(BaseModel):
    run_dir: str
    rounds: list[RoundInfo]
    fac_start: float
    fac_end: float
    stop_reason: str | None
    seconds: float
    waiting_for_labels: str | None = Field(
        None, description="the pool path: the run paused for labels; the to-label file")
    to_label: list[WaitingRow] = Field(default_factory=list, description="the rows waiting "
                                       "for a label (at most 50 shown)")
    next: str


class RunReport(BaseModel):
    run_dir: str
    report_path: str
    rounds: list[RoundInfo]


class Cancelled(BaseModel):
    """What a long chat tool returns when the user declines it."""

    cancelled: bool = True
    message: str
