"""The `facsynth` command line (typer + rich). The app and what every command shares live in
`common`; the commands in `measure` (coverage, probe, train-sae), `synth` (interpret,
generate, verify, features, report), `improve` (improve, label), `compare` and `agents`
(chat, serve, llm-server), each registering itself on the app when imported; `run` is the
console entry point."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from agent.cli import agents, compare, improve, measure, synth  # noqa: F401  (register them)
from agent.cli.common import app, err, out

__all__ = ["app", "run"]


def run() -> None:
    """The console entry point: `app` with usage errors (a bad flag or value) as one line."""
    # typer vendors click; its exceptions are reachable only here
    from typer._click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        out.print(e.format_message(), markup=False, highlight=False)
        code = 2
    except click.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
        err.print(f"[bold red]error:[/] {where}{escape(e.format_message())} (see --help)",
                  soft_wrap=True, highlight=False)
        code = e.exit_code
    except click.ClickException as e:
        err.print(f"[bold red]error:[/] {escape(e.format_message())}", soft_wrap=True)
        code = e.exit_code
    except typer.Abort:
        err.print("aborted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
