"""The tools are declared once (agent/tool_registry.py): the chat agent and the MCP server
publish the same names, descriptions and input schemas, and report failures the same way
(project errors as the caller's to fix; anything else as a facsynth bug, logged). No model
is loaded: the toolbox gets a stub workspace."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from mcp import Client

from agent.chat import ChatSession, build_graph, make_tools
from agent.mcp_server import build_server
from agent.tool_registry import TOOLS
from agent.toolbox import Toolbox
from prompts import unfence
from tests.fakes import FailingMemory, MemoryOnlyWorkspace, ScriptedModel
from tools.errors import FileAccessError, UsageError
from tools.settings import Settings


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    rows = [("how to hurt someone", 1), ("bake bread", 0)]
    for name in ("anchor.jsonl", "seed.jsonl"):
        (root / name).write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                         for t, y in rows))
    return root


def make_box(root: Path, memory: Any = None) -> Toolbox:
    return Toolbox(Settings(home=root.parent / "home"), root,
                   workspace=MemoryOnlyWorkspace(memory), llm=object())  # type: ignore[arg-type]


def mcp(box: Toolbox, method: str, *args: Any) -> Any:
    async def go() -> Any:
        async with Client(build_server(box)) as client:
            return await getattr(client, method)(*args)

    return anyio.run(go)


def chat(box: Toolbox, name: str, args: dict[str, Any], answer: bool | None = None
         ) -> tuple[ToolMessage, list[Any]]:
    """One tool call through the chat graph (answering a confirmation with `answer`); the
    tool's message and the confirmations asked."""
    model = ScriptedModel(script=[
        AIMessage("", tool_calls=[{"name": name, "args": args, "id": "call-1"}]), "done"])
    session = ChatSession(build_graph(model, make_tools(box), "system", InMemorySaver()))
    events = list(session.send("go"))
    asked = [e for e in events if e.kind == "confirm"]
    if asked:
        list(session.answer(bool(answer)))
    msg = next(m for m in session.messages if isinstance(m, ToolMessage))
    return msg, asked


def test_chat_and_mcp_tools_share_names_descriptions_and_input_schemas(root: Path) -> None:
    box = make_box(root)
    chat_tools = make_tools(box)
    mcp_tools = mcp(box, "list_tools").tools
    assert [t.name for t in chat_tools] == [t.name for t in mcp_tools] == [
        "describe_dataset", "coverage", "missing_features", "search_features",
        "explain_feature", "generate_and_verify", "improve", "report", "job_status",
        "job_result", "cancel_job", "list_jobs", "select_rows", "add_labels"]
    for ours, theirs in zip(chat_tools, mcp_tools, strict=True):
        assert isinstance(ours.args_schema, type)
        assert ours.args_schema.model_json_schema() == theirs.input_schema, ours.name
        assert theirs.input_schema["additionalProperties"] is False
        assert ours.description == theirs.description
    schemas = {t.name: t.input_schema["properties"] for t in mcp_tools}
    assert {"relevance", "resume", "seed", "run_dir"} <= set(schemas["improve"])
    assert {"temperature", "seed", "out"} <= set(schemas["generate_and_verify"])
    assert schemas["improve"]["relevance"]["enum"] == ["label", "llm", "auto"]
    annotations = {t.name: t.annotations for t in mcp_tools}
    assert annotations["describe_dataset"].read_only_hint is True
    assert annotations["improve"].read_only_hint is False


def test_registry_flags() -> None:
    by_name = {t.name: t for t in TOOLS}
    assert {n for n, t in by_name.items() if t.confirm} == {"generate_and_verify", "improve"}
    assert {n for n, t in by_name.items() if t.progress} == {"coverage", "job_result"}
    assert {n for n, t in by_name.items() if t.writes} == {
        "generate_and_verify", "improve", "report", "cancel_job", "select_rows", "add_labels"}


