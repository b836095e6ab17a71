"""The run report: what an improvement run did, round by round, as one HTML page.

An improvement run directory R holds

- `R/history.json`: `{"rounds": [RoundRecord, ...]}`, round 0 being the starting data;
- `R/data/round-N.jsonl`: the kept synthetic rows of round N (`tools.verify.Sample`);
- `R/rejected/round-N.jsonl`: the rejected rows of round N plus their `reason`.

`History` is shared by the loop (which appends and saves it after every round) and by
`write_report`, which renders `R/report.html` and the charts under `R/report/`. The page
needs no network: styles are inline and images are referenced relatively.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, overload

from pydantic import BaseModel, Field, ValidationError, field_validator

from tools.data import write_text_atomic
from tools.errors import DataError
from tools.verify import FeatureHits, Sample

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
REPORT_FILE = "report.html"
IMAGE_DIR = "report"
TEMPLATE = "report.html.j2"
TOP_FEATURES = 30


# -- the run's records ---------------------------------------------------------------------


class MissingFeature(BaseModel):
    feature: int
    summary: str = Field("", description="the interpreter's one-line description")
    log_odds: float = Field(0.0, description="task relevance (positives vs negatives)")


class Metric(BaseModel):
    auprc: float
    auroc: float
    best_f1: float


class RoundRecord(BaseModel):
    """What one round measured and did; round 0 is the starting data, before synthesis."""

    round: int = Field(ge=0)
    fac: float = Field(description="feature activation coverage after this round")
    n_task: int = Field(ge=0, description="task-relevant features")
    n_missing: int = Field(ge=0, description="task features still missing after this round")
    missing: list[MissingFeature] = Field(default_factory=list)
    generated: int = 0
    kept: int = 0
    rejected: int = 0
    hit_rate: float = 0.0
    per_feature: dict[int, FeatureHits] = Field(default_factory=dict)
    metric: Metric | None = None
    n_train: int = 0
    stop_reason: str | None = None
    seconds: float = 0.0


class History(BaseModel):
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
        path = history_path(run_dir)
        if not path.is_file():
            problem = "is not a file" if path.exists() else "not found"
            raise DataError(
                f"{path}: {problem}; pass the directory of an improvement run "
                "(the loop writes history.json there after round 0)"
            )
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise DataError(f"{path}: {_first_problem(exc)}; {_REPAIR}") from exc

    def save(self, run_dir: str | Path) -> Path:
        """Write `run_dir/history.json` atomically (temp file + rename); returns the path."""
        path = history_path(run_dir)
        write_text_atomic(path, self.model_dump_json(indent=1) + "\n")
        return path

    def record(self, rec: RoundRecord) -> None:
        """Add a round, replacing an earlier record of the same round (a resumed run)."""
        self.rounds = sorted(
            [r for r in self.rounds if r.round != rec.round] + [rec], key=lambda r: r.round
        )

    @property
    def last(self) -> RoundRecord | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def stop_reason(self) -> str | None:
        """The latest stop reason recorded, None while the run has not stopped."""
        return next((r.stop_reason for r in reversed(self.rounds) if r.stop_reason), None)


class RejectedSample(Sample):
    reason: str


_REPAIR = "restore the file or re-run the loop with this run directory to rewrite it"


def _first_problem(exc: ValidationError) -> str:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return f"not valid JSON ({errors[0].get('ctx', {}).get('error', 'malformed')})"
    parts = []
    for err in errors[:3]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        parts.append(f"{loc.lstrip('.') or 'top level'}: {err['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


# -- run directory layout and sample files -------------------------------------------------


def history_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / HISTORY_FILE


def data_path(run_dir: str | Path, round_: int) -> Path:
    """Kept synthetic rows of a round."""
    return Path(run_dir) / "data" / f"round-{round_}.jsonl"


def rejected_path(run_dir: str | Path, round_: int) -> Path:
    return Path(run_dir) / "rejected" / f"round-{round_}.jsonl"


def write_samples(path: Path, samples: Iterable[BaseModel]) -> None:
    """Write samples as JSONL atomically (one JSON object per line, ASCII-safe)."""
    lines = [json.dumps(s.model_dump(mode="json")) + "\n" for s in samples]
    write_text_atomic(path, "".join(lines))


M = TypeVar("M", bound=BaseModel)


@overload
def read_samples(path: Path, *, skipped: list[str] | None = None) -> list[Sample]: ...


@overload
def read_samples(path: Path, model: type[M], *, skipped: list[str] | None = None) -> list[M]: ...


def read_samples(
    path: Path, model: type[BaseModel] = Sample, *, skipped: list[str] | None = None
) -> list[Any]:
    """Read a sample JSONL file; a missing file is empty.

    A bad line raises DataError naming file and line, or, when `skipped` is given, is
    described there and left out (the report shows what it could not read).
    """
    if not path.is_file():
        return []
    out: list[BaseModel] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            out.append(model.model_validate_json(raw))
        except ValidationError as exc:
            msg = f"{path} line {lineno}: {_first_problem(exc)}"
            if skipped is None:
                raise DataError(f"{msg}; fix or remove the line") from exc
            skipped.append(msg)
    return out


# -- the report ----------------------------------------------------------------------------


def write_report(
    run_dir: str | Path, *, samples_per_feature: int = 3, max_missing: int = 50
) -> Path:
    """Render `run_dir/report.html` (+ PNG charts in `run_dir/report/`); returns its path.

    Reads history.json (DataError when it is missing or corrupt) and the kept/rejected
    sample files; unreadable sample lines are skipped and listed in the report.
    """
    run_dir = Path(run_dir)
    history = History.load(run_dir)
    if not history.rounds:
        raise DataError(
            f"{history_path(run_dir)}: no rounds recorded yet; run at least round 0 first"
        )
    skipped: list[str] = []
    kept: dict[int, list[Sample]] = {
        r.round: read_samples(data_path(run_dir, r.round), skipped=skipped) for r in history.rounds
    }
    rejected = {r.round: read_samples(rejected_path(run_dir, r.round), RejectedSample,
                                      skipped=skipped)
                for r in history.rounds}
    for msg in skipped:
        logger.warning("report: skipped %s", msg)

    summaries = _summaries(history.rounds)
    totals = _feature_totals(history.rounds)
    images = _charts(history.rounds, totals, run_dir / IMAGE_DIR)
    context = {
        "run_dir": str(run_dir),
        "title": f"facsynth run report: {run_dir.resolve().name}",
        "rounds": [_round_view(r, history.rounds, rejected[r.round], max_missing)
                   for r in history.rounds],
        "first": history.rounds[0],
        "last": history.rounds[-1],
        "stop_reason": history.stop_reason,
        "images": {k: f"{IMAGE_DIR}/{name}" for k, name in images.items()},
        "features": _feature_views(totals, summaries, kept, samples_per_feature),
        "skipped": skipped,
    }
    html = _template().render(**context)
    out = run_dir / REPORT_FILE
    # character references keep the page readable whatever encoding the file is written in
    write_text_atomic(out, html.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    logger.info("report written to %s", out)
    return out


@cache
def _template() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(Path(__file__).resolve().parent),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    return env.get_template(TEMPLATE)


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _summaries(rounds: Sequence[RoundRecord]) -> dict[int, str]:
    """Feature -> its latest non-empty summary."""
    out: dict[int, str] = {}
    for r in rounds:
        for m in r.missing:
            if m.summary:
                out[m.feature] = m.summary
    return out


def _feature_totals(rounds: Sequence[RoundRecord]) -> dict[int, FeatureHits]:
    """Per-feature generated/activated/kept summed over all rounds."""
    acc: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in rounds:
        for f, h in r.per_feature.items():
            a = acc[f]
            a[0] += h.generated
            a[1] += h.activated
            a[2] += h.kept
    return {f: FeatureHits(generated=g, activated=a, kept=k) for f, (g, a, k) in acc.items()}


def _round_view(
    rec: RoundRecord, rounds: Sequence[RoundRecord], rejected: Sequence[RejectedSample],
    max_missing: int,
) -> dict[str, Any]:
    prev = next((r for r in reversed(rounds) if r.round < rec.round), None)
    now = {m.feature for m in rec.missing}
    covered = [] if prev is None else [m for m in prev.missing if m.feature not in now]
    missing = sorted(rec.missing, key=lambda m: -m.log_odds)
    return {
        "rec": rec,
        "missing": missing[:max_missing],
        "missing_more": max(0, len(missing) - max_missing),
        "covered": covered,
        "reasons": Counter(s.reason for s in rejected).most_common(),
    }


def _feature_views(
    totals: dict[int, FeatureHits], summaries: dict[int, str],
    kept: dict[int, list[Sample]], per_feature: int,
) -> list[dict[str, Any]]:
    by_feature: dict[int, list[Sample]] = defaultdict(list)
    for samples in kept.values():
        for s in samples:
            by_feature[s.provenance.feature].append(s)
    features = set(totals) | set(by_feature)
    order = sorted(features, key=lambda f: (-_kept(f, totals, by_feature), f))
    return [
        {
            "feature": f,
            "summary": summaries.get(f, ""),
            "hits": totals.get(f),
            "n_kept": _kept(f, totals, by_feature),
            "samples": by_feature[f][:per_feature],
        }
        for f in order
    ]


def _kept(f: int, totals: dict[int, FeatureHits], by_feature: dict[int, list[Sample]]) -> int:
    return totals[f].kept if f in totals else len(by_feature[f])


# -- charts --------------------------------------------------------------------------------


def _charts(
    rounds: Sequence[RoundRecord], totals: dict[int, FeatureHits], out_dir: Path
) -> dict[str, str]:
    """Draw the PNGs into out_dir; returns {key: file name} for those drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {"fac": "fac_metric.png", "missing": "missing.png"}
    _save(_fac_figure(rounds), out_dir / images["fac"])
    _save(_missing_figure(rounds), out_dir / images["missing"])
    if totals:
        images["features"] = "features.png"
        _save(_feature_figure(totals), out_dir / images["features"])
    else:
        (out_dir / "features.png").unlink(missing_ok=True)  # stale from an earlier report
    return images


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, no pyplot: no display and no global state
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def _round_axis(ax: Any, rounds: Sequence[RoundRecord]) -> None:
    ax.set_xticks([r.round for r in rounds])
    ax.set_xlabel("round")
    if len(rounds) == 1:
        ax.set_xlim(rounds[0].round - 1, rounds[0].round + 1)


