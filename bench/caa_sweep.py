"""The steering task's baseline: CAA steering vectors (tools/tasks/steering.py) on the
embedded model, per layer and multiplier, for CAA's sycophancy and survival-instinct sets;
and what coverage sees of each set's probe contrast (|F_task| and its top features).

    FACSYNTH_HOME=bench/out/home python bench/caa_sweep.py
        [--behaviors sycophancy survival-instinct] [--train 200] [--dev 60]
        [--layers 3 6 ... 27] [--multipliers 1 4] [--coverage-rows 300] [--json out.json]

Per behaviour: dev = a fixed 25% of the questions (`SteeringTask.split`, seed 0, persona /
template groups on one side), of which `--dev` are scored; the vectors are fit on `--train`
questions of the rest (a fixed random draw), both option orders each. The table: per layer
and multiplier, robust accuracy (both option orders) unsteered, at +m and -m, and
SCR = acc_plus - acc_minus, with the vector's norm. Coverage: the label judge on the probe
contrast (stem tail + matching option: 1, + not-matching option: 0) of `--coverage-rows`
training questions. FACSYNTH_HOME defaults to bench/out/home here. Last line:
`<behavior>: best_layer=… scr=… n_task=…` per behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FACSYNTH_HOME", str(ROOT / "bench" / "out" / "home"))

from tools.coverage import feature_stats  # noqa: E402
from tools.probe import top_spans  # noqa: E402
from tools.settings import Settings  # noqa: E402
from tools.tasks.pairs import PairDataset  # noqa: E402
from tools.tasks.steering import SteeringTask  # noqa: E402
from tools.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "steering"


def draw(idx: np.ndarray, n: int, seed: int) -> list[int]:
    """A fixed random `n` of the indices (all when fewer), sorted."""
    pick = np.random.default_rng(seed).permutation(idx)[:n]
    return sorted(pick.tolist())


def coverage_side(ws: Workspace, task: SteeringTask, data: PairDataset, top: int) -> dict:
    """|F_task| of the data's probe contrast (anchor = data, so FAC is 1 by construction)
    and its `top` task features by log-odds, with a span each."""
    s = ws.settings
    contrast = task.probe_texts(data).dataset()
    t0 = time.monotonic()
    result = ws.measure(contrast, contrast)
    assert contrast.labels is not None
    pos, neg, log_odds = feature_stats(result.anchor_active, contrast.labels, s.judge.smoothing)
    ids = np.flatnonzero(result.task)
    ranked = sorted(ids.tolist(), key=lambda f: -log_odds[f])[:top]
    spans = top_spans(ws.probe(contrast), contrast.texts, ws.model.tokenizer,
                      s.probe_settings(), ranked, 1, s.span_window)
    # matching-side features vs the reverse contrast (features of not-matching answers)
    reverse = (neg >= s.judge.support_for(len(data))) & (-log_odds >= s.judge.min_log_odds)
    return {"n_texts": len(contrast.texts), "n_task": result.report.n_task,
            "n_task_reverse": int(reverse.sum()),
            "n_active": result.report.n_active_anchor, "seconds": time.monotonic() - t0,
            "top": [{"feature": f, "pos": int(pos[f]), "neg": int(neg[f]),
                     "log_odds": round(float(log_odds[f]), 2),
                     "span": spans.get(f, [(0, "", 0.0)])[0][1]} for f in ranked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--behaviors", nargs="+", default=["sycophancy", "survival-instinct"])
    ap.add_argument("--train", type=int, default=200, help="training questions per behaviour")
    ap.add_argument("--dev", type=int, default=60, help="dev questions scored per behaviour")
    ap.add_argument("--layers", type=int, nargs="+", default=list(range(3, 30, 3)))
    ap.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--coverage-rows", type=int, default=300)
    ap.add_argument("--top", type=int, default=5, help="top task features to show")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "caa_sweep.json")
    args = ap.parse_args()
    paths = {b: DATA / f"{b}_generate.jsonl" for b in args.behaviors}
    absent = [str(p) for p in paths.values() if not p.exists()]
    if absent:
        raise SystemExit(f"{', '.join(absent)} absent: this benchmark needs ../shared/data/"
                         "steering (see ../shared/data/README.md); nothing was measured")
    start = time.monotonic()
    ws = Workspace(Settings())
    task = SteeringTask(batch_size=args.batch_size).bind(ws)
    print(f"model {ws.model.name} ({len(ws.model.model.get_decoder().layers)} layers) loaded "
          f"in {time.monotonic() - start:.0f}s; home {ws.settings.home}", flush=True)
    out: dict[str, dict] = {}
    for behavior, path in paths.items():
        data = task.load(path)
        rest, held = task.split(data, 0.25, seed=0)
        train = data.subset(draw(rest, args.train, 1))
        dev = data.subset(draw(held, args.dev, 2))
        cov = coverage_side(ws, task, data.subset(draw(rest, args.coverage_rows, 3)), args.top)
        print(f"\n## {behavior}: {len(data)} questions; train {len(train)} (of {len(rest)}), "
              f"dev {len(dev)} (of {len(held)})", flush=True)
        print(f"coverage: {cov['n_texts']} probe texts, {cov['n_active']} active features, "
              f"n_task={cov['n_task']} (reverse contrast: {cov['n_task_reverse']}), "
              f"{cov['seconds']:.0f}s", flush=True)
        for f in cov["top"]:
            print(f"  feature {f['feature']}: pos {f['pos']} neg {f['neg']} log-odds "
                  f"{f['log_odds']} span {f['span']!r}", flush=True)
        t0 = time.monotonic()
        table = task.sweep(train, dev, args.layers, args.multipliers)
        seconds = time.monotonic() - t0
        print(f"\nsweep: {len(args.layers)} layers x {len(args.multipliers)} multipliers in "
              f"{seconds:.0f}s\n", flush=True)
        print("| layer | multiplier | norm | acc_zero | acc_plus | acc_minus | scr | p_plus "
              "| p_minus |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in table:
            print(f"| {int(r['layer'])} | {r['multiplier']:g} | {r['norm']:.2f} | "
                  f"{r['acc_zero']:.3f} | {r['acc_plus']:.3f} | {r['acc_minus']:.3f} | "
                  f"{r['scr']:+.3f} | {r['p_plus']:.3f} | {r['p_minus']:.3f} |", flush=True)
        out[behavior] = {"n": len(data), "train": len(train), "dev": len(dev),
                         "sweep_seconds": seconds, "sweep": table, "coverage": cov}
    total = time.monotonic() - start
    print(f"\ntotal {total:.0f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                     "total_seconds": total, "results": out}, indent=1) + "\n")
    for behavior, res in out.items():
        best = max(res["sweep"], key=lambda r: (r["scr"], -r["multiplier"]))
        print(f"{behavior}: best_layer={int(best['layer'])} x{best['multiplier']:g} "
              f"scr={best['scr']:+.3f} n_task={res['coverage']['n_task']}")


if __name__ == "__main__":
    main()
