"""Starting and resuming an improve run, shared by `facsynth improve`, the chat agent and the
MCP server: what the run was started with (`RunConfig`, saved as `config.json`), its inputs,
and `run_loop`, which drives the improve graph to its stop rule. Display is the caller's:
hooks report nodes, rounds and progress bars; nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from agent.config import Settings
from tools.errors import ConfigError

if TYPE_CHECKING:
    from agent.graph import LoopSettings
    from agent.workspace import Workspace
    from tools.data import TextDataset
    from tools.detector import DetectorSettings
    from tools.report import RoundRecord

CONFIG = "config.json"


FLAGS = {"max_rounds": "rounds", "kind": "detector"}
"""Option fields whose command-line flag has another name."""


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


def validated(model: type[M], what: str, **values: Any) -> M:
    """`model(**values)`, its validation errors as one ConfigError naming the flags."""
    try:
        return model(**values)
    except ValidationError as e:
        raise ConfigError(f"invalid {what}: {problems(e, flags=True)}") from None


class RunConfig(BaseModel):
    """What `facsynth improve` was started with: `--resume` rebuilds the run from it."""

    anchor: str
    data: str
    eval: str | None = None
    eval_frac: float = 0.25
    text_field: str = "text"
    label_field: str = "label"
    settings: dict[str, Any] = {}
    loop: dict[str, Any] = {}
    detector: dict[str, Any] = {}
    relevance: str = "auto"

    @classmethod
    def read(cls, run_dir: Path) -> RunConfig:
        path = run_dir / CONFIG
        if not path.exists():
            raise ConfigError(f"{path} not found: {run_dir} is not a facsynth improve run")
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as e:
            first = e.errors()[0]
            raise ConfigError(
                f"{path}: not a `facsynth improve` config ({'.'.join(map(str, first['loc']))}: "
                f"{first['msg']})"
            ) from None


def run_options(cfg: RunConfig) -> tuple[LoopSettings, DetectorSettings]:
    """The loop and detector options of `cfg`, validated (one ConfigError naming the flag)."""
    from agent.graph import LoopSettings
    from tools.detector import DetectorSettings

    if cfg.relevance not in ("label", "llm", "auto"):
        raise ConfigError(f"--relevance {cfg.relevance!r}: use label, llm or auto")
    loop = validated(LoopSettings, "improve options", **cfg.loop)
    det = validated(DetectorSettings, "detector options", **cfg.detector)
    return loop, det


def _absolute(source: str | None) -> str | None:
    """A local file's absolute path (so `--resume` works from any folder); hub ids as given."""
    if source is None or not Path(source).exists():
        return source
    return str(Path(source).resolve())


def start_run(run: Path, cfg: RunConfig) -> RunConfig:
    """Check everything a new run needs (settings, options, readable inputs), then write its
    `config.json`: a refused start leaves nothing behind, so the corrected command just works.
    Local input paths are stored absolute."""
    from tools.data import write_text_atomic

    if (run / CONFIG).exists():
        raise ConfigError(f"{run} already holds a run: continue it with --resume {run}, or "
                          "choose another --run-dir")
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--run-dir {run}: is a file; give a folder for the run")
    cfg = cfg.model_copy(update={"anchor": _absolute(cfg.anchor), "data": _absolute(cfg.data),
                                 "eval": _absolute(cfg.eval)})
    build_settings(**cfg.settings)
    run_options(cfg)
    load_run_inputs(cfg)
    write_text_atomic(run / CONFIG, cfg.model_dump_json(indent=1))
    return cfg


def load_run_inputs(cfg: RunConfig) -> tuple[TextDataset, TextDataset, TextDataset]:
    """(anchor, data, eval): without an eval set, a fixed stratified share of the anchor is
    held out for evaluation and never used as anchor."""
    from tools.data import TextDataset, load_texts
    from tools.subsets import stratified_split

    anchor = load_texts(cfg.anchor, text_field=cfg.text_field, label_field=cfg.label_field,
                        require_labels=True)
    data = load_texts(cfg.data, text_field=cfg.text_field, label_field=cfg.label_field)
    if cfg.eval:
        ev = load_texts(cfg.eval, text_field=cfg.text_field, label_field=cfg.label_field,
                        require_labels=True)
        return anchor, data, ev
    assert anchor.labels is not None
    keep, held = stratified_split(anchor.labels, cfg.eval_frac, seed=0)

    def part(idx: Any, name: str) -> TextDataset:
        return TextDataset(texts=[anchor.texts[i] for i in idx],
                           labels=[anchor.labels[i] for i in idx],  # type: ignore[index]
                           source=f"{anchor.source} ({name})")

    return part(keep, "anchor part"), data, part(held, f"held-out {cfg.eval_frac:.0%}")


def run_loop(
    run: Path,
    cfg: RunConfig,
    resuming: bool,
    *,
    workspace: Workspace | None = None,
    llm: Any | None = None,
    before: Callable[[str, int], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the improve graph in `run` until its stop rule; the final state.

    `workspace` and `llm` default to ones built from `cfg.settings` (the LLM is opened for
    the duration of the run); hooks: `before(node, round)`, `on_round(record)`,
    `progress(what, total) -> advance`."""
    from agent.engine import Engine
    from agent.graph import build, checkpointer, thread
    from agent.llm import open_llm
    from agent.steps import Steps
    from agent.workspace import Workspace

    settings = workspace.settings if workspace is not None else build_settings(**cfg.settings)
    loop, det = run_options(cfg)
    anchor, data, ev = load_run_inputs(cfg)
    ws = workspace or Workspace(settings)
    with contextlib.ExitStack() as stack:
        if llm is None:
            llm = stack.enter_context(open_llm(settings, run, ws))
        engine = Engine(ws, anchor, ev, llm, detector=det,
                        relevance=cfg.relevance, seed=loop.seed,  # type: ignore[arg-type]
                        progress=progress)
        steps = Steps(run, engine, loop, data, before=before, on_round=on_round)
        graph = build(steps, checkpointer(run))
        config = thread(run)
        # "sync": each step's checkpoint is on disk before the next step starts, so a kill
        # loses at most the step in flight (LangGraph's default writes it in the background)
        start: dict[str, Any] | None = {}
        if resuming:
            values = graph.get_state(config).values
            if values.get("stop_reason"):
                return dict(values)  # finished already
            # no checkpoint yet: start over; else continue from the last one (a step whose
            # writes were saved but not its checkpoint shows no `next`, yet is not the end)
            start = None if values else {}
        return dict(graph.invoke(start, config, durability="sync"))