def _fac_figure(rounds: Sequence[RoundRecord]) -> Any:
    fig, (ax,) = _figure(6.5, 3.6)
    xs = [r.round for r in rounds]
    ax.plot(xs, [r.fac for r in rounds], "o-", color="tab:blue", label="FAC")
    ax.set_ylabel("FAC", color="tab:blue")
    ax.set_ylim(0, 1.05)
    _round_axis(ax, rounds)
    scored = [r for r in rounds if r.metric is not None]
    if scored:
        ax2 = ax.twinx()
        ax2.plot([r.round for r in scored], [r.metric.auprc for r in scored if r.metric],
                 "s--", color="tab:orange", label="AUPRC")
        ax2.set_ylabel("detector AUPRC", color="tab:orange")
        ax2.set_ylim(0, 1.05)
        ax.set_title("FAC and detector AUPRC per round")
    else:
        ax.set_title("FAC per round (no detector metric recorded)")
    return fig


def _missing_figure(rounds: Sequence[RoundRecord]) -> Any:
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = _figure(6.5, 3.2)
    xs = [r.round for r in rounds]
    bars = ax.bar(xs, [r.n_missing for r in rounds], color="tab:red", width=0.6)
    ax.bar_label(bars, fmt="%d", fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("missing task features")
    ax.set_title("Missing task features per round")
    _round_axis(ax, rounds)
    return fig


def _feature_figure(totals: dict[int, FeatureHits]) -> Any:
    from matplotlib.ticker import MaxNLocator

    top = sorted(totals, key=lambda f: (-totals[f].kept, f))[:TOP_FEATURES]
    labels = [f"f{f}" for f in top]
    fig, (ax_kept, ax_hit) = _figure(11, max(3.0, 0.26 * len(top) + 1.2), ncols=2)
    ys = list(range(len(top)))
    ax_kept.barh(ys, [totals[f].kept for f in top], color="tab:green")
    ax_kept.set_yticks(ys, labels, fontsize=8)
    ax_kept.invert_yaxis()
    ax_kept.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_kept.set_xlabel("kept samples (all rounds)")
    ax_kept.set_title(f"Kept samples per feature (top {len(top)})")
    ax_hit.barh(ys, [totals[f].hit_rate for f in top], color="tab:purple")
    ax_hit.set_yticks(ys, labels, fontsize=8)
    ax_hit.invert_yaxis()
    ax_hit.set_xlim(0, 1)
    ax_hit.set_xlabel("hit rate (activated / generated)")
    ax_hit.set_title("Per-feature hit rate")
    return fig
