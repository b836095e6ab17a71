"""Does FAC predict detector quality? The paper's RQ1 at our scale, plus a calibration grid.

From the anchor file (default: ToxicChat train rows) a fixed stratified 25% is held out as
the evaluation split (or --eval PATH is used and the whole anchor is the pool). From the
remaining pool, many equal-size training subsets are built by recipes that differ in
coverage (bench/subsets.py: random, stratified, cluster-ablated, greedy max/min coverage,
positive swaps). For each subset: the AUPRC on the evaluation rows of the `probe` detector
(logistic regression on the frozen mean residual, tools/detector.py) and, for every
configuration of the grid (SAE, threshold, pooling, judge), its FAC against the pool's task
features. Reports Spearman / Pearson over subsets per configuration, a table, a scatter
plot of the best configuration, and JSON. The eval split never enters thresholds, judges
or subsets.

    python bench/fac_predicts.py --sae default=sae_weights/smollm2-135m \\
        --sae w16k=runs/sae-l8-16k/sae --json bench/out/fac.json --plot bench/out/fac.png

Last line: spearman=<x> pearson=<y> n_subsets=<n>  (the best configuration)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `bench` is not installed

from bench.subsets import all_recipes  # noqa: E402
from memory.activation_cache import ActivationCache  # noqa: E402
from tools.coverage import (  # noqa: E402
    ActivityRule,
    JudgeSettings,
    activity,
    feature_thresholds,
    label_judge,
)
from tools.data import load_texts  # noqa: E402
from tools.detector import evaluate, score, train_probe_detector  # noqa: E402
from tools.probe import ProbeResult, cache_namespace, probe_many  # noqa: E402
from tools.sae import load_sae  # noqa: E402
from tools.settings import Settings  # noqa: E402
from tools.splits import stratified_split  # noqa: E402
from tools.workspace import Workspace  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity"


def rules(anchor_max: sp.csr_matrix) -> list[tuple[str, ActivityRule]]:
    """Absolute deltas at global quantiles of the anchor's non-zero maxima (so one grid fits
    SAEs of any scale), per-feature quantiles, each with max and 2-token count pooling."""
    del anchor_max  # the rules below set their thresholds from it themselves
    out = [("abs@q0", ActivityRule(delta=0.0))]
    for q in (0.5, 0.75, 0.9):
        out.append((f"abs@q{q:g}", ActivityRule(threshold="anchor-quantile", quantile=q)))
    for q in (0.25, 0.5, 0.75, 0.9):
        out.append((f"feat-q{q:g}", ActivityRule(threshold="quantile", quantile=q)))
    return out + [
        (f"{name}+count2", rule.model_copy(update={"pooling": "count", "min_tokens": 2}))
        for name, rule in list(out)
    ]


JUDGES = [
    JudgeSettings(min_support=s, min_support_frac=0, min_log_odds=lo)
    for s, lo in ((3, 1.0), (5, 1.5), (10, 2.0))
]


def fac_per_subset(active: sp.csr_matrix, task: np.ndarray, subsets: list[Any]) -> np.ndarray:
    task_cols = active[:, np.flatnonzero(task)].tocsr()
    return np.array([
        (np.asarray(task_cols[s.rows].sum(axis=0)).ravel() > 0).sum() / max(1, task.sum())
        for s in subsets
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description="FAC vs detector quality (see module doc)")
    ap.add_argument("--anchor", type=Path, default=DATA / "toxicchat_train.jsonl")
    ap.add_argument("--eval", type=Path, default=None, help="held-out file (else 25%% split)")
    ap.add_argument("--sae", action="append", default=[], metavar="NAME=SPEC",
                    help="SAEs to compare (repeatable); first one drives the subset recipes")
    ap.add_argument("--n", type=int, default=300, help="rows per training subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("bench/out/fac_predicts.json"))
    ap.add_argument("--plot", type=Path, default=Path("bench/out/fac_predicts.png"))
    args = ap.parse_args()
    if not args.anchor.exists():
        raise SystemExit(f"{args.anchor} is absent: this experiment needs ../shared/data")
    settings = Settings()
    ws = Workspace(settings)
    specs = dict(s.split("=", 1) for s in args.sae) or {"default": ws.sae.spec}
    anchor = load_texts(args.anchor, require_labels=True)
    if args.eval:
        held = load_texts(args.eval, require_labels=True)
        texts, labels = anchor.texts + held.texts, (anchor.labels or []) + (held.labels or [])
        pool, ev = np.arange(len(anchor)), np.arange(len(anchor), len(texts))
    else:
        texts, labels = anchor.texts, anchor.labels or []
        pool, ev = stratified_split(labels, 0.25, args.seed)
    y = np.asarray(labels)
    print(f"pool {len(pool)} rows ({y[pool].sum()} positive), eval {len(ev)} rows "
          f"({y[ev].sum()} positive), subsets of {args.n}", flush=True)

    ps = settings.probe_settings()
    saes = {name: load_sae(spec) for name, spec in specs.items()}
    results: dict[str, ProbeResult] = {}
    for hook in dict.fromkeys(s.hook for s in saes.values()):
        group = [n for n, s in saes.items() if s.hook == hook]
        caches = [ActivationCache(settings.home / "activations" /
                                  f"{cache_namespace(ws.model, saes[n], ps)}.sqlite")
                  for n in group]
        t0 = time.time()
        for name, res in zip(group, probe_many(texts, ws.model, [saes[n] for n in group], ps,
                                               caches=caches), strict=True):
            results[name] = res
        print(f"probed {len(texts)} texts for {group} at {hook.module} in "
              f"{time.time() - t0:.0f}s", flush=True)

    first = next(iter(saes))
    pooled = results[first].pooled()
    base_max = results[first].max_matrix()
    base_rule = settings.activity_rule()
    base_active = activity(results[first], base_rule, feature_thresholds(base_rule, base_max[pool]))
    base_task = label_judge(settings.judge)(base_active[pool], list(y[pool]))
    subsets = all_recipes(pool, labels, pooled, base_active, base_task, args.n, args.seed)
    auprc = []
    for s in subsets:
        model = train_probe_detector(pooled[s.rows], y[s.rows], seed=args.seed)
        auprc.append(evaluate(score(model, pooled[ev]), y[ev]).auprc)
    auprc_arr = np.array(auprc)
    print(f"{len(subsets)} subsets; AUPRC {auprc_arr.min():.3f}..{auprc_arr.max():.3f} "
          f"(mean {auprc_arr.mean():.3f})", flush=True)

    rows: list[dict[str, Any]] = []
    activities: dict[tuple[str, str], sp.csr_matrix] = {}
    for name, res in results.items():
        amax = res.max_matrix()
        for (rname, rule), judge in itertools.product(rules(amax[pool]), JUDGES):
            key = (name, rname)
            if key not in activities:  # one activity matrix per rule, shared by the judges
                activities[key] = activity(res, rule, feature_thresholds(rule, amax[pool]))
            act = activities[key]
            task = label_judge(judge)(act[pool], list(y[pool]))
            if task.sum() < 5:
                continue
            fac = fac_per_subset(act, task, subsets)
            rho = float(spearmanr(fac, auprc_arr).statistic) if fac.std() > 0 else float("nan")
            pear = float(pearsonr(fac, auprc_arr).statistic) if fac.std() > 0 else float("nan")
            rows.append({
                "sae": name, "d_sae": res.d_sae, "layer": saes[name].hook.layer,
                "rule": rname, "rule_detail": rule.model_dump(),
                "min_support": judge.min_support, "min_log_odds": judge.min_log_odds,
                "n_task": int(task.sum()), "fac_min": float(fac.min()),
                "fac_max": float(fac.max()), "spearman": rho, "pearson": pear,
                "fac": fac.round(4).tolist(),
            })
    rows.sort(key=lambda r: -np.nan_to_num(r["spearman"], nan=-9))
    header = "| sae | layer | rule | support | log-odds | F_task | FAC range | spearman | pearson |"
    print(header + "\n" + "|---" * 9 + "|")
    for r in rows[:20]:
        print(f"| {r['sae']} ({r['d_sae']}) | {r['layer']} | {r['rule']} | {r['min_support']} | "
              f"{r['min_log_odds']:g} | {r['n_task']} | {r['fac_min']:.3f}-{r['fac_max']:.3f} | "
              f"{r['spearman']:.3f} | {r['pearson']:.3f} |")
    best = rows[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "subsets": [{"recipe": s.recipe, "name": s.name, "n": len(s.rows),
                     "positives": int(y[s.rows].sum()), "auprc": a}
                    for s, a in zip(subsets, auprc, strict=True)],
        "configs": rows,
    }, indent=1))
    plot(best, subsets, auprc_arr, args.plot)
    print(f"spearman={best['spearman']:.3f} pearson={best['pearson']:.3f} "
          f"n_subsets={len(subsets)}")


def plot(best: dict[str, Any], subsets: list[Any], auprc: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    fac = np.array(best["fac"])
    for recipe in dict.fromkeys(s.recipe for s in subsets):
        sel = [i for i, s in enumerate(subsets) if s.recipe == recipe]
        ax.scatter(fac[sel], auprc[sel], label=recipe, s=28)
    ax.set_xlabel("FAC of the training subset")
    ax.set_ylabel("detector AUPRC on held-out rows")
    ax.set_title(f"{best['sae']} · {best['rule']} · support {best['min_support']}: "
                 f"ρ={best['spearman']:.2f}, r={best['pearson']:.2f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
