"""The run report: what an improvement run did, round by round, as one HTML page.

`write_report` reads a run directory (layout and records: tools/rundir.py) and renders
`R/report.html` and the charts under `R/report/`. The page needs no network: styles are
inline and images are referenced relatively.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tools.data import write_text_atomic
from tools.errors import DataError, FacsynthError
from tools.rundir import (
    History,
    RejectedSample,
    RoundRecord,
    RunPaths,
    read_samples,
)
from tools.verify import FeatureHits, Sample

logger = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
TOP_FEATURES = 30


# -- the report ----------------------------------------------------------------------------


def write_report(
    run_dir: str | Path, *, samples_per_feature: int = 3, max_missing: int = 50
) -> Path:
    """Render `run_dir/report.html` (+ PNG charts in `run_dir/report/`); returns its path.

    Reads history.json (DataError when it is missing or corrupt) and the kept/rejected
    sample files; unreadable sample lines are skipped and listed in the report.
    """
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    history = History.load(run_dir)
    if not history.rounds:
        raise DataError(f"{paths.history}: no rounds recorded yet; run at least round 0 first")
    skipped: list[str] = []
    kept: dict[int, list[Sample]] = {
        r.round: read_samples(paths.data(r.round), skipped=skipped) for r in history.rounds
    }
    rejected = {r.round: read_samples(paths.rejected(r.round), RejectedSample, skipped=skipped)
                for r in history.rounds}
    for msg in skipped:
        logger.warning("report: skipped %s", msg)

    summaries = _summaries(history.rounds)
    totals = _feature_totals(history.rounds)
    images = _charts(history.rounds, totals, paths.images)
    scored = [r.metric for r in history.rounds if r.metric is not None]
    task = _task(run_dir)
    context = {
        "run_dir": str(run_dir),
        "title": f"facsynth run report ({task} task): {run_dir.resolve().name}",
        "metric_label": scored[0].label if scored else "metric",
        "metric_extra": [k for k in (scored[0].values if scored else {})
                         if k not in (scored[0].name, "n", "n_positive")],
        "rounds": [_round_view(r, history.rounds, rejected[r.round], max_missing)
                   for r in history.rounds],
        "first": history.rounds[0],
        "last": history.rounds[-1],
        "stop_reason": history.stop_reason,
        "graded": _has_graded(history.rounds),
        "images": {k: f"{paths.images.name}/{name}" for k, name in images.items()},
        "features": _feature_views(totals, summaries, kept, samples_per_feature),
        "pool": [r for r in history.rounds if r.picked],
        "labeler": next((r.labeler for r in history.rounds if r.labeler), None),
        "skipped": skipped,
    }
    html = _template().render(**context)
    out = paths.report
    # character references keep the page readable whatever encoding the file is written in
    write_text_atomic(out, html.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    logger.info("report written to %s", out)
    return out


@cache
def _task(run_dir: Path) -> str:
    """The run's task as its config says (toxicity for runs from before tasks)."""
    from tools.rundir import RunConfig

    try:
        return RunConfig.read(run_dir).task
    except FacsynthError:
        return "toxicity"


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


def _has_graded(rounds: Sequence[RoundRecord]) -> bool:
    """Whether the run recorded graded FAC: runs from before it have 0.0 in every round
    (a real 0.0 everywhere would mean the data never covered anything, binary FAC 0 too)."""
    return any(r.fac_graded > 0 for r in rounds)


def _summaries(rounds: Sequence[RoundRecord]) -> dict[int, str]:
    """Feature -> its latest non-empty summary."""
    out: dict[int, str] = {}
    for r in rounds:
        for m in r.missing:
            if m.summary:
                out[m.feature] = m.summary
    return out


def _feature_totals(rounds: Sequence[RoundRecord]) -> dict[int, FeatureHits]:
    """Per-feature generated/activated/kept/disputed summed over all rounds."""
    acc: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in rounds:
        for f, h in r.per_feature.items():
            a = acc[f]
            a[0] += h.generated
            a[1] += h.activated
            a[2] += h.kept
            a[3] += h.disputed
    return {f: FeatureHits(generated=g, activated=a, kept=k, disputed=d)
            for f, (g, a, k, d) in acc.items()}


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
    if any(r.picked for r in rounds) and any(r.metric for r in rounds):
        images["labels"] = "labels_curve.png"
        _save(_labels_figure(rounds), out_dir / images["labels"])
    return images


def _labels_figure(rounds: Sequence[RoundRecord]) -> Any:
    """The pool path's learning curve: the metric against the pool rows labelled so far."""
    fig, (ax,) = _figure(6.5, 3.4)
    scored = [r for r in rounds if r.metric is not None]
    xs = [r.labels_total for r in scored]
    ax.plot(xs, [r.metric.value for r in scored if r.metric], "o-", color="tab:purple")
    for r in scored:
        if r.round:
            ax.annotate(f"+{r.positives} pos.", (r.labels_total, r.metric.value if r.metric
                        else 0), textcoords="offset points", xytext=(4, -12), fontsize=7)
    name = scored[0].metric.label if scored[0].metric else "metric"
    ax.set_xlabel("pool rows labelled")
    ax.set_ylabel(name)
    ax.set_title(f"Learning curve: {name} against labels added (positives found per round)")
    return fig


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
    if _has_graded(rounds):
        ax.plot(xs, [r.fac_graded for r in rounds], "^:", color="tab:green",
                label="graded FAC")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("FAC", color="tab:blue")
    ax.set_ylim(0, 1.05)
    _round_axis(ax, rounds)
    scored = [r for r in rounds if r.metric is not None]
    if scored:
        ax2 = ax.twinx()
        name = scored[0].metric.label if scored[0].metric else "metric"
        ax2.plot([r.round for r in scored], [r.metric.value for r in scored if r.metric],
                 "s--", color="tab:orange", label=name)
        ax2.set_ylabel(f"downstream {name}", color="tab:orange")
        ax2.set_ylim(0, 1.05)
        ax.set_title(f"FAC and downstream {name} per round")
    else:
        ax.set_title("FAC per round (no downstream metric recorded)")
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
