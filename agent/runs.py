"""The one factory of improve runs: `start_run` checks and records a new run, `run_loop`
drives a new or resumed run's graph to its stop rule, `loop_graph` builds the graph itself
(LangGraph Studio serves it without a checkpointer). `facsynth improve`, the chat and MCP
tools, `langgraph.json`'s studio factory, the bench scripts and the tests all come through
here. What a run holds on disk: tools/rundir.py. Display is the caller's: hooks report
nodes, rounds and progress bars; nothing here prints.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from tools.errors import ConfigError, UsageError
from tools.rundir import RunConfig, RunPaths
from tools.settings import Settings

if TYPE_CHECKING:
    from agent.steps import LoopEngine
    from tools.rundir import RoundRecord
    from tools.tasks import Task
    from tools.workspace import Workspace

log = logging.getLogger(__name__)

FLAGS = {"max_rounds": "rounds", "kind": "detector", "judge": "label_gate",
         "reference": "label_reference"}
"""Option fields whose command-line flag has another name."""

Before = Callable[[str, int], None]
OnRound = Callable[["RoundRecord"], None]
ProgressFor = Callable[[str, int], Callable[[int], None] | None]


def problems(e: ValidationError, flags: bool = False) -> str:
    """A pydantic error as one line: `field: message; ...` (`--field` when `flags`)."""
    out = []
    for x in e.errors():
        where = ".".join(map(str, x["loc"]))
        if flags:
            where = "--" + FLAGS.get(where, where).replace("_", "-")
        value = f" (got {x['input']!r})" if not isinstance(x.get("input"), dict) else ""
        out.append(f"{where}: {x['msg']}{value}")
    return "; ".join(out)


def build_settings(**overrides: Any) -> Settings:
    """Settings from defaults < facsynth.toml < env < the given non-None overrides;
    invalid values (and an unreadable facsynth.toml) become one ConfigError."""
    import tomllib

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{Path('facsynth.toml').resolve()}: not valid TOML ({e}); fix or "
                          "remove the file") from None
    except ValidationError as e:
        raise ConfigError(f"invalid settings (flags, FACSYNTH_* env or facsynth.toml): "
                          f"{problems(e)}") from None


M = TypeVar("M", bound=BaseModel)


def validated(schema: type[M], what: str, /, **values: Any) -> M:
    """`schema(**values)`, its validation errors as one ConfigError naming the flags."""
    try:
        return schema(**values)
    except ValidationError as e:
        raise ConfigError(f"invalid {what}: {problems(e, flags=True)}") from None


def _absolute(source: str | None) -> str | None:
    """A local file's absolute path (so `--resume` works from any folder); hub ids as given."""
    if source is None or not Path(source).exists():
        return source
    return str(Path(source).resolve())


def start_run(run: Path, cfg: RunConfig, *, resume_hint: str | None = None) -> RunConfig:
    """Check everything a new run needs (settings, readable inputs), then write its
    `config.json`: a refused start leaves nothing behind, so the corrected command just works.
    Local input paths are stored absolute. `resume_hint` says how the caller's user continues
    an existing run (default: the CLI's `--resume RUN`)."""
    if RunPaths(run).config.exists() and RunPaths(run).history.exists():
        raise UsageError(f"{run} already holds a run: continue it with "
                         f"{resume_hint or f'--resume {run}'}, or choose another run folder")
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--run-dir {run}: is a file; give a folder for the run")
    cfg = cfg.model_copy(update={"anchor": _absolute(cfg.anchor), "data": _absolute(cfg.data),
                                 "eval": _absolute(cfg.eval)})
    build_settings(**cfg.settings.given())
    run_task(cfg)  # an unknown task or option fails here
    if cfg.task != "toxicity":
        if cfg.loop.generator != "prompted":
            raise ConfigError(f"--generator-kind {cfg.loop.generator}: the {cfg.task} task "
                              "generates with the prompted generator only")
        if cfg.loop.focus != "data":
            raise ConfigError(f"--focus {cfg.loop.focus}: the {cfg.task} task has no "
                              "detector errors to focus on; use --focus data")
        if cfg.pool is not None:
            raise ConfigError(f"--pool: the {cfg.task} task has no pool path yet (a pool row "
                              "would be a pair whose preferred side a person picks); use "
                              "the toxicity task or drop --pool")
    if cfg.pool is not None:
        pool = cfg.pool.model_copy(update={"path": _absolute(cfg.pool.path)})
        cfg = cfg.model_copy(update={"pool": pool})
        if pool.labeler == "judge" and cfg.loop.label_gate.judge == "off":
            raise ConfigError("--labeler judge: the label gate's judges label the rows, so "
                              "--label-gate cannot be off")
    load_run_inputs(cfg)
    load_pool(cfg)
    if RunPaths(run).config.exists():  # a run that never finished round 0: nothing to keep
        log.warning("%s: replacing a run that never finished round 0", run)
        clear_unstarted(run)
    cfg.write(run)
    return cfg