def test_bad_arguments_to_a_method_are_a_usage_error(root: Path) -> None:
    spec = next(t for t in TOOLS if t.name == "describe_dataset")
    with pytest.raises(UsageError, match="invalid arguments to describe_dataset: examples"):
        spec.run(make_box(root), {"path": "seed.jsonl", "examples": 99})


def test_mcp_reports_an_unexpected_exception_as_a_logged_bug(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = make_box(root, FailingMemory(KeyError("boom")))
    with caplog.at_level(logging.ERROR, logger="agent.mcp_server"):
        result = mcp(box, "call_tool", "search_features", {"query": "weapons"})
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert result.is_error
    assert ("internal error in search_features: KeyError: 'boom'; this is a facsynth bug, "
            "see the server log") in text
    logged = [r for r in caplog.records if r.name == "agent.mcp_server"]
    assert len(logged) == 1 and logged[0].exc_info and "search_features" in logged[0].message


def test_chat_reports_an_unexpected_exception_as_a_logged_bug(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = make_box(root, FailingMemory(KeyError("boom")))
    with caplog.at_level(logging.ERROR, logger="agent.chat"):
        msg, _ = chat(box, "search_features", {"query": "weapons"})
    assert msg.status == "error"
    assert msg.text.startswith("internal error in search_features: KeyError: 'boom'")
    logged = [r for r in caplog.records if r.name == "agent.chat"]
    assert len(logged) == 1 and logged[0].exc_info


def test_failed_file_access_is_reported_not_a_bug(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    denied = PermissionError(13, "Permission denied", str(root / "memory.db"))
    box = make_box(root, FailingMemory(denied))
    spec = next(t for t in TOOLS if t.name == "search_features")
    with pytest.raises(FileAccessError, match="PermissionError.*Permission denied"):
        spec.run(box, {"query": "weapons", "k": 3})
    with caplog.at_level(logging.ERROR):
        result = mcp(box, "call_tool", "search_features", {"query": "weapons"})
        msg, _ = chat(box, "search_features", {"query": "weapons"})
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert result.is_error and "cannot access a file" in text and "bug" not in text
    assert msg.status == "error" and "Permission denied" in msg.text and "bug" not in msg.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_chat_project_error_and_unknown_argument(root: Path) -> None:
    box = make_box(root)
    msg, _ = chat(box, "describe_dataset", {"path": "../x.jsonl"})
    assert msg.status == "error" and "outside the workspace root" in msg.text
    msg, _ = chat(box, "describe_dataset", {"path": "seed.jsonl", "exampels": 2})
    assert msg.status == "error" and "unknown argument exampels" in msg.text


@pytest.mark.parametrize("tool,args", [
    ("generate_and_verify", {"anchor": "anchor.jsonl", "data": "seed.jsonl",
                             "features": [3, 4], "per_feature": 5, "out": "new.jsonl"}),
    ("improve", {"anchor": "anchor.jsonl", "data": "seed.jsonl", "rounds": 2}),
])
def test_chat_asks_before_long_tools_and_declining_runs_nothing(
    root: Path, tool: str, args: dict[str, Any]
) -> None:
    msg, asked = chat(make_box(root), tool, args, answer=False)
    assert [a.name for a in asked] == [tool]
    assert asked[0].data["samples"] == (10 if tool == "generate_and_verify" else 20)
    assert asked[0].data["backend"] == "injected" and asked[0].data["seconds"] > 0
    assert json.loads(unfence(msg.text))["cancelled"] is True
    assert {p.name for p in root.iterdir()} - {".facsynth"} == {"anchor.jsonl", "seed.jsonl"}


def test_chat_checks_paths_before_asking(root: Path) -> None:
    msg, asked = chat(make_box(root), "generate_and_verify",
                      {"anchor": "anchor.jsonl", "data": "nope.jsonl", "features": [1]})
    assert not asked and msg.status == "error" and "no such file" in msg.text
