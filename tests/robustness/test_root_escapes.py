"""Writes never leave the workspace root through symlinks: a symlinked state folder
(ROOT/.facsynth), a symlink planted at the temp-file name of an atomic write, the cache file,
the rejected-rows sibling of generate_and_verify's output, or a link inside an improve run
folder. The toolbox gets a fake workspace (a fixed coverage report): no model is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from agent.mcp_server import build_server
from agent.sandbox import STATE_DIR, PathRefused
from agent.toolbox import Toolbox
from tools.coverage import CoverageReport, MissingFeature, Span
from tools.data import write_text_atomic
from tools.errors import UsageError
from tools.settings import Settings

PRECIOUS = "precious: must never be overwritten\n"


class FakeMemory:
    def get_many(self, features: list[int]) -> dict[int, Any]:
        return {}


class FakeWorkspace:
    """Just enough of agent.workspace.Workspace for the coverage tool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.memory = FakeMemory()
        self.calls = 0

    def coverage(self, anchor: Any, data: Any, progress: Any = None) -> CoverageReport:
        self.calls += 1
        return CoverageReport(
            rule=self.settings.activity_rule(), judge="label", n_anchor=len(anchor),
            n_data=len(data), n_active_anchor=3, n_task=2, n_task_in_anchor=2, n_covered=1,
            fac=0.5, anchor_fac=1.0, saturated=False,
            missing=[MissingFeature(feature=7, pos_support=2, neg_support=0, log_odds=2.0,
                                    anchor_max=1.0,
                                    spans=[Span(row=0, text="hurt", activation=1.0)])],
        )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    rows = [("how to hurt someone", 1), ("bake bread", 0), ("hack the wifi", 1), ("a poem", 0)]
    for name in ("anchor.jsonl", "seed.jsonl"):
        (root / name).write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                         for t, y in rows))
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the root with one file that must stay as it is."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "target.txt").write_text(PRECIOUS)
    return out


def untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.rglob("*")) == ["target.txt"]
    assert (outside / "target.txt").read_text() == PRECIOUS


def make_box(root: Path, tmp_path: Path) -> Toolbox:
    settings = Settings(home=tmp_path / "home")
    return Toolbox(settings, root, workspace=FakeWorkspace(settings))  # type: ignore[arg-type]


def mcp_call(box: Toolbox, name: str, args: dict[str, Any]) -> Any:
    async def go() -> Any:
        async with Client(build_server(box)) as client:
            return await client.call_tool(name, args)

    return anyio.run(go)


def error_text(result: Any) -> str:
    assert result.is_error, result.structured_content
    return " ".join(getattr(c, "text", "") for c in result.content)


# -- (a) a symlinked state folder ---------------------------------------------------------


def test_symlinked_state_folder_refused_at_start(root: Path, outside: Path,
                                                 tmp_path: Path) -> None:
    (root / STATE_DIR).symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRefused, match="state folder is a symlink"):
        make_box(root, tmp_path)
    untouched(outside)


def test_symlinked_state_folder_planted_later_refused(root: Path, outside: Path,
                                                      tmp_path: Path) -> None:
    box = make_box(root, tmp_path)
    (root / STATE_DIR).symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRefused, match="state folder is a symlink"):
        box.coverage("anchor.jsonl", "seed.jsonl")
    text = error_text(mcp_call(box, "coverage", {"anchor": "anchor.jsonl",
                                                 "data": "seed.jsonl"}))
    assert "state folder is a symlink" in text
    assert box.workspace.calls == 0  # type: ignore[attr-defined]  # refused before measuring
    untouched(outside)


def test_state_folder_symlink_inside_the_root_refused_too(root: Path, tmp_path: Path) -> None:
    (root / "elsewhere").mkdir()
    (root / STATE_DIR).symlink_to(root / "elsewhere", target_is_directory=True)
    with pytest.raises(PathRefused, match="state folder is a symlink"):
        make_box(root, tmp_path)


def test_link_out_inside_the_state_folder_refused_at_start(root: Path, outside: Path,
                                                           tmp_path: Path) -> None:
    """e.g. chat.sqlite (opened by the chat) planted as a link to a file outside."""
    (root / STATE_DIR).mkdir()
    (root / STATE_DIR / "chat.sqlite").symlink_to(outside / "target.txt")
    with pytest.raises(PathRefused, match="symlink out of the workspace root"):
        make_box(root, tmp_path)
    untouched(outside)


# -- (b) symlinks at the temp-file name and at the cache file -------------------------------


