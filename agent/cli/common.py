"""What every `facsynth` command shares: the typer app, the consoles (progress and tables
on stderr/stdout), option types, one-line errors (exit code 2), output-path checks and
progress bars."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tools.data import write_text_atomic
from tools.errors import ConfigError, FacsynthError
from tools.rundir import Relevance

app = typer.Typer(
    help="facsynth: find the task features your data is missing, measured in a language "
    "model's own SAE features (Feature Activation Coverage).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option(help="model profile, local folder or hub id")]
SaeOpt = Annotated[str | None, typer.Option(help="SAE: sae-lens folder or release/sae_id")]
DeltaOpt = Annotated[
    float | None, typer.Option(help="one absolute threshold (implies --threshold absolute)")
]
TextField = Annotated[str, typer.Option(help="name of the text column")]
TaskOpt = Annotated[str, typer.Option(
    help="what the rows are and what is trained on them: toxicity (text + 0/1 label -> a "
         "detector, AUPRC), reward (prompt, chosen, rejected -> a Bradley-Terry reward head, "
         "pairwise accuracy) or steering (A/B question, matching, not_matching -> a CAA "
         "steering vector, SCR)")]
FieldsOpt = Annotated[list[str] | None, typer.Option(
    "--field", help="a pair task's column name, FIELD=COLUMN, e.g. --field prompt=question "
    "(repeat; fields: reward prompt/chosen/rejected, steering question/matching/not_matching)")]
TaskOptionsOpt = Annotated[list[str] | None, typer.Option(
    "--task-option", help="a task option, KEY=VALUE, e.g. --task-option layer=12 (steering) "
    "or --task-option prompt_chars=400 (reward); repeat")]


def key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """Repeated KEY=VALUE options as a dict; a malformed one is a ConfigError."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: write KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def task_options(items: list[str] | None) -> dict[str, Any]:
    """--task-option values, numbers as numbers (JSON), else strings."""
    import json

    out: dict[str, Any] = {}
    for key, value in key_values(items, "--task-option").items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
LabelField = Annotated[str, typer.Option(help="name of the 0/1 label column")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # a local model loads in about a second: its progress bar (transformers reads this
    # when it is imported, later) is noise among our own lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Project errors and failed file I/O (a full disk, a folder without write access, a
    database file on a full disk) as one line and exit code 2; anything else is a bug and
    keeps its traceback."""
    import sqlite3

    try:
        yield
    except (FacsynthError, OSError, sqlite3.Error) as e:
        if not isinstance(e, FacsynthError):
            logging.getLogger("facsynth").debug("I/O error", exc_info=True)
        text = str(e)
        if isinstance(e, sqlite3.Error):
            text = (f"a database file could not be used ({e}): free space or fix the folder's "
                    "permissions; a run continues where it stopped with --resume")
        err.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)
        raise typer.Exit(2) from None


def writable(path: Path | None, flag: str) -> None:
    """Refuse an output path that cannot be written before any work is done: a folder, a
    file where a folder should be, or a folder that does not take new files (tried with a
    temp file, so read-only mounts and permissions both count)."""
    import tempfile

    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'out'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            try:
                fd, probe = tempfile.mkstemp(prefix=".facsynth-probe.", dir=parent)
            except OSError as e:
                raise ConfigError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); "
                                  "choose another place") from None
            os.close(fd)
            os.unlink(probe)
            break


def save(path: Path, text: str) -> None:
    with one_line_errors():
        write_text_atomic(path, text)


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    bar = Progress(
        TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )
    with bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


RelevanceOpt = Annotated[
    Relevance, typer.Option(help="label (anchor statistics), llm (LLM verdict Yes/Probably), or "
                            "auto (label, vetoed by an LLM 'No')")
]
GeneratorOpt = Annotated[
    str | None, typer.Option(help="auto, endpoint (FACSYNTH_LLM_BASE_URL), vllm (managed server "
                             "on the embedded model) or local (in-process transformers)")
]
