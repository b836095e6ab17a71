"""What `facsynth compare` measured: one cached `Row` per (seed, method), their summary per
method (`MethodResult`, paired differences against the reference), the whole
`CompareResult`, and the fac runs' loop statistics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from agent.compare_settings import CompareSettings, Protocol
from tools.paired import PairedDiff, paired_diff
from tools.rundir import RunPaths
from tools.verify import gate_pass_rate


class LoopStats(BaseModel):
    """What a fac run did before the cut to equal budgets, summed over seeds."""

    requests: int
    hits: int = Field(description="samples whose target feature fired")
    kept: int
    disputed: int = Field(description="hits the label gate dropped")

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def gate_pass_rate(self) -> float:
        return gate_pass_rate(self.kept, self.disputed)


def loop_stats(folder: Path, method: str, seeds: int) -> LoopStats | None:
    """Requests, hits, kept and disputed of a fac method's runs (None: not a fac run)."""
    from tools.rundir import History

    total = LoopStats(requests=0, hits=0, kept=0, disputed=0)
    found = False
    for s in range(seeds):
        run = folder / f"s{s}" / method
        if not RunPaths(run).history.exists():
            continue
        found = True
        for r in History.load(run).rounds[1:]:
            total.requests += r.generated
            total.kept += r.kept
            total.disputed += r.disputed
            total.hits += sum(h.activated for h in r.per_feature.values())
    return total if found else None


class CurvePoint(BaseModel):
    """A pick method after k labels: the metric's mean, paired against the reference (seed)
    and pick-random at the same k, and on each extra eval file."""

    mean: float
    paired: PairedDiff | None = None
    paired_random: PairedDiff | None = None
    also: dict[str, float] = Field(default_factory=dict)
    also_paired_random: dict[str, PairedDiff] = Field(default_factory=dict)


class MethodResult(BaseModel):
    n_train: float
    n_added: float
    loop: LoopStats | None = Field(None, description="fac methods: requests, hits, gate")
    fac: float
    fac_graded: float
    metric_mean: float = Field(description="the task's headline metric (CompareResult.metric)")
    metric_std: float
    per_seed_metric: list[float]
    means: dict[str, float] = Field(default_factory=dict,
                                    description="every metric the task measured, averaged")
    label_agreement: float | None = Field(
        None, description="added rows whose label a detector trained on all real pool rows "
        "agrees with (diagnostic)")
    positive_agreement: float | None = Field(None, description="the same, label-1 rows only")
    paired: PairedDiff | None = Field(None, description="the metric minus the reference's, "
                                      "paired by seed")
    also: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per extra eval file: metric mean and paired diff")
    paired_random: PairedDiff | None = Field(
        None, description="pick methods: the metric minus pick-random's, paired by seed")
    positives: float | None = Field(None, description="pick methods: positives found among "
                                    "the labelled picks, mean over seeds")
    curve: dict[int, CurvePoint] = Field(default_factory=dict, description="pick methods: the "
                                         "learning curve, per number of labels added")
    g_vendi: float | None = Field(None, description="G-Vendi of the training sets, mean")
    calls_per_kept: float | None = Field(None, description="LLM requests per row the method "
                                         "kept (before the cut to equal budgets)")


class CompareResult(BaseModel):
    task: str = "toxicity"
    metric: str = Field("auprc", description="the headline metric every method is scored by")
    protocol: Protocol
    reference: str
    rule: str = Field(description="how kept budgets were equalised")
    external: list[str] = Field(description="knowledge beyond the protocol's labels")
    settings: CompareSettings
    n_pool: int
    n_eval: int
    n_candidates: int | None = Field(None, description="pool rows a pick method could pick "
                                     "from (per seed)")
    pool_dropped: int = Field(0, description="--pool rows dropped as copies of eval rows")
    kept: list[int] = Field(description="rows every synthetic method added, per seed")
    methods: dict[str, MethodResult]
    spearman_fac_metric: float
    spearman_graded_metric: float
    spearman_g_vendi_metric: float = float("nan")
    seconds: float = 0.0
    failures: dict[str, str] = Field(
        default_factory=dict, description="synthetic methods with fewer than half the budget "
        "of usable rows on some seeds (no row there; the message says why)")


class Row(BaseModel):
    """One (seed, method) measurement; cached in the work folder."""

    method: str
    seed: int
    n_train: int
    n_added: int
    fac: float
    fac_graded: float
    metrics: dict[str, float] = Field(description="the task's metrics on the eval rows")
    also: dict[str, dict[str, float]] = Field(default_factory=dict)
    agreement: float | None = None
    positive_agreement: float | None = None
    curve: dict[int, float] = Field(default_factory=dict, description="pick methods: the "
                                    "headline metric after k labelled picks, per k")
    also_curve: dict[str, dict[int, float]] = Field(default_factory=dict)
    positives: int | None = Field(None, description="pick methods: positives among the "
                                  "labelled picks")
    g_vendi: float | None = Field(None, description="G-Vendi of the training set (gradient-"
                                  "space diversity, tools/diversity.py)")
    llm_calls: tuple[int, int] | None = Field(None, description="(LLM requests, rows kept "
                                              "before the cut) of the method's generation")



