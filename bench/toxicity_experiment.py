"""Does FAC-targeted synthesis beat the alternatives on real held-out toxicity data?

    python bench/toxicity_experiment.py --anchor ../shared/data/toxicity/toxicchat_train.jsonl \
        --seeds 3 --budget 200 --json bench/out/toxicity.json

Without --eval, a fixed stratified 25% of the anchor file is held out (seed 0) and never
used as anchor, seed or synthesis context. From the rest (the pool, which is the anchor
that defines the task features), each seed s draws a stratified `--seed-frac` seed set.
Methods, each a detector trained on seed + its additions and scored on the held-out rows:

    seed       nothing added
    full       all remaining pool rows
    fac        facsynth's improve loop, round 1 (`--budget` generated samples, verified)
    fac-r2     round 2 (another `--budget`; 2x the generation budget of the others)
    fac-relabel  fac's kept samples labelled by the seed detector instead of "1"
    random, self-instruct, evol-instruct, magpie
               the baseline synthesizers (tools/baselines.py) at `--budget` samples each

Targeted methods label their samples 1 (they are asked for toxic messages); magpie's
untargeted queries are labelled by the detector trained on the seed set alone, so no method
sees more labels than the seed's.
FAC is every method's training set measured against the pool. Generated sets are cached in
`--work` so a rerun only trains and scores. The last line is the Spearman correlation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.llm import open_llm  # noqa: E402
from agent.runs import run_loop, start_run  # noqa: E402
from tools.baselines import BaselineSettings, magpie_prefix, synthesize  # noqa: E402
from tools.data import TextDataset, load_texts, write_text_atomic  # noqa: E402
from tools.detector import (  # noqa: E402
    DetectorSettings,
    Metrics,
    evaluate,
    fit_detector,
    summarize,
)
from tools.rundir import (  # noqa: E402
    History,
    LoopSettings,
    RunConfig,
    RunPaths,
    read_samples,
)
from tools.settings import Settings  # noqa: E402
from tools.splits import stratified_split  # noqa: E402
from tools.verify import Sample  # noqa: E402
from tools.workspace import Workspace  # noqa: E402

BASELINES = ["random", "self-instruct", "evol-instruct", "magpie"]
METHODS = ["seed", "full", "fac", "fac-r2", "fac-relabel", *BASELINES]


def subset(d: TextDataset, idx: Any, name: str) -> TextDataset:
    assert d.labels is not None
    return TextDataset(texts=[d.texts[i] for i in idx], labels=[d.labels[i] for i in idx],
                       source=name)


def plus(d: TextDataset, samples: list[Sample], default_label: int = 1) -> TextDataset:
    assert d.labels is not None
    return TextDataset(
        texts=d.texts + [s.text for s in samples],
        labels=d.labels + [default_label if s.label is None else s.label for s in samples],
        source=d.source + f"+{len(samples)}",
    )


class Scorer:
    def __init__(self, ws: Workspace, pool: TextDataset, ev: TextDataset,
                 det: DetectorSettings) -> None:
        self.ws, self.pool, self.ev, self.det = ws, pool, ev, det

    def features(self, d: TextDataset) -> np.ndarray | None:
        return self.ws.probe(d).pooled() if self.det.needs_features else None

    def fit(self, d: TextDataset, seed: int) -> Any:
        folder = None
        if self.det.kind == "lora":
            from tools.models import resolve_model_source

            folder = resolve_model_source(self.ws.settings.model, self.ws.settings.home)[0]
        assert d.labels is not None
        return fit_detector(self.det, d.texts, d.labels, features=self.features(d),
                            model_folder=folder, seed=seed, device=self.ws.settings.device)

    def score(self, d: TextDataset, seed: int) -> tuple[Metrics, float]:
        model = self.fit(d, seed)
        scores = model.score(self.ev.texts, features=self.features(self.ev))
        assert self.ev.labels is not None
        return evaluate(scores, self.ev.labels), self.ws.coverage(self.pool, d).fac


def label_with(scorer: Scorer, model: Any, samples: list[Sample]) -> list[Sample]:
    d = TextDataset(texts=[x.text for x in samples], labels=None, source="magpie")
    y = (model.score(d.texts, features=scorer.features(d)) >= 0.5).astype(int)
    return [x.model_copy(update={"label": int(v)}) for x, v in zip(samples, y, strict=True)]


def run_fac(ws: Workspace, llm: Any, pool: TextDataset, ev: TextDataset, seed_set: TextDataset,
            args: argparse.Namespace, run_dir: Path, seed: int) -> list[list[Sample]]:
    """The real improve loop (agent/runs.py) for two rounds; returns the kept samples of
    rounds 1 and 2. Its inputs are written into the run folder, so a rerun resumes."""
    inputs = run_dir / "inputs"
    for name, part in (("pool", pool), ("seed", seed_set), ("eval", ev)):
        assert part.labels is not None
        write_text_atomic(inputs / f"{name}.jsonl", "".join(
            json.dumps({"text": t, "label": y}) + "\n"
            for t, y in zip(part.texts, part.labels, strict=True)))
    loop = LoopSettings(max_rounds=2, budget=2 * args.budget, per_round=args.budget, fill=True,
                        top=args.top, per_feature=2, epsilon=0.0, patience=100, seed=seed)
    cfg = RunConfig(anchor=str(inputs / "pool.jsonl"), data=str(inputs / "seed.jsonl"),
                    eval=str(inputs / "eval.jsonl"), relevance=args.relevance, loop=loop)
    resuming = RunPaths(run_dir).config.exists()
    if not resuming:
        cfg = start_run(run_dir, cfg)
    run_loop(run_dir, cfg, resuming, workspace=ws, llm=llm,
             before=lambda node, r: logging.info("seed %d round %d: %s", seed, r, node))
    hist = History.load(run_dir)
    for r in hist.rounds[1:]:
        print(f"  seed {seed} fac round {r.round}: generated {r.generated}, kept {r.kept} "
              f"(hit rate {r.hit_rate:.0%}), FAC {r.fac:.3f}", flush=True)
    return [read_samples(RunPaths(run_dir).data(r)) for r in (1, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--seed-frac", type=float, default=0.1)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--top", type=int, default=50, help="missing features targeted per round")
    ap.add_argument("--detector", choices=["probe", "lora"], default="probe")
    ap.add_argument("--relevance", choices=["label", "llm", "auto"], default="label")
    ap.add_argument("--generator", default=None, help="auto, endpoint, vllm or local")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "toxicity")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "openai", "chromadb", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    anchor = load_texts(args.anchor, require_labels=True)
    if args.eval:
        pool, ev = anchor, load_texts(args.eval, require_labels=True)
    else:
        assert anchor.labels is not None
        keep, held = stratified_split(anchor.labels, 0.25, seed=0, texts=anchor.texts)
        pool, ev = subset(anchor, keep, "pool"), subset(anchor, held, "eval")
    settings = Settings(**({"generator": args.generator} if args.generator else {}))
    ws = Workspace(settings)
    det = DetectorSettings(kind=args.detector)
    scorer = Scorer(ws, pool, ev, det)
    print(f"pool {len(pool)} rows, eval {len(ev)} rows ({sum(ev.labels or [])} positive); "
          f"budget {args.budget}, {args.seeds} seeds, detector {args.detector}", flush=True)

    results: dict[str, list[tuple[Metrics, float, int]]] = {m: [] for m in args.methods}
    # generated sets are cached per everything that shapes them, so a rerun with another
    # budget, top, seed fraction, relevance, generator or eval file never reuses them
    shape = json.dumps([args.budget, args.top, args.seed_frac, args.relevance, args.generator,
                        str(args.eval), str(args.anchor)])
    cache = args.work / hashlib.sha256(shape.encode()).hexdigest()[:12]
    start = time.monotonic()
    with open_llm(settings, args.work, ws) as llm:
        for s in range(args.seeds):
            assert pool.labels is not None
            rest_idx, seed_idx = stratified_split(pool.labels, args.seed_frac, seed=s,
                                                  texts=pool.texts)
            seed_set = subset(pool, seed_idx, f"seed{s}")
            positives = [t for t, y in zip(seed_set.texts, seed_set.labels or [], strict=True)
                         if y == 1]
            full = TextDataset(texts=seed_set.texts + [pool.texts[i] for i in rest_idx],
                               labels=(seed_set.labels or [])
                               + [(pool.labels)[i] for i in rest_idx], source="full")
            added: dict[str, list[Sample]] = {"seed": []}
            if {"fac", "fac-r2"} & set(args.methods):
                r1, r2 = run_fac(ws, llm, pool, ev, seed_set, args, cache / f"s{s}" / "fac", s)
                added["fac"], added["fac-r2"] = r1, r1 + r2
            for method in BASELINES:
                if method not in args.methods:
                    continue
                path = cache / f"s{s}" / f"{method}.jsonl"
                if path.exists():
                    added[method] = read_samples(path)
                    continue
                t0 = time.monotonic()
                prefix = magpie_prefix(ws.model.tokenizer) if method == "magpie" else None
                bs = BaselineSettings(seed=s, magpie_prefix=prefix, max_tokens=96)
                samples = synthesize(method, seeds=positives, budget=args.budget,  # type: ignore[arg-type]
                                     client=llm, settings=bs)
                write_text_atomic(path, "".join(x.model_dump_json() + "\n" for x in samples))
                added[method] = samples
                print(f"  seed {s} {method}: {len(samples)} samples in "
                      f"{time.monotonic() - t0:.0f}s", flush=True)
            seed_model = scorer.fit(seed_set, s)
            if "magpie" in added:  # unlabelled queries: the seed detector labels them
                added["magpie"] = label_with(scorer, seed_model, added["magpie"])
            if "fac" in added:  # a weak generator misses the asked-for label: check it
                added["fac-relabel"] = label_with(scorer, seed_model, added["fac"])
            for method in args.methods:
                data = full if method == "full" else plus(seed_set, added[method])
                metrics, fac = scorer.score(data, s)
                results[method].append((metrics, fac, len(data)))
                print(f"seed {s} {method:14s} n={len(data):5d} FAC={fac:.3f} "
                      f"AUPRC={metrics.auprc:.3f} AUROC={metrics.auroc:.3f}", flush=True)

    table: dict[str, dict[str, float]] = {}
    for method, rows in results.items():
        summary = summarize([m for m, _, _ in rows])
        table[method] = {
            "n_train": float(np.mean([n for _, _, n in rows])),
            "fac": float(np.mean([f for _, f, _ in rows])),
            "auprc_mean": summary["auprc_mean"], "auprc_std": summary["auprc_std"],
            "auroc_mean": summary["auroc_mean"],
        }
    facs = [table[m]["fac"] for m in table]
    auprcs = [table[m]["auprc_mean"] for m in table]
    rho = float(spearmanr(facs, auprcs).statistic) if len(table) > 2 else float("nan")
    print(f"\n{'method':14s} {'n_train':>8s} {'FAC':>6s} {'AUPRC':>14s} {'AUROC':>6s}")
    for m, row in table.items():
        print(f"{m:14s} {row['n_train']:8.0f} {row['fac']:6.3f} "
              f"{100 * row['auprc_mean']:6.1f} ± {100 * row['auprc_std']:4.1f} "
              f"{100 * row['auroc_mean']:6.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps({
        "methods": table, "spearman_fac_auprc": rho,
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": round(time.monotonic() - start),
    }, indent=2))
    print(f"spearman_fac_auprc={rho:.3f} seconds={time.monotonic() - start:.0f}")


if __name__ == "__main__":
    main()
