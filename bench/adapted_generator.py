"""How long does the adapted generator take to train, and what does it write?

    python bench/adapted_generator.py --anchor ../shared/data/toxicity/toxicchat_train.jsonl \
        --max-examples 600 --max-tokens 33000 --features 3 --per-label 10 \
        --json bench/out/adapted.json

On the anchor's dev pool (the file minus the fixed stratified 25% held out, as `improve`
and `compare` split it): themes from the default workspace's coverage, the adapter trained
(or reused from the cache under FACSYNTH_HOME/adapters: pass --fresh to retrain into a
temporary home), then `--per-label` samples of each label for the `--features` task features
active on the most anchor positives. Prints training time, tokens/s and the samples, with
whether each hits its feature and whether it copies an anchor row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from agent.compare import split_pool  # noqa: E402
from agent.runs import build_settings  # noqa: E402
from tools.adapted import (  # noqa: E402
    PROMPT,
    AdapterSettings,
    adapter_examples,
    anchor_themes,
    encode_example,
    ensure_adapter,
    load_adapted,
    pick_examples,
    read_info,
)
from tools.data import TextDataset, load_texts  # noqa: E402
from tools.generate import GenerateSettings, Target, agenerate  # noqa: E402
from tools.models import resolve_model_source  # noqa: E402
from tools.probe import top_spans  # noqa: E402
from tools.tasks import ToxicityTask  # noqa: E402
from tools.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--max-examples", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=33_000,
                    help="training tokens at most (~115/s on 2 cores: ~5 minutes)")
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--per-label", type=int, default=10)
    ap.add_argument("--fresh", action="store_true", help="train into a temporary home")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.anchor.exists():
        sys.exit(f"{args.anchor} is missing: this benchmark reads ../shared/data/")

    ws = Workspace(build_settings())
    pool, _ = split_pool(ToxicityTask(), load_texts(args.anchor, require_labels=True), None, 0.25)
    assert pool.labels is not None
    t0 = time.monotonic()
    themes, spans = anchor_themes(ws, pool)
    s = AdapterSettings(max_examples=args.max_examples)
    examples = adapter_examples(pool.texts, pool.labels, themes, spans,
                                max_chars=s.max_chars, seed=s.seed)
    chosen = pick_examples(examples, pool.labels, s)
    tokens = sum(len(encode_example(ws.model.tokenizer, e, s.max_tokens)[0]) for e in chosen)
    if tokens > args.max_tokens:  # fewer examples, so training fits the time budget
        s = s.model_copy(update={"max_examples": len(chosen) * args.max_tokens // tokens})
        chosen = pick_examples(examples, pool.labels, s)
        tokens = sum(len(encode_example(ws.model.tokenizer, e, s.max_tokens)[0])
                     for e in chosen)
    print(f"pool {len(pool.texts)} rows ({sum(pool.labels)} positive); themes in "
          f"{time.monotonic() - t0:.0f} s; {len(chosen)} examples, {tokens} tokens")
    print("example:", json.dumps(chosen[0])[:300])

    home = Path(tempfile.mkdtemp(prefix="adapted-")) if args.fresh else ws.settings.home
    folder, identity = resolve_model_source(ws.settings.model, ws.settings.home)
    t0 = time.monotonic()
    path = ensure_adapter(home, folder, identity, chosen, s, device=ws.settings.device)
    info = read_info(path)
    print(f"adapter {path} ready in {time.monotonic() - t0:.0f} s; training: {info.seconds:.0f} s,"
          f" {info.tokens} tokens, {info.tokens_per_s:.0f} tokens/s, {info.steps} steps, "
          f"loss {info.first_loss:.3f} -> {info.last_loss:.3f}")

    chat = load_adapted(folder, path, cache_dir=ws.settings.home, device=ws.settings.device,
                        max_new_tokens=ws.settings.max_new_tokens)
    cov = ws.measure(pool, pool)
    active = cov.anchor_active.tocsc()
    y = np.asarray(pool.labels)
    support = np.asarray(active[y == 1].sum(axis=0)).ravel() * cov.task
    features = [int(f) for f in np.argsort(-support)[: args.features]]
    got = top_spans(ws.probe(pool), pool.texts, ws.model.tokenizer,
                    ws.settings.probe_settings(), features, 3, ws.settings.span_window)
    targets = [Target(feature=f, summary=got[f][0][1], spans=[t for _, t, _ in got[f]],
                      label=label, n=args.per_label)
               for f in features for label in (1, 0)]
    gs = GenerateSettings(generator="adapted", concurrency=16, seed=0)
    t0 = time.monotonic()
    samples = asyncio.run(agenerate(targets, chat, gs, prompt=PROMPT))
    gen_s = time.monotonic() - t0
    acts = ws.probe(TextDataset(texts=[x.text for x in samples], labels=None, source="adapted"))
    maxes = acts.max_matrix().tocsr()
    rows = set(pool.texts)
    out: list[dict[str, Any]] = []
    for i, x in enumerate(samples):
        f = x.provenance.feature
        hit = bool(maxes[i, f] > cov.thresholds[f])
        out.append({"feature": f, "label": x.label, "text": x.text, "hit": hit,
                    "copy": x.text in rows})
    print(f"\n{len(samples)} samples in {gen_s:.0f} s; hit {np.mean([o['hit'] for o in out]):.0%}"
          f"; exact anchor copies {sum(o['copy'] for o in out)}")
    for f in features:
        print(f"\n=== feature {f} (positive support {int(support[f])}); spans: "
              f"{[t for _, t, _ in got[f]]}")
        for label in (1, 0):
            print(f"--- label {label}")
            for o in out:
                if o["feature"] == f and o["label"] == label:
                    flag = ("H" if o["hit"] else "-") + ("C" if o["copy"] else "-")
                    print(f"[{flag}] {json.dumps(o['text'])[:300]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info.model_dump(mode="json"),
                                         "generate_s": gen_s, "samples": out}, indent=2))


if __name__ == "__main__":
    main()