def clear_unstarted(run: Path) -> None:
    """Remove what a run that never finished round 0 left: its config, checkpoints and
    round-0 work (nothing else in the folder is touched)."""
    import shutil

    paths = RunPaths(run)
    for name in ("config.json", "checkpoints.sqlite", "checkpoints.sqlite-wal",
                 "checkpoints.sqlite-shm", "checkpoints.sqlite-journal"):
        (run / name).unlink(missing_ok=True)
    for leftover in paths.dir.glob("work/round-0.*"):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(paths.model(0), ignore_errors=True)


def run_task(cfg: RunConfig) -> Task[Any, Any]:
    """The run's task (tools/tasks) with its options; ConfigError for an unknown one."""
    from tools.tasks import get_task

    return get_task(cfg.task, **cfg.task_options)


def load_run_inputs(cfg: RunConfig) -> tuple[Any, Any, Any]:
    """(anchor, data, eval) as the task's rows: without an eval set, a fixed share of the
    anchor is held out for evaluation (the task's split: stratified for text rows, whole
    prompt groups for pairs) and never used as anchor."""
    from tools.data import both_labels, load_texts
    from tools.splits import stratified_split

    if cfg.task != "toxicity":
        task = run_task(cfg)
        fields = cfg.fields or None
        anchor = task.load(cfg.anchor, fields=fields, require_labels=True)
        data = task.load(cfg.data, fields=fields)
        if cfg.eval:
            return anchor, data, task.load(cfg.eval, fields=fields, require_labels=True)
        keep, held = task.split(anchor, cfg.eval_frac, 0)
        return anchor.subset(keep), data, anchor.subset(held)
    load = partial(load_texts, text_field=cfg.text_field, label_field=cfg.label_field)
    anchor = load(cfg.anchor, require_labels=True)
    data = load(cfg.data)
    both_labels(anchor, "--anchor", "the task features are what tells its labels apart")
    if data.labels is not None:
        both_labels(data, "--data", "a detector trains on them (drop the label column to "
                    "measure coverage only)")
    if cfg.eval:
        ev = load(cfg.eval, require_labels=True)
        both_labels(ev, "--eval", "AUPRC needs both")
        return anchor, data, ev
    assert anchor.labels is not None
    keep, held = stratified_split(anchor.labels, cfg.eval_frac, seed=0, texts=anchor.texts,
                                  what=f"--anchor {cfg.anchor} (held out for --eval)")
    return anchor.subset(keep), data, anchor.subset(held)



