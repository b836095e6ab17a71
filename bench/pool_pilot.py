"""Dev-split pilot of the pool strategies (tools/pool/select.py), for designing `fac`.

    python bench/pool_pilot.py --seeds 5 --budget 200 --batch 25 \
        --strategy random --strategy top-score --strategy fac:score_power=1 ...

ToxicChat train only (the shared file): compare's fixed group-aware 25% dev split is held
out, the rest is the pool; per seed a stratified 10% seed set is labelled, the rest of the
pool is unlabelled until picked. Each round fits the probe detector (mean layer-8 residual)
on the labelled rows, scores the unpicked pool, picks a batch, reveals its labels. AUPRC on
the dev split (and ConvAbuse train+val as a second distribution) at each curve point,
paired against random. A quick loop over arrays; `facsynth compare --labels pool` is the
product path and must give the same numbers for the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.cli.compare import parse_assignments  # noqa: E402
from tools.coverage import activity, feature_thresholds  # noqa: E402
from tools.data import TextDataset, load_texts  # noqa: E402
from tools.detector import evaluate, score, train_probe_detector  # noqa: E402
from tools.paired import paired_diff  # noqa: E402
from tools.pool.select import PoolView, SelectSettings, curve_points, pick_new  # noqa: E402
from tools.settings import Settings  # noqa: E402
from tools.splits import near_duplicate_groups  # noqa: E402
from tools.tasks import ToxicityTask  # noqa: E402
from tools.verify import NearDuplicates  # noqa: E402
from tools.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "toxicity"


def run(name: str, s: SelectSettings, seed: int, pool: TextDataset, x: np.ndarray,
        act, groups: np.ndarray, ev_x: np.ndarray, ev_y: list[int], also: tuple,
        budget: int, points: list[int]) -> dict:
    """One seed: pick `budget` rows in rounds of `s.batch`, then score the seed plus each
    curve point's prefix of the picks (as `facsynth compare --labels pool` does)."""
    task = ToxicityTask()
    rest, seed_idx = task.split(pool, 0.1, seed)
    y_all = np.asarray(pool.labels)
    labelled = list(seed_idx)
    cand = [int(i) for i in rest]
    seen = NearDuplicates(s.near_threshold)
    seen.add_all([pool.texts[i] for i in labelled])
    picked: list[int] = []
    rnd = 0
    while len(picked) < budget:
        model = train_probe_detector(x[labelled], y_all[labelled], seed=seed)
        n = min(s.batch, budget - len(picked))
        open_rows = np.array([i for i in cand if i not in set(picked)])
        view = PoolView(active=act[open_rows], pooled=x[open_rows],
                        scores=score(model, x[open_rows]),
                        labelled_active=act[labelled], labelled_pooled=x[labelled],
                        labels=y_all[labelled], groups=groups[open_rows])
        texts = [pool.texts[i] for i in open_rows]
        got = [int(open_rows[p.row]) for p in pick_new(view, s, n, texts, seen,
                                                         seed=seed * 1000 + rnd)]
        picked += got
        labelled += got
        rnd += 1
        if not got:
            break
    out: dict = {"auprc": {}, "also": {}, "positives": {}}
    for k in [0, *points]:
        rows = list(seed_idx) + picked[:k]
        model = train_probe_detector(x[rows], y_all[rows], seed=seed)
        out["auprc"][k] = evaluate(score(model, ev_x), ev_y).auprc
        out["also"][k] = evaluate(score(model, also[0]), also[1]).auprc
        out["positives"][k] = int(y_all[picked[:k]].sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--points", type=int, nargs="*", default=[25, 50, 100, 200])
    ap.add_argument("--strategy", action="append", default=[],
                    help="NAME or NAME:key=value,... (SelectSettings fields)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "pool_pilot.json")
    args = ap.parse_args()
    t0 = time.monotonic()
    ws = Workspace(Settings())
    task = ToxicityTask()
    anchor = task.load(DATA / "toxicchat_train.jsonl", require_labels=True)
    keep, held = task.split(anchor, 0.25, 0)
    pool, ev = anchor.subset(keep), anchor.subset(held)
    conv = load_texts(DATA / "convabuse_trainval.jsonl", require_labels=True)
    probe = ws.probe(pool)
    x = probe.pooled()
    rule = ws.settings.activity_rule()
    thr = feature_thresholds(rule, probe.max_matrix())
    act = activity(probe, rule, thr).tocsr()
    ev_x = ws.probe(ev).pooled()
    assert conv.labels is not None
    also = (ws.probe(conv).pooled(), conv.labels)
    groups = near_duplicate_groups(pool.texts)
    assert pool.labels is not None and ev.labels is not None and conv.labels is not None
    print(f"probed in {time.monotonic() - t0:.0f}s: pool {len(pool)}, dev {len(ev)}, "
          f"convabuse {len(conv)}", flush=True)
    points = curve_points(args.budget, args.batch, args.points)
    full = train_probe_detector(x, pool.labels, seed=0)
    dev_full = 100 * evaluate(score(full, ev_x), ev.labels).auprc
    print(f"full pool ({len(pool)} rows): dev {dev_full:.1f}"
          f" convabuse {100 * evaluate(score(full, also[0]), also[1]).auprc:.1f}", flush=True)
    cache_path = args.json.with_suffix(".cache.json")
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    results: dict = {}
    for spec in ["random", *[s for s in args.strategy if s != "random"]]:
        name, _, rest = spec.partition(":")
        s = SelectSettings(**{"strategy": name, "batch": args.batch,
                              **parse_assignments(rest, spec)})
        key = json.dumps([s.model_dump(), args.seeds, args.budget, points])
        if key not in cache:
            cache[key] = [run(spec, s, seed, pool, x, act, groups, ev_x, ev.labels, also,
                              args.budget, points) for seed in range(args.seeds)]
            cache_path.write_text(json.dumps(cache, default=str))
        per_seed = [{part: {int(k): v for k, v in r[part].items()} for part in r}
                    for r in cache[key]]
        results[spec] = per_seed
        line = []
        for k in [0, *points]:
            vals = [100 * r["auprc"].get(k, np.nan) for r in per_seed]
            line.append(f"k{k}={np.mean(vals):.1f}")
        conv_line = " ".join(f"{np.mean([100 * r['also'][k] for r in per_seed]):.1f}"
                             for k in points)
        print(f"{spec:40s} " + " ".join(line) + "  pos@max="
              f"{np.mean([r['positives'].get(points[-1], 0) for r in per_seed]):.0f}"
              f"  convabuse {conv_line}", flush=True)
    base = results.get("random")
    if base:
        for spec, per_seed in results.items():
            if spec == "random":
                continue
            diffs = []
            for k in points:
                d = paired_diff([100 * r["auprc"][k] for r in per_seed],
                                [100 * r["auprc"][k] for r in base])
                diffs.append(f"k{k} {d.mean:+.1f} [{d.low:+.1f},{d.high:+.1f}]")
            print(f"vs random {spec:31s} " + "  ".join(diffs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
