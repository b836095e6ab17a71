"""Scale: the ray engine beside the local one, and coverage memory as the pool grows.

On the embedded model and SAE, in one run:

(a) rows/s of the local engine (`tools.probe.probe_texts` through a fresh activation
    cache, in a fresh process: imports, model and SAE load included) and of the ray engine
    (`tools.ray_probe.ray_probe` into fresh shards; its probing pass, actor start-up and
    so model load included) on the same first N pool rows, for each N of `--rate-rows`
    (default 2,000 and 10,000: the small one shows the fixed start-up costs, the large one
    the throughput of a pool worth Ray; the last line's ratio is the largest N's); the
    local probing's own rate too, which (b)'s long ray pass is set beside (its start-up
    spread over the whole pool);
(b) the pool (the shared toxicity corpora in ../shared/data/toxicity, shuffled, near- and
    exact duplicates kept) probed once on ray up to the largest size (resumable: rerun
    and it skips what is done);
(c) per size, in a fresh subprocess: coverage of the pool's first SIZE rows against the
    anchor (`measure_coverage`: the anchor probed locally, through the cache; the data
    side streamed over the shards), then one pool-path round's selection over the same
    rows (`select_streamed`: fac picks 100, streamed), their wall times and the process's
    peak RSS (coverage + selection); then the
    slope of peak RSS per row, and the data side's time per stored row (it reads every
    stored row, keeping those of the size asked for).

    python bench/scale.py [--sizes 5000,10000,20000,40000] [--rate-rows 2000,10000]
                          [--work bench/out/scale] [--batch-size 1024] [--concurrency N]
                          [--corpora ../shared/data/toxicity] [--anchor .../toxicchat_train.jsonl]

Needs tools/coverage.py's coverage() to take the data side as (n_rows, rows).
Last line: ray_vs_local=<ray rows/s / local rows/s, largest N> rss_<smallest>_gb=<peak RSS>
rss_<largest>_gb=<peak RSS> rows_per_s_local=<local rows/s>
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.data import TextDataset, load_texts
from tools.ray_cluster import BATCH_SIZE
from tools.settings import Settings

if TYPE_CHECKING:
    from tools.coverage import Coverage
    from tools.probe import ProbeResult
    from tools.shards import ShardSet

SHARED = Path(__file__).resolve().parents[2] / "shared/data/toxicity"


def build_pool(n: int, corpora: Path, out: Path) -> list[str]:
    """n texts of the corpora's *.jsonl files together, shuffled with seed 0."""
    texts = [t for f in sorted(corpora.glob("*.jsonl"))
             for t in load_texts(f, label_field=None).texts]
    random.Random(0).shuffle(texts)
    if len(texts) < n:
        raise SystemExit(f"{corpora} holds {len(texts)} rows; asked for {n}")
    texts = texts[:n]
    if not out.exists() or out.read_text().count("\n") != n:
        out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def rate_local(texts: list[str], settings: Settings) -> tuple[float, float]:
    """(rows/s from a cold start: imports, model and SAE load included, as in the ray
    pass's actor start-up; rows/s of the probing alone) through a fresh activation cache.
    Run in a fresh process (`local_in_subprocess`), so that every N starts cold."""
    cold = time.perf_counter()
    from memory.activation_cache import ActivationCache
    from tools.probe import probe_texts
    from tools.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(settings)
        lm, sae = ws.model, ws.sae
        cache = ActivationCache(Path(tmp) / "acts.sqlite")
        start = time.perf_counter()
        probe_texts(texts, lm, sae, settings.probe_settings(), cache=cache)
        end = time.perf_counter()
        cache.close()
    return len(texts) / (end - cold), len(texts) / (end - start)


def run_child(flags: list[str], what: str) -> Any:
    """This script in a fresh process with `flags`: the JSON of its last stdout line."""
    done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def local_in_subprocess(n: int, args: argparse.Namespace) -> tuple[float, float]:
    cold, warm = run_child(["--child-rate", str(n), "--work", str(args.work)],
                           f"the local rate on {n} rows")
    return float(cold), float(warm)


