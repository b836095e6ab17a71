"""The graphs `langgraph dev` / LangGraph Studio opens (langgraph.json points here).

Both are factories returning compiled graphs without a checkpointer (the LangGraph server
brings its own persistence). Settings come from `facsynth.toml` in the working directory and
`FACSYNTH_*` variables, like the CLI; heavy resources (model, SAE, LLM, the chat model's
vLLM server) are made once per process, on first use, and released at exit.

- `improve_graph`: the improve loop on the run in `FACSYNTH_RUN_DIR` (default runs/studio):
  its `config.json` when it holds one (a run `facsynth improve` started), else a new run of
  `FACSYNTH_ANCHOR` on `FACSYNTH_DATA` (default: the demo files in examples/).
- `chat_graph`: the chat agent over the toolbox of the workspace root `FACSYNTH_ROOT`
  (default: the working directory); needs a tool-calling endpoint or the managed vLLM.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from functools import cache
from pathlib import Path
from typing import Any

from agent.runs import RunConfig, build_settings
from agent.toolbox import LazyLLM, Toolbox

_resources = contextlib.ExitStack()
atexit.register(_resources.close)


def _run_config(run: Path) -> RunConfig:
    from agent.graph import LoopSettings
    from agent.runs import CONFIG

    if (run / CONFIG).exists():
        return RunConfig.read(run)
    return RunConfig(
        anchor=os.environ.get("FACSYNTH_ANCHOR", "examples/anchor.jsonl"),
        data=os.environ.get("FACSYNTH_DATA", "examples/seed.jsonl"),
        loop=LoopSettings(max_rounds=2, top=8, per_feature=3).model_dump(),
        relevance="label",
    )


def improve_graph(config: Any = None) -> Any:
    """The improve loop (agent/graph.py) over the real engine; see the module doc."""
    from agent.engine import Engine
    from agent.graph import LoopSettings, build
    from agent.llm import open_llm
    from agent.runs import load_run_inputs
    from agent.steps import Steps
    from agent.workspace import Workspace
    from tools.detector import DetectorSettings

    run = Path(os.environ.get("FACSYNTH_RUN_DIR", "runs/studio"))
    cfg = _run_config(run)
    settings = build_settings(**cfg.settings)
    loop = LoopSettings.model_validate(cfg.loop)
    anchor, data, ev = load_run_inputs(cfg)
    ws = Workspace(settings)

    @cache
    def llm() -> Any:
        run.mkdir(parents=True, exist_ok=True)
        return _resources.enter_context(open_llm(settings, run, ws))

    engine = Engine(ws, anchor, ev, LazyLLM(llm),
                    detector=DetectorSettings.model_validate(cfg.detector),
                    relevance=cfg.relevance, seed=loop.seed)  # type: ignore[arg-type]
    return build(Steps(run, engine, loop, data))


@cache
def _chat_parts() -> tuple[Toolbox, Any]:
    from agent.chat import open_chat_model

    settings = build_settings()
    box = _resources.enter_context(Toolbox(settings, os.environ.get("FACSYNTH_ROOT", ".")))
    model, client = _resources.enter_context(open_chat_model(settings, box.root))
    if client is not None:
        box.use_llm(client)
    return box, model


def chat_graph(config: Any = None) -> Any:
    """The chat agent (agent/chat.py) over the toolbox; see the module doc."""
    from agent.chat import build_graph, make_tools, system_prompt

    box, model = _chat_parts()
    tools = make_tools(box)
    return build_graph(model, tools, system_prompt(box, tools))
