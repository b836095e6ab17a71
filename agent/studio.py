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

import atexit
import contextlib
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field

from agent.llm import LazyLLM
from agent.runs import build_settings
from agent.toolbox import Toolbox
from tools.rundir import LoopSettings, RunConfig, RunPaths
from tools.settings import Settings


class StudioSettings(Settings):
    """Settings plus what the studio graphs need (env FACSYNTH_RUN_DIR, FACSYNTH_ANCHOR,
    FACSYNTH_DATA, FACSYNTH_ROOT)."""

    run_dir: Path = Field(Path("runs/studio"), description="the improve graph's run folder")
    anchor: str = Field("examples/anchor.jsonl", description="a new run's anchor set")
    data: str = Field("examples/seed.jsonl", description="a new run's data")
    root: Path = Field(Path("."), description="the chat tools' workspace root")


_resources = contextlib.ExitStack()
atexit.register(_resources.close)


def _run_config(settings: StudioSettings) -> RunConfig:
    run = settings.run_dir
    if RunPaths(run).config.exists():
        return RunConfig.read(run)
    return RunConfig(anchor=settings.anchor, data=settings.data, relevance="label",
                     loop=LoopSettings(max_rounds=2, top=8, per_feature=3))


def improve_graph(config: Any = None) -> Any:
    """The improve loop (agent/graph.py) over the real engine; see the module doc."""
    from agent.llm import open_llm
    from agent.runs import loop_graph
    from tools.workspace import Workspace

    studio = StudioSettings()
    run = studio.run_dir
    cfg = _run_config(studio)
    ws = Workspace(build_settings(**cfg.settings.given()))

    @cache
    def llm() -> Any:
        run.mkdir(parents=True, exist_ok=True)
        return _resources.enter_context(open_llm(ws.settings, run, ws))

    return _resources.enter_context(
        loop_graph(run, cfg, workspace=ws, llm=LazyLLM(llm), checkpoint=False))


@cache
def _chat_parts() -> tuple[Toolbox, Any]:
    from agent.chat import open_chat_model

    settings = StudioSettings()
    box = _resources.enter_context(Toolbox(settings, settings.root))
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