def load_pool(cfg: RunConfig) -> Any:
    """The run's pool rows (None without a pool): texts, and labels only for the file
    labeler (a pool's label column is never read otherwise). The ray engine streams the
    pool instead (agent/pool_select.py): None, unless the file labeler needs its labels."""
    from tools.data import load_texts

    if cfg.pool is None:
        return None
    p = cfg.pool
    by_file = p.labeler == "file"
    if p.engine == "ray" and not by_file:
        return None
    pool = load_texts(p.path, text_field=p.text_field, label_field=p.label_field,
                      require_labels=by_file)
    if not by_file:
        pool = type(pool)(list(pool.texts), None, pool.source)
    return pool


@contextlib.contextmanager
def loop_graph(
    run: Path,
    cfg: RunConfig,
    *,
    workspace: Workspace | None = None,
    llm: Any | None = None,
    engine: LoopEngine | None = None,
    before: Before | None = None,
    on_round: OnRound | None = None,
    progress: ProgressFor | None = None,
    checkpoint: bool = True,
) -> Iterator[Any]:
    """The compiled improve graph of the run in `run`, for the duration of the block.

    The engine defaults to the real one (agent/engine.py) over `workspace` and `llm`, which
    default to ones built from `cfg.settings` (the LLM is opened for the block); tests pass
    their own `engine`. Hooks: `before(node, round)`, `on_round(record)`,
    `progress(what, total) -> advance`. `checkpoint=False` leaves persistence to the caller
    (the LangGraph server)."""
    from agent.graph import build, checkpointer
    from agent.steps import Steps

    anchor, data, ev = load_run_inputs(cfg)
    pool = load_pool(cfg)
    loop = cfg.loop
    if cfg.task != "toxicity":
        # a pair is one sample with both sides: no separate negatives to ask for
        loop = loop.model_copy(update={"negatives": 0.0})
    with contextlib.ExitStack() as stack:
        if engine is None:
            from agent.engine import Engine
            from agent.llm import open_llm
            from agent.pair_engine import PairEngine
            from tools.workspace import Workspace

            ws = workspace or Workspace(build_settings(**cfg.settings.given()))
            if llm is None:
                llm = stack.enter_context(open_llm(ws.settings, run, ws))
            if cfg.task == "toxicity":
                engine = Engine(ws, anchor, ev, llm, detector=cfg.detector,
                                relevance=cfg.relevance, seed=cfg.loop.seed,
                                progress=progress, describe=cfg.loop.describe, pool=pool,
                                pool_source=cfg.pool)
            else:
                engine = PairEngine(ws, run_task(cfg), anchor, ev, llm,
                                    relevance=cfg.relevance, seed=cfg.loop.seed,
                                    progress=progress, describe=cfg.loop.describe)
        steps = Steps(run, engine, loop, data, before=before, on_round=on_round, pool=cfg.pool,
                      pool_rows=pool)
        yield build(steps, checkpointer(run) if checkpoint else None, source=cfg.source)


def run_loop(run: Path, cfg: RunConfig, resuming: bool, **parts: Any) -> dict[str, Any]:
    """Run (or resume) the improve graph in `run` until its stop rule, or until it pauses
    for labels (the pool path's human labeler: the state then holds `__interrupt__`); the
    final state. `parts` are `loop_graph`'s keyword arguments (workspace, llm, engine,
    hooks)."""
    from langgraph.types import Command

    from agent.graph import thread

    run.mkdir(parents=True, exist_ok=True)
    with loop_graph(run, cfg, **parts) as graph:
        config = thread(run)
        start: Any = {}
        if resuming:
            snapshot = graph.get_state(config)
            values = snapshot.values
            if values.get("stop_reason"):
                return dict(values)  # finished already
            # no checkpoint yet: start over; else continue from the last one (a step whose
            # writes were saved but not its checkpoint shows no `next`, yet is not the end);
            # a run paused for labels resumes its label node, which reads the label journal
            start = None if values else {}
            if snapshot.interrupts:
                start = Command(resume=True)
        # "sync": each step's checkpoint is on disk before the next step starts, so a kill
        # loses at most the step in flight (LangGraph's default writes it in the background)
        return dict(graph.invoke(start, config, durability="sync"))