def rate_ray(pool: Path, settings: Settings, args: argparse.Namespace) -> tuple[float, float]:
    """(rows/s of the probing pass, wall seconds of the whole call) into fresh shards."""
    from tools.ray_probe import ray_probe

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = ray_probe(pool, settings=settings, out_dir=Path(tmp) / "shards",
                        batch_size=args.batch_size, concurrency=args.concurrency)
        wall = time.perf_counter() - start
    return run.probed / run.seconds, wall


def measure_coverage(size: int, work: Path, anchor_file: Path,
                     settings: Settings) -> dict[str, float]:
    """Coverage of the pool's first `size` rows against the anchor, the data side streamed
    over the shards: what `facsynth coverage --engine ray` computes; then one round's
    selection over the same rows (`select_streamed`)."""
    from tools.shards import ShardSet, active_row_counts, measure_shards, text_keys
    from tools.workspace import Workspace

    anchor = load_texts(anchor_file, require_labels=True)
    texts = [json.loads(line)["text"] for line in (work / "pool.jsonl").open()][:size]
    ws = Workspace(settings)
    anchor_acts = ws.probe(anchor)  # from the activation cache (the parent filled it)
    start = time.perf_counter()
    shards = ShardSet.open(work / "shards")
    result = measure_shards(anchor_acts, anchor.labels, shards, settings.activity_rule(),
                            settings.judge, settings.graded, keys=text_keys(texts))
    seconds = time.perf_counter() - start
    start = time.perf_counter()  # the data side alone, again: what grows with the pool
    active_row_counts(shards, result.thresholds, settings.activity_rule(), keys=text_keys(texts))
    data_seconds = time.perf_counter() - start
    start = time.perf_counter()
    picked = select_streamed(texts, shards, anchor, anchor_acts, result, settings)
    select_seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"size": size, "seconds": seconds, "data_seconds": data_seconds,
            "select_seconds": select_seconds, "picked": picked,
            "stored": shards.n_stored(), "peak_rss_gb": peak, "fac": result.report.fac,
            "fac_graded": result.report.fac_graded, "n_data": result.report.n_data}


def select_streamed(texts: list[str], shards: ShardSet, anchor: TextDataset,
                    anchor_acts: ProbeResult, measured: Coverage, settings: Settings,
                    n: int = 100) -> int:
    """What one pool-path round does on the ray engine: `fac` picks `n` rows streamed over
    the shards (tools/pool/stream.py), scored by a probe detector fitted on the anchor's
    pooled residuals, the anchor as the labelled side; the candidates' texts read back from
    the pool file by row. Returns how many rows it picked."""
    from sklearn.linear_model import LogisticRegression

    from tools.coverage import activity
    from tools.pool.select import SelectSettings
    from tools.pool.stream import Labelled, OpenRows, shard_chunks, stream_pick
    from tools.shards import text_keys
    from tools.verify import NearDuplicates

    pooled = anchor_acts.pooled()
    labels = np.asarray(anchor.labels, dtype=int)
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(pooled, labels)
    rule = settings.activity_rule()
    thresholds = measured.thresholds
    lab = Labelled(active=activity(anchor_acts, rule, thresholds).tocsr(), pooled=pooled,
                   labels=labels, task=np.asarray(measured.task))
    open_rows = OpenRows.of(text_keys(texts), set())

    def texts_of(rows: np.ndarray) -> list[str]:
        return [texts[int(r)] for r in rows]

    def score(x: np.ndarray) -> np.ndarray:
        return np.asarray(clf.predict_proba(x)[:, 1])

    seen = NearDuplicates(0.8)
    seen.add_all(anchor.texts)
    got = stream_pick(lambda: shard_chunks(shards, open_rows, thresholds, rule, score),
                      lab, SelectSettings(strategy="fac"), n, texts_of, seen, scored=True)
    return len(got)


def coverage_in_subprocess(size: int, args: argparse.Namespace) -> dict[str, float]:
    start = time.perf_counter()
    result: dict[str, float] = run_child(["--child", str(size), "--work", str(args.work),
                                          "--anchor", str(args.anchor)],
                                         f"coverage at {size} rows")
    return {**result, "wall": time.perf_counter() - start}


