"""The probe on Ray Data, for pools of 10^5-10^7 rows: model and SAE live in actors, each
text's max activations and mean residual go to Parquet shards (tools/shards.py).

Two passes over the pool, both Ray Data jobs. The first reads the text column and hashes
every row (the driver keeps the 32-byte keys: the pool's rows, repeats included, for
coverage); texts whose key the shards already hold are done. The second reads the pool
again, keeps the rows still to do (a killed probe re-run skips what it finished), and
`map_batches` them through `_ProbeActor`: `tools.probe`'s encode, length buckets and
`probe_batch` (the forward pass stops at the SAE's layer), batch by batch. `_ShardSink`
writes each bundle of results as one part, whole or not at all.

The per-token store is never built for a pool: `spans_for` recomputes spans with the
local probe for the few rows a report shows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data import ActorPoolStrategy

from tools.errors import ConfigError, DataError, FacsynthError
from tools.models import PROFILES, LoadedModel, model_bytes, resolve_model_source
from tools.probe import (
    ProbeResult,
    cache_namespace,
    encode,
    length_buckets,
    probe_batch,
    top_spans,
)
from tools.ray_cluster import BATCH_SIZE, available_memory, plan_actors, ray_cluster
from tools.ray_io import ShardSink, pool_keys, read_pool, todo_rows
from tools.sae import check_fits, load_sae
from tools.settings import Settings
from tools.shards import ShardManifest, ShardSet, arrow_keys, shard_table
from tools.workspace import Workspace

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the number of texts just written to the shards."""
ROWS_PER_SHARD = 4096
MIN_CALL = 128
"""Fewest texts per actor call when a small pool is spread over the actors."""
CALLS_PER_ACTOR = 2
"""A small pool is cut into at least this many calls per actor, so every actor gets
work; not more, since the probe buckets a call's texts by length and a small call buckets
worse (2,000 rows on two 1-thread actors: 80 rows/s at ~500 texts a call, 73 at ~250)."""


def _sae_spec(settings: Settings) -> str:
    if settings.sae is not None:
        return settings.sae
    profile = PROFILES.get(settings.model)
    if profile is None or profile.default_sae is None:
        raise ConfigError(f"model {settings.model!r} has no default SAE: pass --sae "
                          "(a sae-lens folder or release/sae_id)")
    return profile.default_sae


def probe_manifest(settings: Settings) -> ShardManifest:
    """What shards probed under `settings` are, without loading the model's weights
    (the SAE is loaded: it is small, and this checks its spec before any actor starts)."""
    _, identity = resolve_model_source(settings.model, settings.home)
    sae = load_sae(_sae_spec(settings))
    # cache_namespace reads only the model's identity: a stand-in without weights will do
    stand_in = LoadedModel(model=None, tokenizer=None, name=settings.model, identity=identity,
                           device=torch.device("cpu"))
    ps = settings.probe_settings()
    return ShardManifest(namespace=cache_namespace(stand_in, sae, ps), model=identity,
                         sae=sae.identity, hook=f"{sae.hook.module}:{sae.hook.side}",
                         probe=ps.fingerprint(), d_sae=sae.d_sae, d_model=sae.d_in)


