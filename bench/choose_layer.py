"""Which layer should the embedded model's SAE read? A small measured comparison.

For each candidate layer: train a TopK SAE (same code as `facsynth train-sae`, smaller
budget) on permissively licensed texts from ../shared/data, then on ToxicChat (a fixed
stratified 75/25 split; the 25% is only scored) measure
  - held-out explained variance and dead-latent fraction of the SAE,
  - how many features the label judge finds relevant on the 75%,
  - how well those features separate toxic from benign rows: AUPRC / AUROC of a
    logistic regression on their max activations, trained on the 75%, scored on the 25%.
Prints a markdown table and writes JSON.

    python bench/choose_layer.py --layers 8 15 22 --n-vectors 150000 --json bench/out/layers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split

from tools.coverage import JudgeSettings, label_judge
from tools.data import load_texts
from tools.models import load_model
from tools.probe import ProbeSettings, encode, length_buckets, residuals
from tools.sae import HookPoint, load_sae
from tools.sae_train import TrainSettings, collect, train
from tools.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity"
PERMISSIVE = [
    "convabuse_trainval", "openai_moderation", "xstest", "simplesafetytests", "harmbench",
    "davidson", "hatecheck", "toxigen_demos", "alpaca_eval_benign", "arena_hard_benign",
]


def corpus(max_per_file: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for name in PERMISSIVE:
        rows = load_texts(DATA / f"{name}.jsonl", label_field=None).texts
        pick = rng.permutation(len(rows))[:max_per_file]
        texts += [rows[i] for i in pick]
    return texts


def max_acts_per_layer(lm, saes, texts, settings):  # type: ignore[no-untyped-def]
    hooks = [s.hook for s in saes]
    out = [np.zeros((len(texts), s.d_sae), dtype=np.float32) for s in saes]
    encoded = encode(lm.tokenizer, texts, settings)
    for idx in length_buckets([len(e.ids) for e in encoded], settings):
        captured, counted = residuals(lm, hooks, [encoded[i] for i in idx])
        for j, s in enumerate(saes):
            resid = captured[s.hook]
            for b, i in enumerate(idx):
                if counted[b].any():
                    acts = s.encode(resid[b][counted[b]])
                    out[j][i] = acts.max(dim=0).values.numpy()
    return out


def separation(x_tr, y_tr, x_te, y_te, delta: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import scipy.sparse as sp

    mask = label_judge(JudgeSettings())(sp.csr_matrix((x_tr > delta).astype(np.float32)),
                                        list(y_tr))
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", C=0.5)
    clf.fit(np.log1p(x_tr[:, mask]), y_tr)
    p = clf.predict_proba(np.log1p(x_te[:, mask]))[:, 1]
    return {"n_relevant": int(mask.sum()), "auprc": float(average_precision_score(y_te, p)),
            "auroc": float(roc_auc_score(y_te, p))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 15, 22])
    ap.add_argument("--n-vectors", type=int, default=150_000)
    ap.add_argument("--max-per-file", type=int, default=3000)
    ap.add_argument("--work", type=Path, default=Path("bench/out/choose_layer"))
    ap.add_argument("--json", type=Path, default=Path("bench/out/choose_layer.json"))
    args = ap.parse_args()
    settings = Settings()
    lm = load_model(settings.model, cache_dir=settings.home)
    ts = TrainSettings(n_vectors=args.n_vectors)
    hooks = [HookPoint(f"model.layers.{layer}") for layer in args.layers]
    t0 = time.time()
    n = collect(lm, hooks, corpus(args.max_per_file), args.work, ts)
    print(f"collected {n} vectors per layer in {time.time() - t0:.0f}s", flush=True)
    results: dict[int, dict[str, float]] = {}
    for layer, hook in zip(args.layers, hooks, strict=True):
        work = args.work / f"layer{layer}"
        (work / "activations").mkdir(parents=True, exist_ok=True)
        src = args.work / "activations" / f"{hook.module}-{hook.side}.f16"
        dst = work / "activations" / src.name
        if not dst.exists():
            dst.symlink_to(src.resolve())
        t0 = time.time()
        if not (work / "sae" / "cfg.json").exists():
            metrics = train(hook, n, lm.model.config.hidden_size, work, ts, lm.identity)
            (work / "metrics.json").write_text(json.dumps(metrics))
        results[layer] = json.loads((work / "metrics.json").read_text())
        print(f"layer {layer}: trained in {time.time() - t0:.0f}s", flush=True)
    saes = [load_sae(str(args.work / f"layer{layer}" / "sae")) for layer in args.layers]
    tc = load_texts(DATA / "toxicchat_train.jsonl", require_labels=True)
    y = np.asarray(tc.labels)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    maxes = max_acts_per_layer(lm, saes, tc.texts, ProbeSettings(max_tokens=128))
    for layer, m in zip(args.layers, maxes, strict=True):
        nz = m[m > 0]
        for name, delta in (("delta0", 0.0), ("delta_median", float(np.median(nz)))):
            sep = separation(m[tr], y[tr], m[te], y[te], delta)
            results[layer].update({f"{name}_{k}": v for k, v in sep.items()})
            results[layer][f"{name}_value"] = delta
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    cols = ["explained_variance", "dead_fraction", "delta0_n_relevant", "delta0_auprc",
            "delta_median_value", "delta_median_n_relevant", "delta_median_auprc",
            "delta_median_auroc"]
    print("| layer | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for layer, r in results.items():
        print(f"| {layer} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