def label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def main() -> None:
    ap = argparse.ArgumentParser(description="ray vs local engine, coverage memory (module doc)")
    ap.add_argument("--sizes", default="5000,10000,20000,40000")
    ap.add_argument("--rate-rows", default="2000,10000", help="comma-separated row counts")
    ap.add_argument("--work", type=Path, default=Path("bench/out/scale"))
    ap.add_argument("--corpora", type=Path, default=SHARED, help="folder of *.jsonl pools")
    ap.add_argument("--anchor", type=Path, default=SHARED / "toxicchat_train.jsonl")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-rate", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = Settings()
    if args.child is not None:
        print(json.dumps(measure_coverage(args.child, args.work, args.anchor, settings)))
        return
    if args.child_rate is not None:
        rate = [json.loads(line)["text"] for line in (args.work / "rate.jsonl").open()]
        print(json.dumps(rate_local(rate[:args.child_rate], settings)))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    texts = build_pool(max(sizes), args.corpora, args.work / "pool.jsonl")
    print(f"pool: {len(texts)} rows ({len(set(texts))} distinct) from {args.corpora}; "
          f"anchor {args.anchor.name}", flush=True)
    for n_rate in sorted({min(int(n), len(texts)) for n in args.rate_rows.split(",")}):
        rate_pool = args.work / "rate.jsonl"
        rate_pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:n_rate]))
        local, warm = local_in_subprocess(n_rate, args)
        print(f"(a) local engine: {local:7.1f} rows/s on {n_rate} rows (a fresh process and "
              f"cache: imports and model load included; {warm:.1f} rows/s probing alone)",
              flush=True)
        ray_rate, ray_wall = rate_ray(rate_pool, settings, args)
        print(f"    ray engine:   {ray_rate:7.1f} rows/s on the same rows (fresh shards; "
              f"{ray_wall:.0f}s with cluster start and the hashing pass): "
              f"ratio {ray_rate / local:.2f}", flush=True)

    from tools.ray_probe import ray_probe
    from tools.workspace import Workspace

    start = time.perf_counter()
    run = ray_probe(args.work / "pool.jsonl", settings=settings, out_dir=args.work / "shards",
                    batch_size=args.batch_size, concurrency=args.concurrency)
    print(f"(b) pool on ray: {run.probed} texts probed in {run.seconds:.0f}s "
          f"({run.probed / max(run.seconds, 1e-9):.1f} rows/s; {time.perf_counter() - start:.0f}s"
          f" in all), {len(run.shards.files())} parts", flush=True)
    if run.probed:
        print(f"    steady state: ray's pool pass / local probing alone = "
              f"{run.probed / run.seconds / warm:.2f} (the pool's rows, not (a)'s alone)",
              flush=True)
    Workspace(settings).probe(load_texts(args.anchor, require_labels=True))  # cache it once

    print("(c) coverage per size, a fresh process each (process: start-up, model load, the "
          "anchor from the cache, coverage; coverage: the measurement given the anchor's probe; "
          "data: its data side alone, streamed over the shards)")
    rows = []
    for size in sizes:
        r = coverage_in_subprocess(size, args)
        rows.append(r)
        print(f"    {size:>7} rows: data {r['data_seconds']:6.2f}s  coverage {r['seconds']:6.2f}s  "
              f"select {r['select_seconds']:6.2f}s ({r['picked']:.0f} picked)  "
              f"process {r['wall']:5.1f}s  "
              f"peak RSS {r['peak_rss_gb']:.2f} GB  FAC {r['fac']:.3f}  "
              f"graded {r['fac_graded']:.3f}", flush=True)
    if len(rows) > 1:
        x = np.array([r["size"] for r in rows], dtype=float)
        rss = np.polyfit(x, [r["peak_rss_gb"] for r in rows], 1)[0]
        print(f"    peak RSS per data row (slope): {rss * 1024**3:.0f} bytes "
              f"({rss * 1e4 * 1024:.1f} MB per 10k rows)")
    big = rows[-1]  # the data side reads every stored row, whatever the size asked for
    print(f"    data side: {big['data_seconds'] / big['stored'] * 1e6:.1f} us per stored row "
          f"({big['stored']:.0f} rows in {big['data_seconds']:.2f}s)")
    first, last = rows[0], rows[-1]
    print(f"ray_vs_local={ray_rate / local:.2f} rss_{label(int(first['size']))}_gb="
          f"{first['peak_rss_gb']:.2f} rss_{label(int(last['size']))}_gb="
          f"{last['peak_rss_gb']:.2f} rows_per_s_local={local:.1f}")


if __name__ == "__main__":
    main()