def test_planted_temp_file_link_is_not_followed(root: Path, outside: Path,
                                                tmp_path: Path) -> None:
    first = make_box(root, tmp_path).coverage("anchor.jsonl", "seed.jsonl")
    cache = root / first.report_path
    cache.unlink()
    box = make_box(root, tmp_path)  # started before the link is planted
    tmp_link = cache.with_name(f".{cache.name}.tmp")  # the old, predictable temp name
    tmp_link.symlink_to(outside / "target.txt")

    again = box.coverage("anchor.jsonl", "seed.jsonl")
    assert not again.cached and again.report_path == first.report_path
    assert cache.is_file() and not cache.is_symlink()
    assert json.loads(cache.read_text())["report"]["fac"] == 0.5
    assert tmp_link.is_symlink() and os.readlink(tmp_link) == str(outside / "target.txt")
    untouched(outside)
    with pytest.raises(PathRefused, match="symlink out of the workspace root"):
        make_box(root, tmp_path)  # a server started now refuses the planted link outright


def test_cache_file_link_out_refused(root: Path, outside: Path, tmp_path: Path) -> None:
    box = make_box(root, tmp_path)
    cache = root / box.coverage("anchor.jsonl", "seed.jsonl").report_path
    cache.unlink()
    cache.symlink_to(outside / "target.txt")
    box.coverage_cache.forget()  # the next call reads the cache file
    with pytest.raises(PathRefused, match="outside the workspace root"):
        box.coverage("anchor.jsonl", "seed.jsonl")
    untouched(outside)


def test_write_text_atomic_ignores_a_planted_temp_link(tmp_path: Path, outside: Path) -> None:
    dest = tmp_path / "out.json"
    (tmp_path / ".out.json.tmp").symlink_to(outside / "target.txt")
    write_text_atomic(dest, "new\n")
    assert dest.read_text() == "new\n" and not dest.is_symlink()
    assert (tmp_path / ".out.json.tmp").is_symlink()
    assert not list(tmp_path.glob(".out.json.*.tmp")), "the random temp file was renamed away"
    untouched(outside)


def test_write_text_atomic_replaces_a_link_at_the_destination(tmp_path: Path,
                                                              outside: Path) -> None:
    dest = tmp_path / "out.json"
    dest.symlink_to(outside / "target.txt")
    write_text_atomic(dest, "new\n")
    assert not dest.is_symlink() and dest.read_text() == "new\n"
    untouched(outside)


def test_write_text_atomic_keeps_the_mode(tmp_path: Path) -> None:
    dest = tmp_path / "shared.txt"
    dest.write_text("old")
    dest.chmod(0o640)
    write_text_atomic(dest, "new")
    assert dest.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.txt"
    write_text_atomic(fresh, "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask


# -- outputs: the rejected-rows sibling and improve run folders ---------------------------


def test_rejected_sibling_link_out_refused(root: Path, outside: Path, tmp_path: Path) -> None:
    box = make_box(root, tmp_path)
    (root / "synth.rejected.jsonl").symlink_to(outside / "target.txt")
    with pytest.raises(PathRefused, match="outside the workspace root"):
        box.generate_and_verify("anchor.jsonl", "seed.jsonl", [7], out="synth.jsonl")
    text = error_text(mcp_call(box, "generate_and_verify", {
        "anchor": "anchor.jsonl", "data": "seed.jsonl", "features": [7],
        "out": "synth.jsonl"}))
    assert "outside the workspace root" in text
    assert not (root / "synth.jsonl").exists()
    untouched(outside)


def test_rejected_sibling_may_not_be_an_input(root: Path, tmp_path: Path) -> None:
    box = make_box(root, tmp_path)
    (root / "synth.rejected.jsonl").symlink_to(root / "seed.jsonl")
    before = (root / "seed.jsonl").read_text()
    with pytest.raises(UsageError, match="would overwrite an input dataset"):
        box.generate_and_verify("anchor.jsonl", "seed.jsonl", [7], out="synth.jsonl")
    assert (root / "seed.jsonl").read_text() == before


@pytest.mark.parametrize("tool", ["improve", "report"])
def test_run_folder_with_a_link_out_refused(root: Path, outside: Path, tmp_path: Path,
                                            tool: str) -> None:
    box = make_box(root, tmp_path)
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "data").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRefused, match="symlink out of the workspace root"):
        if tool == "improve":
            box.improve("anchor.jsonl", "seed.jsonl", "runs/r1", resume=True)
        else:
            box.report("runs/r1")
    assert box.workspace.calls == 0  # type: ignore[attr-defined]
    untouched(outside)
