"""The improve run directory, in one place: what a run was started with (`RunConfig`, saved
as `config.json`), where each file lives (`RunPaths`), what each round measured and did
(`History` of `RoundRecord`s), and the one reader and one writer of sample rows.

Layout of a run directory R:

    config.json            RunConfig: inputs, settings, loop, detector, relevance
    checkpoints.sqlite     LangGraph checkpoints (agent/graph.py)
    history.json           {"rounds": [RoundRecord, ...]}, round 0 = the starting data
    data/round-N.jsonl     kept synthetic rows of round N (tools.verify.Sample)
    data/round-N.pool.jsonl  pool rows labelled in round N (the pool path), with provenance
    labels.jsonl           every label given to a pool row (tools/pool/labels.py)
    to-label/round-N.csv   the rows of round N still waiting for a person's label (and .jsonl)
    rejected/round-N.jsonl rejected rows of round N, each with its `reason` and activation
    work/round-N.KIND.EXT  coverage, features, the generation journal, verification summary
    models/round-N/        the detector trained after round N
    report.html, report/   the HTML report (tools/report.py)

Everything here is plain files and pydantic models; the loop that fills the directory lives
in agent/ (graph, steps, runs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tools.data import write_text_atomic
from tools.detector import DetectorSettings
from tools.errors import ConfigError, DataError
from tools.label_gate import LabelGateSettings
from tools.pool.source import PoolSource
from tools.verify import FeatureHits, Sample, Verdict

Relevance = Literal["label", "llm", "auto"]
M = TypeVar("M", bound=BaseModel)


def first_problem(exc: ValidationError) -> str:
    """The first few problems of a validation error, as `where: what; ...`."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return f"not valid JSON ({errors[0].get('ctx', {}).get('error', 'malformed')})"
    parts = []
    for err in errors[:3]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        parts.append(f"{loc.lstrip('.') or 'top level'}: {err['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def read_model(path: Path, model: type[M], what: str, hint: str) -> M:
    """One JSON file as `model`; a missing or malformed file is one ConfigError naming it
    (`what` says what the file should be, `hint` how to make it)."""
    if not path.is_file():
        problem = "is a folder" if path.exists() else "not found"
        raise ConfigError(f"{path}: {problem}; {hint}")
    try:
        return model.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise ConfigError(f"{path}: not {what} ({first_problem(e)}); {hint}") from None


# -- what a run was started with ----------------------------------------------------------


class LoopSettings(BaseModel):
    """The improve loop's knobs (rounds, budgets, targets per round, stop rule)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_rounds: int = Field(3, ge=0, description="synthesis rounds at most")
    budget: int = Field(400, ge=1, description="generated samples at most, all rounds")
    epsilon: float = Field(0.01, ge=0, description="stop when a round's FAC gain is below this")
    patience: int = Field(1, ge=1, description="stop after this many rounds without a better "
                          "metric (AUPRC on the eval set)")
    top: int = Field(10, ge=1, description="missing features targeted per round")
    per_feature: int = Field(2, ge=1, description="samples generated per targeted feature")
    per_round: int | None = Field(None, ge=1, description="generated samples per round at most")
    fill: bool = Field(False, description="raise per_feature so each round spends per_round "
                       "even when few features are missing")
    max_per_feature: int = Field(
        8, ge=1, description="requests for one feature in a round at most (never below "
        "per_feature). A round's requests are spread over its features in proportion to "
        "their coverage deficit, per_feature on average (all of per_round with fill); the cap "
        "keeps one large deficit from taking the round (one run kept 18 of 26 samples for a "
        "single feature)")
    negatives: float = Field(
        0.5, ge=0, le=1, description="share of each feature's requests asked as label 0: hard "
        "negatives, harmless messages on the feature's own theme. With positives only, every "
        "synthetic row is label 1 and a detector can learn 'synthetic = toxic' (style, length) "
        "instead of the task; half and half makes the theme itself carry no label. 0: "
        "positives only (runs before this setting)")
    hosts: bool = Field(
        True, description="ground each request in a real anchor row of its label, rewritten to "
        "carry the feature's theme, so samples keep real rows' length, tone and style (real "
        "toxic rows are long role-play set-ups, generated ones short); off: write from scratch")
    generator: Literal["prompted", "adapted"] = Field(
        "prompted", description="prompted: the LLM is asked with an instruction prompt "
        "(generate_toxicity.v4); adapted: a LoRA of the embedded model trained once on the "
        "anchor (cached, minutes on CPU) writes rows of the label on the feature's theme in "
        "the anchor's own style (tools/adapted.py); hosts do not apply to it")
    steer: float = Field(
        0.0, ge=0, description="steer the generator towards each target feature while sampling: "
        "add steer x (median residual norm at the SAE's layer) along the feature's decoder "
        "direction (tools/local_llm.py); local generator only; 0: off. On smollm2-135m 0.25 "
        "doubled how often the target fired in replies, 0.5 began to garble them, 1 did")
    temperature: float = Field(0.8, ge=0, le=2)
    concurrency: int = Field(
        8, ge=1, description="generation requests in flight at once (a local or vLLM "
        "generator batches them: more is faster on CPU, up to ~32)")
    describe: Literal["llm", "spans"] = Field(
        "llm", description="how targeted features are described to the generator: llm "
        "(a summary the LLM writes, remembered; small LLMs often fail and fall back to the top "
        "span after three attempts), spans (the strongest anchor span, no LLM call: fast)")
    label_gate: LabelGateSettings = Field(
        default_factory=LabelGateSettings,
        description="how kept samples' labels are checked before they join the data")
    synthetic_share: float | None = Field(
        0.2, ge=0, lt=1, description="the kept synthetic rows' share of each label's weight "
        "in the detector (tools.detector.row_weights); None: every row weighs the same. 0.2 "
        "because left equal, ~23 synthetic positives carry ~45% of the positive weight next "
        "to ~28 real ones although their labels are only as sure as the label gate, and the "
        "share would grow each round; not yet measured against other values")
    focus: Literal["data", "model", "both"] = Field(
        "data", description="missing features: absent from the data (data), over-represented "
        "in the detector's errors on anchor rows (model), or both",
    )
    seed: int = 0


class RunSettings(BaseModel):
    """The settings a run was started with beyond defaults < facsynth.toml < env (the
    command-line flags); `--resume` applies them again."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    sae: str | None = None
    generator: Literal["auto", "endpoint", "vllm", "local"] | None = None

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RunConfig(BaseModel):
    """What `facsynth improve` was started with: `--resume` rebuilds the run from it."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field("toxicity", description="what the rows are and the downstream model "
                      "(tools/tasks: toxicity, reward, steering)")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="the task's own options, e.g. {'layer': 12} for "
        "steering (its dataclass fields)")
    anchor: str
    data: str
    eval: str | None = None
    eval_frac: float = Field(0.25, gt=0, lt=1)
    text_field: str = "text"
    label_field: str = "label"
    fields: dict[str, str] = Field(
        default_factory=dict, description="a pair task's column names, schema field -> "
        "column (e.g. {'prompt': 'question'}); text tasks use text_field/label_field")
    settings: RunSettings = RunSettings()
    loop: LoopSettings = LoopSettings()
    detector: DetectorSettings = DetectorSettings()
    relevance: Relevance = "auto"
    pool: PoolSource | None = Field(None, description="the pool path (tools/pool): real rows "
                                    "picked for labelling; None: synthesis only")

    @property
    def source(self) -> str:
        """Where a round's new rows come from: generate, pool or both."""
        return "generate" if self.pool is None else self.pool.source

    @classmethod
    def read(cls, run_dir: Path) -> RunConfig:
        return read_model(RunPaths(run_dir).config, cls, "a `facsynth improve` config",
                          f"{run_dir} is not a facsynth improve run (start one with "
                          "`facsynth improve --anchor A --data D --run-dir R`)")

    def write(self, run_dir: Path) -> None:
        write_text_atomic(RunPaths(run_dir).config, self.model_dump_json(indent=1))


# -- where each file lives ----------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """The files of the run directory `dir` (see the module doc)."""

    dir: Path
    config: Path = field(init=False)
    checkpoints: Path = field(init=False)
    history: Path = field(init=False)
    report: Path = field(init=False)
    images: Path = field(init=False)

    def __post_init__(self) -> None:
        for name, file in (("config", "config.json"), ("checkpoints", "checkpoints.sqlite"),
                           ("history", "history.json"), ("report", "report.html"),
                           ("images", "report")):
            object.__setattr__(self, name, self.dir / file)

    def data(self, r: int) -> Path:
        """Kept synthetic rows of round r."""
        return self.dir / "data" / f"round-{r}.jsonl"

    def pool_data(self, r: int) -> Path:
        """Pool rows labelled in round r, as samples with provenance (the pool path)."""
        return self.dir / "data" / f"round-{r}.pool.jsonl"

    @property
    def labels(self) -> Path:
        """The label journal of the pool path (tools/pool/labels.py)."""
        return self.dir / "labels.jsonl"

    def picks(self, r: int) -> Path:
        """The pool rows picked in round r (tools/pool/labels.PoolPick, JSONL)."""
        return self.work(r, "picks", "jsonl")

    def to_label(self, r: int, suffix: str = "csv") -> Path:
        """Round r's rows waiting for a person's label."""
        return self.dir / "to-label" / f"round-{r}.{suffix}"

    def rejected(self, r: int) -> Path:
        return self.dir / "rejected" / f"round-{r}.jsonl"

    def work(self, r: int, kind: str, suffix: str = "json") -> Path:
        """Round r's intermediate `kind` (coverage, features, generated, verify)."""
        return self.dir / "work" / f"round-{r}.{kind}.{suffix}"

    def journal(self, r: int) -> Path:
        """Round r's generated samples, appended one by one as they arrive."""
        return self.work(r, "generated", "jsonl")

    def model(self, r: int) -> Path:
        """The detector trained after round r."""
        return self.dir / "models" / f"round-{r}"

    def make(self) -> None:
        for sub in ("data", "rejected", "work", "models"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)


# -- what each round measured and did -----------------------------------------------------


class MissingSummary(BaseModel):
    """A task feature still missing after a round, as the report shows it."""

    feature: int
    summary: str = Field("", description="the interpreter's one-line description")
    log_odds: float = Field(0.0, description="task relevance (positives vs negatives)")


class Metric(BaseModel):
    """A round's downstream score on the eval set: the task's headline metric (`name`, e.g.
    auprc, pairwise_accuracy, scr; higher is better) and everything else it measured."""

    name: str = "auprc"
    value: float
    values: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _older(cls, data: Any) -> Any:
        """Runs from before tasks stored {auprc, auroc, best_f1}."""
        if isinstance(data, dict) and "value" not in data and "auprc" in data:
            return {"name": "auprc", "value": data["auprc"], "values": dict(data)}
        return data

    @property
    def label(self) -> str:
        """The headline's display name (AUPRC, pairwise accuracy, SCR)."""
        return METRIC_LABELS.get(self.name, self.name)


METRIC_LABELS = {"auprc": "AUPRC", "pairwise_accuracy": "pairwise accuracy", "scr": "SCR"}


class PickedRow(BaseModel):
    """A pool row picked in a round, as the report shows it."""

    row: int
    text: str = Field(description="the row's text, cut to 200 characters")
    label: int | None = Field(None, description="its label (None: skipped or disputed)")
    fills: list[int] = Field(default_factory=list, description="task features with a deficit "
                             "it filled")
    summaries: list[str] = Field(default_factory=list, description="what those features are "
                                 "(when interpreted)")
    score: float | None = None


class RoundRecord(BaseModel):
    """What one round measured and did; round 0 is the starting data, before synthesis."""

    round: int = Field(ge=0)
    fac: float = Field(description="feature activation coverage after this round")
    fac_graded: float = Field(0.0, description="graded FAC after this round (see "
                              "tools.coverage.GradedRule); 0.0 in runs older than it")
    n_task: int = Field(ge=0, description="task-relevant features")
    n_missing: int = Field(ge=0, description="task features still missing after this round")
    missing: list[MissingSummary] = Field(default_factory=list)
    generated: int = 0
    kept: int = 0
    rejected: int = 0
    disputed: int = Field(0, description="of the rejected: kept by the verifier, but their "
                          "label did not hold (label gate)")
    hit_rate: float = 0.0
    per_feature: dict[int, FeatureHits] = Field(default_factory=dict)
    metric: Metric | None = None
    n_train: int = 0
    stop_reason: str | None = None
    seconds: float = 0.0
    picked: int = Field(0, description="the pool path: pool rows picked this round")
    labelled: int = Field(0, description="of them, labelled (the rest skipped or disputed)")
    positives: int = Field(0, description="of the labelled, labelled 1")
    labels_total: int = Field(0, description="pool rows labelled in all rounds so far")
    labeler: str | None = Field(None, description="who labelled them (human, file, judge)")
    picks: list[PickedRow] = Field(default_factory=list, description="the rows picked this "
                                   "round, as the report shows them")


_REPAIR = "restore the file or re-run the loop with this run directory to rewrite it"


class History(BaseModel):
    """The rounds of a run, ascending; the loop saves it after every round."""

    rounds: list[RoundRecord] = Field(default_factory=list)

    @field_validator("rounds")
    @classmethod
    def _ascending(cls, rounds: list[RoundRecord]) -> list[RoundRecord]:
        numbers = [r.round for r in rounds]
        if numbers != sorted(set(numbers)):
            raise ValueError(f"round numbers must be unique and ascending, got {numbers}")
        return rounds

    @classmethod
    def load(cls, run_dir: str | Path) -> History:
        """Read `run_dir/history.json`; any problem is a DataError naming the file."""
        path = RunPaths(Path(run_dir)).history
        if not path.is_file():
            problem = "is not a file" if path.exists() else "not found"
            raise DataError(
                f"{path}: {problem}; pass the directory of an improvement run "
                "(the loop writes history.json there after round 0)"
            )
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise DataError(f"{path}: {first_problem(exc)}; {_REPAIR}") from exc

    @classmethod
    def load_or_new(cls, run_dir: Path) -> History:
        return cls.load(run_dir) if RunPaths(run_dir).history.exists() else cls()

    def save(self, run_dir: str | Path) -> Path:
        """Write `run_dir/history.json` atomically; returns the path."""
        path = RunPaths(Path(run_dir)).history
        write_text_atomic(path, self.model_dump_json(indent=1) + "\n")
        return path

    def record(self, rec: RoundRecord) -> None:
        """Add a round, replacing an earlier record of the same round (a resumed run)."""
        self.rounds = sorted(
            [r for r in self.rounds if r.round != rec.round] + [rec], key=lambda r: r.round
        )

    @property
    def stop_reason(self) -> str | None:
        """The latest stop reason recorded, None while the run has not stopped."""
        return next((r.stop_reason for r in reversed(self.rounds) if r.stop_reason), None)


# -- sample rows ----------------------------------------------------------------------------


class RejectedSample(Sample):
    reason: str
    activation: float = 0.0


@overload
def read_samples(path: Path, *, skipped: list[str] | None = None,
                 torn_ok: bool = False) -> list[Sample]: ...


@overload
def read_samples(path: Path, model: type[M], *, skipped: list[str] | None = None,
                 torn_ok: bool = False) -> list[M]: ...


def read_samples(
    path: Path, model: type[BaseModel] = Sample, *, skipped: list[str] | None = None,
    torn_ok: bool = False,
) -> list[Any]:
    """The rows of a sample JSONL file; a missing file is empty.

    A bad line raises DataError naming file and line, or, when `skipped` is given, is
    described there and left out (the report shows what it could not read). With `torn_ok`,
    a half-written last line (a process killed mid-write) is ignored.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    out: list[BaseModel] = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            out.append(model.model_validate_json(raw))
        except ValidationError as exc:
            if torn_ok and lineno == len(lines):
                break
            msg = f"{path} line {lineno}: {first_problem(exc)}"
            if skipped is None:
                raise DataError(f"{msg}; fix or remove the line") from exc
            skipped.append(msg)
    return out


def jsonl(rows: Iterable[BaseModel]) -> str:
    """Rows as JSONL, one JSON object per line."""
    return "".join(r.model_dump_json() + "\n" for r in rows)


def rejected_row(v: Verdict) -> RejectedSample:
    return RejectedSample(**v.sample.model_dump(), reason=v.reason,
                          activation=round(v.activation, 4))


def write_rows(kept_path: Path, rejected_path: Path, kept: Iterable[Verdict],
               rejected: Iterable[Verdict]) -> None:
    """The verifier's verdicts as two JSONL files (each written atomically): kept samples,
    and rejected ones with their reason and target activation."""
    write_text_atomic(kept_path, jsonl(v.sample for v in kept))
    write_text_atomic(rejected_path, jsonl(rejected_row(v) for v in rejected))
