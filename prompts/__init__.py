"""Prompt templates shipped as files, one per prompt and version (`<name>.v<N>.md`),
rendered with jinja2 StrictUndefined so a missing variable is an error, not a blank."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

PROMPT_DIR = Path(__file__).resolve().parent


@cache
def _env():  # type: ignore[no-untyped-def]
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    return Environment(
        loader=FileSystemLoader(PROMPT_DIR), undefined=StrictUndefined, keep_trailing_newline=True
    )


def render(name: str, **variables: Any) -> str:
    """Render `prompts/<name>.md`, e.g. render("interpret_feature.v1", spans=[...])."""
    return str(_env().get_template(f"{name}.md").render(**variables))


def available() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.md"))
