"""The workspace root that confines every path the tools (agent/toolbox.py) read or write.

A path argument is resolved against the root (relative) or taken as given (absolute), with
`~` expanded and symlinks followed; anything that ends up outside the root is refused with
`PathRefused` (so are NUL bytes and symlink loops). Everything facsynth writes stays inside
the root too: the state folder `ROOT/.facsynth` (coverage cache, chat sessions, the managed
LLM server's log) must be a real folder in the root, not a symlink, and every state file goes
through the same check (`state_path`); folders the pipeline writes into by file name (the
state folder, an improve run folder) are refused when a symlink inside them leads out of the
root (`confine_tree`). Files are replaced atomically through a random temp name
(`tools.data.write_text_atomic`), so a link planted at a predictable temp name is never
followed.
"""

from __future__ import annotations

import os
from pathlib import Path

from tools.errors import ConfigError, DataError, FacsynthError

STATE_DIR = ".facsynth"
"""Per-root state: coverage cache, chat sessions, the managed LLM server's log."""


class PathRefused(FacsynthError):
    """A path argument points outside the workspace root."""


class Sandbox:
    """One workspace root and the checks every path goes through; see the module doc."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ConfigError(f"workspace root {root} is not a folder")
        if (self.root / STATE_DIR).exists() or (self.root / STATE_DIR).is_symlink():
            # before anything (the chat's session store, the vLLM log) opens files in it
            self.confine_tree(self.state_path())

    def resolve(self, path: str | Path, *, must_exist: bool = False) -> Path:
        """`path` inside the root (relative to it, or absolute), symlinks followed; refused
        when it ends up outside."""
        text = str(path)
        if "\x00" in text:
            raise PathRefused(f"{text!r}: not a valid path")
        given = Path(text).expanduser()
        candidate = given if given.is_absolute() else self.root / given
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError) as e:  # symlink loops
            raise PathRefused(f"{text}: cannot be resolved ({e})") from None
        if real != self.root and not real.is_relative_to(self.root):
            raise PathRefused(
                f"{text}: outside the workspace root (paths must stay inside it; '..' and "
                "symlinks out of it are refused)")
        if must_exist and not real.exists():
            raise DataError(f"{text}: no such file in the workspace root")
        return real

    def rel(self, path: Path) -> str:
        """`path` as shown to the caller: relative to the root when inside it."""
        try:
            return str(path.relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    def scrub(self, text: str) -> str:
        """`text` (an error message) with paths inside the root made root-relative: a
        caller is never shown where the server's files live."""
        root = str(self.root)
        return text.replace(root + os.sep, "").replace(root, ".")

    @property
    def state_dir(self) -> Path:
        """ROOT/.facsynth, checked by `state_path` (it may not exist yet)."""
        return self.state_path()

    def state_path(self, *parts: str) -> Path:
        """ROOT/.facsynth/<parts...>, confined to the root: PathRefused when the state folder
        is a symlink or not a folder, or when the path resolves outside the root."""
        state = self.root / STATE_DIR
        if state.is_symlink():
            raise PathRefused(
                f"{state}: the state folder is a symlink (to {os.readlink(state)}); facsynth "
                "keeps its state (coverage cache, chat sessions, logs) in a real folder inside "
                "the workspace root only: remove the link")
        if state.exists() and not state.is_dir():
            raise PathRefused(f"{state}: the state folder is not a folder; remove or move it")
        return self.resolve(state.joinpath(*parts))

    def confine_tree(self, top: Path) -> None:
        """PathRefused when a symlink anywhere under the folder `top` (symlinked folders
        inside the root included) leads out of the root: the pipeline writes files in such
        folders by name (journals, models, reports) and would follow it."""
        seen: set[Path] = set()
        stack = [top]
        while stack:
            folder = stack.pop()
            real = folder.resolve()
            if real in seen:
                continue
            seen.add(real)
            try:
                entries = list(os.scandir(folder))
            except (NotADirectoryError, FileNotFoundError):
                continue
            for entry in entries:
                path = Path(entry.path)
                if entry.is_symlink():
                    try:
                        self.resolve(path)
                    except PathRefused:
                        raise PathRefused(
                            f"{path}: a symlink out of the workspace root (to "
                            f"{os.readlink(path)}); files facsynth writes must stay inside the "
                            "root: remove the link") from None
                if entry.is_dir():  # follows a symlink that stays inside the root
                    stack.append(path)
