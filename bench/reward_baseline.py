"""The reward task's baseline (issue 13 item 3): held-out pairwise accuracy of the
Bradley-Terry head (tools/tasks/reward.py) on the embedded model's mean layer residual,
trained on a small seed and on every pair outside dev.

    python bench/reward_baseline.py [--data ../shared/data/reward/hh_rlhf_dev.jsonl]
        [--seeds 3] [--seed-sizes 200] [--dev-frac 0.25] [--limit N] [--json out.json]

Per split seed s: dev = a prompt-grouped `dev_frac` of the pairs, seed = `seed_size` pairs
of the rest, "all" = every pair outside dev (`RewardTask.seed_pool_dev`). Each text is
prompt[-600:] + response, probed once (through the activation cache). Last line:
`seed200=… all=… n_dev=…` (mean pairwise accuracy over split seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.data import TextDataset  # noqa: E402
from tools.settings import Settings  # noqa: E402
from tools.tasks import PairDataset, RewardTask  # noqa: E402
from tools.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "reward" / "hh_rlhf_dev.jsonl"


def probe_all(ws: Workspace, texts: list[str]) -> dict[str, np.ndarray]:
    """Mean layer residual of every distinct text, probed once, by text."""
    unique = list(dict.fromkeys(texts))
    done = [0]
    t0 = time.monotonic()

    def progress(n: int) -> None:
        done[0] += n
        if done[0] % 500 < n or done[0] == len(unique):
            print(f"  probed {done[0]}/{len(unique)} texts, {time.monotonic() - t0:.0f}s",
                  file=sys.stderr, flush=True)

    pooled = ws.probe(TextDataset(unique, None, "reward"), progress).pooled()
    print(f"probed {len(unique)} texts in {time.monotonic() - t0:.0f}s", flush=True)
    return dict(zip(unique, pooled, strict=True))


def shorter_wins(data: PairDataset) -> float:
    """Accuracy of 'the shorter response is preferred' (a tie counts half)."""
    c = np.array([len(x) for x in data.chosen])
    r = np.array([len(x) for x in data.rejected])
    return float(np.mean(c < r) + 0.5 * np.mean(c == r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", type=int, default=3, help="split seeds 0..N-1")
    ap.add_argument("--seed-sizes", type=int, nargs="+", default=[200])
    ap.add_argument("--dev-frac", type=float, default=0.25)
    ap.add_argument("--limit", type=int, default=None, help="a fixed random subset of pairs")
    ap.add_argument("--c", type=float, default=RewardTask().c, help="the head's inverse L2")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "reward_baseline.json")
    args = ap.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} is absent: this benchmark needs ../shared/data/reward "
                         "(see ../shared/data/README.md); nothing was measured")
    task = RewardTask(c=args.c)
    data = task.load(args.data)
    if args.limit is not None and args.limit < len(data):
        pick = np.random.default_rng(0).permutation(len(data))[: args.limit]  # nested
        data = data.subset(sorted(pick.tolist()))
    good, bad = task.texts(data)
    print(f"{len(data)} pairs from {args.data.name}; dev {args.dev_frac:.0%} per split seed, "
          f"seeds {args.seed_sizes} + all, split seeds 0..{args.seeds - 1}, C={args.c}",
          flush=True)
    ws = Workspace(Settings())
    table = probe_all(ws, [*good, *bad])

    def features(texts: Sequence[str]) -> np.ndarray:
        return np.stack([table[t] for t in texts])

    results: dict[str, list[float]] = {}
    length: list[float] = []
    n_dev: list[int] = []
    n_all: list[int] = []
    for s in range(args.seeds):
        for k in args.seed_sizes:
            split = task.seed_pool_dev(data, seed_size=k, dev_frac=args.dev_frac, seed=s)
            dev = data.subset(split.dev)
            model = task.fit(data.subset(split.seed), features, seed=s)
            results.setdefault(f"seed{k}", []).append(
                task.metric(model, dev, features)["pairwise_accuracy"])
        rest = np.concatenate([split.seed, split.pool])
        model = task.fit(data.subset(rest), features, seed=s)
        results.setdefault("all", []).append(task.metric(model, dev, features)["pairwise_accuracy"])
        length.append(shorter_wins(dev))
        n_dev.append(len(dev))
        n_all.append(len(rest))

    print(f"\n| training pairs | pairwise accuracy (mean ± std over {args.seeds} split seeds) "
          "| per seed |")
    print("|---|---|---|")
    for name, accs in results.items():
        size = f"{name[4:]}" if name.startswith("seed") else f"all ({min(n_all)}-{max(n_all)})"
        a = np.array(accs)
        std = a.std(ddof=1) if len(a) > 1 else 0.0
        print(f"| {size} | {a.mean():.3f} ± {std:.3f} | {' '.join(f'{x:.3f}' for x in a)} |")
    print(f"| (shorter response wins, no training) | {np.mean(length):.3f} | "
          f"{' '.join(f'{x:.3f}' for x in length)} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n_pairs": len(data), "n_dev": n_dev, "n_all": n_all,
                                     "c": args.c, "accuracy": results,
                                     "shorter_wins": length}, indent=2) + "\n")
    means = " ".join(f"{k}={np.mean(v):.3f}" for k, v in results.items())
    print(f"\n{means} n_dev={int(np.mean(n_dev))}")


if __name__ == "__main__":
    main()