def row_path(folder: Path, method: str, kept: int, share: float | None) -> Path:
    """Where a seed's row of `method` is kept in its `folder`. A row depends on its method,
    seed, the kept count and the synthetic share; seed and full hold no generated rows, so
    theirs holds for any kept count (one written under a kept count before is reused)."""
    tail = "" if share is None else f".w{share:g}"
    if method not in ("seed", "full"):
        return folder / f"{method}.k{kept}{tail}.json"
    path = folder / f"{method}{tail}.json"
    named = re.compile(rf"{re.escape(method)}\.k\d+{re.escape(tail)}\.json")
    older = sorted(p for p in folder.glob(f"{method}.k*.json") if named.fullmatch(p.name))
    return path if path.exists() or not older else older[0]



def summarize(rows: list[Row], settings: CompareSettings, kept: list[int],
              headline: str = "auprc") -> dict[str, MethodResult]:
    by: dict[str, list[Row]] = {}
    for row in rows:
        by.setdefault(row.method, []).append(row)
    ref = {r.seed: r for r in by.get(settings.reference, [])}
    out = {}
    for method, rs in by.items():
        score = [r.metrics[headline] for r in rs]
        paired = None
        if method != settings.reference and ref:
            paired = paired_diff(score, [ref[r.seed].metrics[headline] for r in rs])
        also: dict[str, dict[str, Any]] = {}
        for name in rs[0].also:
            mine = [r.also[name][headline] for r in rs]
            also[name] = {"metric_mean": float(np.mean(mine))}
            if method != settings.reference and ref:
                also[name]["paired"] = paired_diff(
                    mine, [ref[r.seed].also[name][headline] for r in rs]).model_dump()
        random = {r.seed: r for r in by.get("pick-random", [])}
        extra_pick: dict[str, Any] = {}
        if rs[0].curve or rs[0].positives is not None:
            extra_pick = pick_summary(rs, ref, random, headline, method)
        agree = [r.agreement for r in rs if r.agreement is not None]
        pos = [r.positive_agreement for r in rs if r.positive_agreement is not None]
        out[method] = MethodResult(
            n_train=float(np.mean([r.n_train for r in rs])),
            n_added=float(np.mean([r.n_added for r in rs])),
            fac=float(np.mean([r.fac for r in rs])),
            fac_graded=float(np.mean([r.fac_graded for r in rs])),
            metric_mean=float(np.mean(score)),
            metric_std=float(np.std(score, ddof=1)) if len(score) > 1 else 0.0,
            means={k: float(np.mean([r.metrics[k] for r in rs])) for k in rs[0].metrics},
            per_seed_metric=score, paired=paired, also=also,
            label_agreement=float(np.mean(agree)) if agree else None,
            positive_agreement=float(np.mean(pos)) if pos else None, **extra_pick,
            g_vendi=float(np.mean([r.g_vendi for r in rs if r.g_vendi is not None]))
            if any(r.g_vendi is not None for r in rs) else None,
            calls_per_kept=(sum(r.llm_calls[0] for r in rs if r.llm_calls) /
                            max(1, sum(r.llm_calls[1] for r in rs if r.llm_calls)))
            if any(r.llm_calls for r in rs) else None,
        )
    return out


def pick_summary(rs: list[Row], ref: dict[int, Row], random: dict[int, Row], headline: str,
                 method: str) -> dict[str, Any]:
    """A pick method's learning curve, positives and pairing against pick-random."""
    def paired(mine: list[float], other: dict[int, Row], key: Any) -> PairedDiff | None:
        if method == "pick-random" and other is random or not other:
            return None
        vals = [key(other[r.seed]) for r in rs if r.seed in other]
        if len(vals) != len(rs) or any(v is None for v in vals):
            return None
        return paired_diff(mine, vals)

    out: dict[str, Any] = {"positives": float(np.mean([r.positives or 0 for r in rs]))}
    out["paired_random"] = paired([r.metrics[headline] for r in rs], random,
                                  lambda r: r.metrics[headline])
    points = sorted(set.intersection(*(set(r.curve) for r in rs))) if rs else []
    curve = {}
    for k in points:
        mine = [r.curve[k] for r in rs]
        also_names = sorted(set.intersection(*(set(r.also_curve) for r in rs)))
        curve[k] = CurvePoint(
            mean=float(np.mean(mine)),
            paired=paired(mine, ref, lambda r: r.metrics[headline]),
            paired_random=paired(mine, random, lambda r, k=k: r.curve.get(k)),
            also={n: float(np.mean([r.also_curve[n][k] for r in rs])) for n in also_names
                  if all(k in r.also_curve[n] for r in rs)},
            also_paired_random={
                n: d for n in also_names
                if (d := paired([r.also_curve[n].get(k, np.nan) for r in rs], random,
                                lambda r, n=n, k=k: r.also_curve.get(n, {}).get(k)))
                is not None})
    out["curve"] = curve
    return out


def spearman(methods: dict[str, MethodResult], field: str) -> float:
    from scipy.stats import spearmanr

    known = [m for m in methods.values() if getattr(m, field) is not None]
    if len(known) < 3:
        return float("nan")
    xs = [getattr(m, field) for m in known]
    ys = [m.metric_mean for m in known]
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


def failed_methods(folder: Path, settings: CompareSettings) -> dict[str, str]:
    """method -> which seeds it failed on and the first seed's reason."""
    out = {}
    for m in settings.synthetic():
        seeds = [s for s in range(settings.seeds)
                 if (folder / f"s{s}" / f"{m}.failed.json").exists()]
        if seeds:
            first = json.loads((folder / f"s{seeds[0]}" / f"{m}.failed.json").read_text())
            out[m] = f"failed on seeds {', '.join(map(str, seeds))}: {first['error']}"
    return out
