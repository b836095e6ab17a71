"""Probe throughput, re-probe cost and memory, measured side by side in one run.

(a) naive: full-model forward with output_hidden_states=True, fixed batches of 16 in
    input order (no bucketing), then the SAE on the chosen layer;
(b) facsynth's probe: length buckets, forward stopped at the SAE's layer, no LM head.
Then a cold probe through an empty activation cache, and a re-probe after changing 1% of
the rows. Both paths see the same tokens (same truncation, same counted positions).

    python bench/probe.py [--data ../shared/data/toxicity/toxicchat_train.jsonl] [--n 1000]

Last line: speedup=<naive time / probe time> reprobe_frac=<warm / cold> peak_rss_gb=<x>
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from memory.activation_cache import ActivationCache
from tools.data import load_texts
from tools.probe import encode, probe_texts, reference_max_acts
from tools.settings import Settings
from tools.workspace import Workspace

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/toxicity/toxicchat_train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description="probe benchmark (see module doc)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sae", default=None, help="SAE spec (default: the model profile's)")
    args = ap.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} is absent: this benchmark needs ../shared/data")
    settings = Settings(sae=args.sae)
    ws = Workspace(settings)
    lm, sae, ps = ws.model, ws.sae, settings.probe_settings()
    rng = np.random.default_rng(0)
    all_texts = load_texts(args.data, label_field=None).texts
    texts = [all_texts[i] for i in rng.permutation(len(all_texts))[: args.n]]
    n_tokens = sum(int(e.counted.sum()) + 1 for e in encode(lm.tokenizer, texts, ps))
    print(f"{len(texts)} texts, {n_tokens} tokens (max_tokens={ps.max_tokens}), "
          f"SAE {sae.spec} at {sae.hook.module}", flush=True)

    t0 = time.perf_counter()
    naive = reference_max_acts(texts, lm, sae, ps, batch_size=16)
    t_naive = time.perf_counter() - t0
    print(f"(a) naive   {t_naive:7.1f}s  {n_tokens / t_naive:7.0f} tok/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cache = ActivationCache(Path(tmp) / "acts.sqlite")
        t0 = time.perf_counter()
        cold = probe_texts(texts, lm, sae, ps, cache=cache)
        t_cold = time.perf_counter() - t0
        print(f"(b) probe   {t_cold:7.1f}s  {n_tokens / t_cold:7.0f} tok/s  (cold, cache filled)")
        err = float(np.abs(cold.max_matrix().toarray() - naive).max())
        print(f"    max |probe - naive| = {err:.2e}")
        changed = list(texts)
        for i in rng.choice(len(texts), size=max(1, len(texts) // 100), replace=False):
            changed[i] = changed[i] + " (edited)"
        t0 = time.perf_counter()
        probe_texts(changed, lm, sae, ps, cache=cache)
        t_warm = time.perf_counter() - t0
        print(f"    re-probe after changing 1% of rows: {t_warm:.2f}s")
        cache.close()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"speedup={t_naive / t_cold:.2f} reprobe_frac={t_warm / t_cold:.4f} "
          f"peak_rss_gb={peak_gb:.2f}")


if __name__ == "__main__":
    main()
