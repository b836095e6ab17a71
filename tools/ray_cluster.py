"""Where Ray work runs, and how the probe's actors are sized on it.

No address (and no RAY_ADDRESS): facsynth starts a single-node cluster on this machine
with all but one CPU (Ray refuses `local_mode`) and shuts it down afterwards. An address
(or RAY_ADDRESS): facsynth connects to that cluster and only disconnects. A Ray session
that is already up in this process (a test fixture, an outer `ray_cluster`) is used as it
is and left running. Ray's own logs go to stderr; workers' output is not forwarded, so
stdout stays clean (the stdio MCP server).

Sizing: Ray Data hangs when actors hold every CPU, since the read and write tasks can
then never be scheduled; so the actors together take the cluster's CPUs less one (half
of a one-CPU cluster), and every read, hash and write task asks for a quarter of what is
left. Ray's CPUs are only scheduling slots. On a cluster facsynth started, the actors are
one single-threaded actor per core of this machine, as many as half of its available
memory holds copies of the model. Measured on 2 cores (bench/README "Scale-out"): a
two-thread actor's calls ran 20-25% slower inside a Ray Data pipeline than the same calls
in a plain process or a plain Ray actor (likely: its threads meet at a barrier in every
op, so any wake-up of Ray's processes stalls both), and two one-thread actors probe 1.3x
as fast as it. On a given cluster, an actor per 4 of its CPUs, with that many threads.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tools.errors import ConfigError

log = logging.getLogger(__name__)

CPUS_PER_ACTOR = 4
"""Default actor size on CPU clusters: one actor per this many CPUs (at least one)."""
BATCH_SIZE = 1024
"""Default texts per probe-actor call. The probe sorts a call's texts by length into
padded forward batches, so small calls of mixed lengths waste compute on padding and tiny
batches: on 2 cores, 64 gave 0.65 of the local engine's rate over a 40k-row pool
(bench/README); a kill loses at most the calls in flight."""
_started_here = False  # whether the live Ray session is a cluster facsynth started


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    started: bool
    """facsynth started this cluster on this machine (so its cores are ours to share)."""


@dataclass(frozen=True)
class ActorPlan:
    concurrency: int
    num_cpus: float
    """per actor; concurrency x num_cpus <= cluster CPUs - 1 (half of a one-CPU cluster)"""
    num_gpus: float | None
    """1 with CUDA; None on CPU (Ray Data takes num_gpus=0 as a GPU request)"""
    io_cpus: float
    """per read / hash / write task"""
    threads: int
    """torch threads per actor"""


def plan_actors(cluster: Cluster, concurrency: int | None, *, cuda: bool,
                local_cores: int | None = None, actor_bytes: int | None = None,
                free_bytes: int | None = None) -> ActorPlan:
    """Actor count and resources for `cluster` (see the module doc). `local_cores`: this
    machine's cores when facsynth started the cluster here; `actor_bytes` (one actor's
    model, when known) and `free_bytes` (this machine's available memory) cap the actors
    started there."""
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"--concurrency {concurrency}: give at least 1 actor")
    free = 1.0 if cluster.cpus >= 2 else cluster.cpus / 2
    budget = cluster.cpus - free
    if cuda:
        n = concurrency or max(1, int(cluster.gpus))
        if n > cluster.gpus:
            raise ConfigError(f"{n} probe actors need {n} GPUs; the cluster has "
                              f"{cluster.gpus:g}: lower --concurrency")
        per = min(1.0, budget / n)
        return ActorPlan(n, per, 1.0, free / 4, max(1, math.floor(per)))
    if local_cores:
        fits = local_cores
        if actor_bytes and free_bytes:
            fits = min(fits, max(1, free_bytes // 2 // actor_bytes))
        n = concurrency or fits
        return ActorPlan(n, budget / n, None, free / 4, max(1, local_cores // n))
    n = concurrency or max(1, int(budget // CPUS_PER_ACTOR))
    per = budget / n
    return ActorPlan(n, per, None, free / 4, max(1, math.floor(per)))


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _configure_ray_data() -> None:
    """Errors in map UDFs reach the driver as themselves (a DataError stays one, not a
    UserCodeException with only its text); no Ray progress bars (the CLI has its own);
    Ray Data's INFO logs (each execution plan) and its every-30-s advice to reserve the
    actors' memory (facsynth sizes the actors by memory itself) only for --verbose runs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True
    ctx.enable_progress_bars = False
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1


def _describe(started: bool) -> Cluster:
    import ray

    res = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return Cluster(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)),
                   started=started)


@contextmanager
def ray_cluster(address: str | None = None) -> Iterator[Cluster]:
    """A Ray session for the duration of the block (see the module doc)."""
    global _started_here
    import ray

    if ray.is_initialized():
        _configure_ray_data()
        yield _describe(_started_here)
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if target:
            log.info("connecting to the Ray cluster at %s", target)
            ray.init(address=target, **quiet)  # type: ignore[arg-type]
        else:
            cpus = max(1, (os.cpu_count() or 2) - 1)
            log.info("starting a single-node Ray cluster with %d CPUs", cpus)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     **quiet)  # type: ignore[arg-type]
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {target}" if target else "a local Ray cluster"
        raise ConfigError(f"cannot start or reach {where}: {e}") from e
    _started_here = not target
    try:
        _configure_ray_data()
        yield _describe(_started_here)
    finally:
        _started_here = False
        ray.shutdown()  # a cluster we connected to keeps running; ours stops
