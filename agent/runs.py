"""Starting and resuming an improve run, shared by `facsynth improve`, the chat agent and the
MCP server: what the run was started with (`RunConfig`, saved as `config.json`), its inputs,
and `run_loop`, which drives the improve graph to its stop rule. Display is the caller's:
hooks report nodes, rounds and progress bars; nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from agent.config import Settings
from tools.errors import ConfigError

if TYPE_CHECKING:
    from agent.workspace import Workspace
    from tools.data import TextDataset
    from tools.report import RoundRecord

CONFIG = "config.json"


def build_settings(**overrides: Any) -> Settings:
    """Settings from defaults < facsynth.toml < env < the given non-None overrides;
    invalid values become one ConfigError."""
    from pydantic import ValidationError

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()
        )
        raise ConfigError(f"invalid settings (flags, FACSYNTH_* env or facsynth.toml): "
                          f"{problems}") from None


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
        from pydantic import ValidationError

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
    from pydantic import ValidationError

    from agent.engine import Engine
    from agent.graph import LoopSettings, build, checkpointer, thread
    from agent.llm import open_llm
    from agent.steps import Steps
    from agent.workspace import Workspace
    from tools.detector import DetectorSettings

    settings = workspace.settings if workspace is not None else build_settings(**cfg.settings)
    try:
        loop = LoopSettings.model_validate(cfg.loop)
        det = DetectorSettings.model_validate(cfg.detector)
    except ValidationError as e:
        raise ConfigError(f"invalid improve options: {e.errors()[0]['msg']}") from None
    if cfg.relevance not in ("label", "llm", "auto"):
        raise ConfigError(f"--relevance {cfg.relevance!r}: use label, llm or auto")
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
        if resuming:
            snap = graph.get_state(config)
            if not snap.next:
                if snap.values:
                    return dict(snap.values)  # finished already
                return dict(graph.invoke({}, config))
            return dict(graph.invoke(None, config))
        return dict(graph.invoke({}, config))
