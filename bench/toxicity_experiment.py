"""Does FAC-targeted synthesis beat the alternatives on real held-out toxicity data?

    python bench/toxicity_experiment.py --anchor ../shared/data/toxicity/toxicchat_train.jsonl \
        --seeds 5 --budget 100 --json bench/out/toxicity.json

    python bench/toxicity_experiment.py --anchor ../shared/data/toxicity/toxicchat_train.jsonl \
        --labels pool --methods seed pick-fac pick-random pick-uncertainty pick-top-score \
        pick-coreset --budget 200 --curve 25 50 100 200 --seeds 10 --json bench/out/pool.json

A thin caller of `facsynth compare` (agent/compare.py has the protocol: group-aware held-out
split, seed sets per seed, equal kept budgets, paired differences). It runs the seed
protocol by default (`--labels anchor` or `pool` for the others) and writes

    {"methods": {name: {n_train, fac, fac_graded, auprc_mean, auprc_std, auroc_mean,
                        paired_vs_seed, paired_vs_random, positives, curve}},
     "spearman_fac_auprc": x, "spearman_graded_auprc": y, "compare": <the full result>}

`paired_vs_seed` is {mean, low, high, n, per_seed} of AUPRC minus seed's on the same seeds;
`paired_vs_random` the same against pick-random (pick methods under --labels pool).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.compare import DEFAULT_METHODS, FIXED, CompareSettings, run_compare  # noqa: E402
from agent.compare_report import curve_table, html_report, table  # noqa: E402
from agent.runs import build_settings  # noqa: E402
from tools.data import write_text_atomic  # noqa: E402
from tools.detector import DetectorSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--also-eval", type=Path, nargs="*", default=[])
    ap.add_argument("--seed-frac", type=float, default=0.1)
    ap.add_argument("--budget", type=int, default=100, help="kept rows every method adds")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--top", type=int, default=50, help="missing features targeted per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--request-factor", type=float, default=3.0)
    ap.add_argument("--labels", choices=["seed", "anchor", "pool"], default="seed")
    ap.add_argument("--pool", type=Path, default=None,
                    help="--labels pool: rows to pick from (default: the anchor's own)")
    ap.add_argument("--curve", type=int, nargs="*", default=[],
                    help="--labels pool: label counts of the learning curve")
    ap.add_argument("--batch", type=int, default=25, help="--labels pool: rows per round")
    ap.add_argument("--select", default="", help="--labels pool: selection settings "
                    "key=value,... for every pick method")
    ap.add_argument("--detector", choices=["probe", "lora"], default="probe")
    ap.add_argument("--relevance", choices=["label", "llm", "auto"], default="label")
    ap.add_argument("--generator", default=None, help="auto, endpoint, vllm or local")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--variant", nargs="*", default=[],
                    help="NAME:key=value,... (see facsynth compare --help)")
    ap.add_argument("--set", dest="loop", default="", help="loop settings key=value,...")
    ap.add_argument("--synthetic-share", type=float, default=None)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "toxicity")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "openai", "chromadb", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from agent.cli.compare import parse_assignments, parse_variants

    settings = CompareSettings(
        methods=args.methods, variants=parse_variants(args.variant),
        loop=parse_assignments(args.loop, "--set"), labels=args.labels, budget=args.budget,
        seeds=args.seeds, seed_frac=args.seed_frac, rounds=args.rounds, top=args.top,
        request_factor=args.request_factor, relevance=args.relevance,
        synthetic_share=args.synthetic_share, detector=DetectorSettings(kind=args.detector),
        select={"batch": args.batch, **parse_assignments(args.select, "--select")},
        curve=args.curve)
    unknown = set(settings.methods) - set(FIXED) - set(settings.variants)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")

    def seed_done(s: int, rows: list) -> None:  # type: ignore[type-arg]
        print(f"seed {s}: " + ", ".join(f"{r.method}={100 * r.metrics['auprc']:.1f} (+{r.n_added})"
                                         for r in rows), flush=True)

    settings.check()
    result = run_compare(args.anchor, settings, work=args.work, eval_path=args.eval,
                         also=args.also_eval, app_settings=build_settings(
                             generator=args.generator),
                         progress=lambda what: logging.info(what), on_seed=seed_done,
                         pool_path=args.pool)
    from rich.console import Console

    Console(width=200).print(table(result))
    if settings.picks():
        Console(width=200).print(curve_table(result))
    methods = {}
    for name, m in result.methods.items():
        methods[name] = {
            "n_train": m.n_train, "fac": m.fac, "fac_graded": m.fac_graded,
            "auprc_mean": m.metric_mean, "auprc_std": m.metric_std,
            "auroc_mean": m.means.get("auroc"),
            # compare pairs each method with the reference on the seeds it has a row for
            # (a method that failed on a seed has none there)
            "paired_vs_seed": m.paired.model_dump()
            if m.paired is not None and result.reference == "seed" else None,
            "paired_vs_random": m.paired_random.model_dump() if m.paired_random else None,
            "positives": m.positives,
            "curve": {k: p.model_dump() for k, p in m.curve.items()},
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, __import__("json").dumps({
        "methods": methods, "spearman_fac_auprc": result.spearman_fac_metric,
        "spearman_graded_auprc": result.spearman_graded_metric,
        "compare": result.model_dump(mode="json"),
    }, indent=2))
    write_text_atomic(args.json.with_suffix(".html"), html_report(result))
    print(f"spearman_fac_auprc={result.spearman_fac_metric:.3f} "
          f"spearman_graded_auprc={result.spearman_graded_metric:.3f} "
          f"seconds={result.seconds:.0f}")


if __name__ == "__main__":
    main()