def default_shards_dir(settings: Settings, source: str, manifest: ShardManifest) -> Path:
    """FACSYNTH_HOME/shards/<namespace>/<hash of the pool's location>: one folder per pool
    file (edit the file and re-probe: only new texts are probed)."""
    where = source if "://" in source else str(Path(source).resolve())
    return settings.home / "shards" / manifest.namespace / hashlib.sha256(
        where.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProbeRun:
    shards: ShardSet
    keys: np.ndarray
    """[pool rows] text keys in pool order (KEY_DTYPE), repeats included"""
    probed: int
    """texts probed (written) by this run"""
    seconds: float
    """wall time of the probing pass"""


WORKER_BYTES = 768 * 2**20
"""A probe actor's memory besides the model: Python, torch, the SAE, a call's activations
(the embedded model's actors peaked at 1,022 MiB with its 513 MiB of weights)."""


def _actor_bytes(settings: Settings) -> int | None:
    weights = model_bytes(settings.model, settings.home)
    return None if weights is None else weights + WORKER_BYTES


class _ProbeActor:
    """One model + SAE per actor; turns (key, text) batches into shard rows."""

    def __init__(self, settings: Settings, manifest: ShardManifest, threads: int) -> None:
        torch.set_num_threads(threads)
        ws = Workspace(settings)
        self.lm, self.sae, self.settings = ws.model, ws.sae, settings.probe_settings()
        check_fits(self.sae, self.lm.model)
        if cache_namespace(self.lm, self.sae, self.settings) != manifest.namespace:
            raise ConfigError("this worker's model or SAE differs from the driver's "
                              f"({self.lm.identity}, {self.sae.identity})")

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = encode(self.lm.tokenizer, batch.column("text").to_pylist(), self.settings)
        acts: list[Any] = [None] * len(encoded)
        for idx in length_buckets([len(e.ids) for e in encoded], self.settings):
            (done,) = probe_batch(self.lm, [self.sae], [encoded[i] for i in idx],
                                  self.settings.sink_factor)
            for i, a in zip(idx, done, strict=True):
                acts[i] = a
        result = ProbeResult(acts=acts, d_sae=self.sae.d_sae)
        return shard_table(arrow_keys(batch.column("key")),
                           np.array([a.n_tokens for a in acts]),
                           result.max_matrix(), result.pooled())


@contextmanager
def _watch(shards: ShardSet, progress: Progress | None) -> Iterator[None]:
    """Report rows of new part files to `progress` while the block runs."""
    if progress is None:
        yield
        return
    counted: set[Path] = set(shards.files())
    stop = threading.Event()

    def poll() -> None:
        for f in shards.files():
            if f not in counted:
                counted.add(f)
                progress(pq.read_metadata(f).num_rows)

    def loop() -> None:
        while not stop.wait(0.5):
            poll()

    thread = threading.Thread(target=loop, daemon=True, name="shard-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()


def _project_error(e: BaseException, source: str, text_field: str) -> FacsynthError | None:
    """The FacsynthError (or parse error) a Ray task raised, out of Ray's wrappers, as one
    line (a RayTaskError(DataError) is a DataError too, but its text is the remote
    traceback; `.cause` holds the original, to which Ray Data appends retry advice)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        cause = getattr(c, "cause", None)
        if not isinstance(cause, BaseException):
            first = str(c).strip().splitlines()[0] if str(c).strip() else type(c).__name__
            if isinstance(c, FacsynthError):
                return type(c)(first)
            if isinstance(c, pa.ArrowInvalid):
                return DataError(f"{source}: cannot read it: {first}")
            if isinstance(c, json.JSONDecodeError):  # Ray's fallback after Arrow's JSON reader
                return DataError(f"{source}: cannot read it as JSON lines (a line that is not "
                                 f"one JSON object, or a '{text_field}' that is not a string; "
                                 "the local engine names the line)")
        todo += [c.__context__, c.__cause__, cause]  # popped last first: `cause` first
    return None


def ray_probe(
    source: str | Path, *, settings: Settings, out_dir: Path | None = None,
    text_field: str = "text", concurrency: int | None = None, batch_size: int = BATCH_SIZE,
    address: str | None = None, progress: Progress | None = None,
    on_total: Progress | None = None, rows_per_shard: int | None = None,
) -> ProbeRun:
    """Probe every text of `source` not yet in the shards at `out_dir` (default:
    `default_shards_dir`) on Ray: `concurrency` actors (default: one per GPU; on a cluster
    facsynth starts, one per core as memory allows; else one per 4 CPUs) of at most
    `batch_size` texts per call (fewer for small pools: every actor gets
    `CALLS_PER_ACTOR` calls or more). `on_total` hears how many texts are to probe
    once the first pass knows, `progress` the texts as their parts land. `rows_per_shard`:
    rows per part file (default 4,096, fewer for small pools so a kill loses little)."""
    source = str(source)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give at least 1")
    manifest = probe_manifest(settings)
    shards = ShardSet.create(out_dir or default_shards_dir(settings, source, manifest), manifest)
    try:
        with ray_cluster(address) as cluster:
            # a cluster we connected to: its own GPUs, whatever this machine has
            cuda = torch.cuda.is_available() if cluster.started else cluster.gpus > 0
            here = cluster.started and not cuda
            plan = plan_actors(cluster, concurrency, cuda=cuda,
                               local_cores=os.cpu_count() if cluster.started else None,
                               actor_bytes=_actor_bytes(settings) if here else None,
                               free_bytes=available_memory() if here else None)
            keys = pool_keys(source, text_field, num_cpus=plan.io_cpus)
            todo = np.setdiff1d(np.unique(keys), shards.keys())
            log.info("%d pool rows, %d texts to probe, %d actors x %.2f CPUs (%d threads)",
                     len(keys), len(todo), plan.concurrency, plan.num_cpus, plan.threads)
            if len(todo):
                calls = CALLS_PER_ACTOR * plan.concurrency
                batch_size = min(batch_size, max(MIN_CALL, -(-len(todo) // calls)))
            if on_total:
                on_total(len(todo))
            start = time.perf_counter()
            old_parts = set(shards.files())
            if len(todo):
                per_shard = rows_per_shard or min(ROWS_PER_SHARD, max(batch_size,
                                                                      len(todo) // 16))
                # blocks of a few batches, so that every actor gets work
                blocks = max(plan.concurrency * 4, -(-len(keys) // (batch_size * 8)))
                ds = read_pool(source, text_field, num_cpus=plan.io_cpus, blocks=blocks)
                ds = ds.map_batches(todo_rows,  # type: ignore[arg-type]  # rest: fn_kwargs
                                    batch_size=None,  # whole blocks: sorted by length
                                    batch_format="pyarrow", num_cpus=plan.io_cpus,
                                    fn_kwargs={"text_field": text_field, "todo": todo})
                gpu: dict[str, Any] = {"num_gpus": plan.num_gpus} if plan.num_gpus else {}
                ds = ds.map_batches(
                    _ProbeActor, batch_size=batch_size, batch_format="pyarrow",
                    # CPU calls take seconds: no queue per actor, so a call goes to the
                    # next free actor (GPU ones keep Ray's prefetching queue)
                    compute=ActorPoolStrategy(size=plan.concurrency,
                                              max_tasks_in_flight_per_actor=None if cuda else 1),
                    num_cpus=plan.num_cpus,
                    fn_constructor_kwargs={"settings": settings, "manifest": manifest,
                                           "threads": plan.threads}, **gpu)
                with _watch(shards, progress):
                    ds.write_datasink(ShardSink(shards.parts_dir, per_shard),
                                      ray_remote_args={"num_cpus": plan.io_cpus})
            seconds = time.perf_counter() - start
    except Exception as e:
        mine = _project_error(e, source, text_field)
        if mine is None or mine is e:
            raise
        raise mine from None
    new = [f for f in shards.files() if f not in old_parts]
    _warn_truncated(new, settings.max_tokens)
    return ProbeRun(shards, keys, sum(pq.read_metadata(f).num_rows for f in new), seconds)


def _warn_truncated(parts: Sequence[Path], max_tokens: int) -> None:
    """The local probe's truncation warning, from the token counts in the new parts."""
    lengths = [pq.read_table(f, columns=["n_tokens"]).column(0).to_numpy() for f in parts]
    if lengths:
        n = np.concatenate(lengths)
        if (long := int((n >= max_tokens).sum())):
            log.warning("%d of %d texts reached max_tokens=%d: longer ones were truncated",
                        long, len(n), max_tokens)


def spans_for(
    ws: Workspace, texts: Sequence[str], features: Sequence[int], *,
    n: int | None = None, window: int | None = None,
) -> dict[int, list[tuple[int, str, float]]]:
    """Top spans of `features` among a few pool rows (rows index `texts`): shards keep no
    per-token activations, so the local probe runs again on just these texts."""
    from tools.data import TextDataset

    s = ws.settings
    result = ws.probe(TextDataset(texts=list(texts), labels=None, source="spans"))
    return top_spans(result, list(texts), ws.model.tokenizer, s.probe_settings(), features,
                     s.top_spans if n is None else n, s.span_window if window is None else window)
