"""The chat agent: a scripted tool-calling model drives an "improve my toxicity dataset"
session on the demo data (embedded model, echo LLM): tool calls, confirmations (interrupt ->
resume), rows written, a tool error mid-session, declining, and resuming a session by id."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from agent.chat import ChatSession, Event, build_graph, make_tools, sessions, system_prompt
from agent.toolbox import Toolbox
from memory.feature_memory import InMemoryFeatureMemory
from prompts import unfence
from tests.fakes import EchoLLM, ScriptedModel, bag_of_words
from tools.settings import Settings
from tools.workspace import Workspace

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
Step = AIMessage | str | Callable[[list[BaseMessage]], AIMessage | str]


def calls(*specs: tuple[str, dict[str, Any]]) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": n, "args": a, "id": f"call-{n}-{i}"}
                                     for i, (n, a) in enumerate(specs)])


def last_result(messages: list[BaseMessage], tool: str) -> dict[str, Any]:
    msg = next(m for m in reversed(messages) if isinstance(m, ToolMessage) and m.name == tool)
    return json.loads(unfence(str(msg.content)))


def job_done(messages: list[BaseMessage]) -> dict[str, Any] | None:
    """The newest job answer (a long tool's start or a job_result), if that job has ended."""
    msg = next(m for m in reversed(messages) if isinstance(m, ToolMessage))
    got = json.loads(unfence(str(msg.content)))
    return got if got.get("status") in ("done", "failed", "cancelled") else None


def poll(messages: list[BaseMessage]) -> AIMessage | None:
    """What the agent does after starting a long tool: job_result(wait=50) until it ends."""
    if job_done(messages):
        return None
    msg = next(m for m in reversed(messages) if isinstance(m, ToolMessage))
    job = json.loads(unfence(str(msg.content)))["job_id"]
    return calls(("job_result", {"job_id": job, "wait": 50}))


def finished(events: list[Any]) -> dict[str, Any]:
    """The result of the turn's last job, from its final job_result."""
    job = json.loads([e.text for e in events
                      if e.kind == "tool_result" and e.name == "job_result"][-1])
    assert job["status"] == "done", job
    return dict(job["result"])


POLLS = [poll] * 8
"""Enough polls of 50 s for a long tool on a busy machine; the unneeded ones are skipped."""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    for name in ("anchor.jsonl", "seed.jsonl"):
        shutil.copy(EXAMPLES / name, root / name)
    return root


@pytest.fixture(scope="module")
def box(root: Path) -> Toolbox:
    """The embedded model (in the test run's FACSYNTH_HOME), an in-memory feature memory and
    an echo LLM."""
    settings = Settings()
    ws = Workspace(settings)
    ws.__dict__["memory"] = InMemoryFeatureMemory(bag_of_words)
    return Toolbox(settings, root, workspace=ws, llm=EchoLLM())


def run_turn(session: ChatSession, text: str, answer: bool = True) -> list[Event]:
    """One user turn, answering every confirmation with `answer`."""
    events = list(session.send(text))
    seen = list(events)
    while asked := [e for e in events if e.kind == "confirm"]:
        events = list(session.answer({e.data["id"]: answer for e in asked}))
        seen += events
    return seen


def graph_for(box: Toolbox, model: ScriptedModel) -> Any:
    tools = make_tools(box)
    return build_graph(model, tools, system_prompt(box, tools), sessions(box.root))


@pytest.mark.slow
def test_improve_session_on_the_demo_data(box: Toolbox, root: Path) -> None:
    def explain_top(messages: list[BaseMessage]) -> AIMessage:
        top = last_result(messages, "coverage")["top_missing"][0]["feature"]
        return calls(("explain_feature", {"anchor": "anchor.jsonl", "data": "seed.jsonl",
                                          "feature": top}))

    def generate_two(messages: list[BaseMessage]) -> AIMessage:
        missing = last_result(messages, "coverage")["top_missing"]
        return calls(("generate_and_verify", {
            "anchor": "anchor.jsonl", "data": "seed.jsonl", "per_feature": 2,
            "features": [missing[0]["feature"], missing[1]["feature"]],
            "out": "synthetic.jsonl"}))

    def summarise(messages: list[BaseMessage]) -> str:
        job = job_done(messages)
        assert job and job["status"] == "done", job
        got = job["result"]
        return f"Kept {got['kept']} of {got['generated']} samples."

    model = ScriptedModel(script=[
        calls(("describe_dataset", {"path": "seed.jsonl"})),
        calls(("coverage", {"anchor": "anchor.jsonl", "data": "seed.jsonl", "top": 5})),
        explain_top,
        "Your data covers part of the task; the top missing feature is explained above.",
        # turn 2: a wrong file first, then the generation (confirmed)
        calls(("describe_dataset", {"path": "train.jsonl"})),
        generate_two,
        *POLLS,
        summarise,
        # turn 3: one improve round (confirmed)
        calls(("improve", {"anchor": "anchor.jsonl", "data": "seed.jsonl",
                           "run_dir": "runs/chat", "rounds": 1, "top": 2, "per_feature": 2})),
        *POLLS,
        "Round 1 is done.",
    ])
    session = ChatSession(graph_for(box, model))
    first = run_turn(session, "Improve my toxicity dataset: seed.jsonl, anchor anchor.jsonl")
    assert [e.name for e in first if e.kind == "tool_call"] == [
        "describe_dataset", "coverage", "explain_feature"]
    results = {e.name: e for e in first if e.kind == "tool_result"}
    assert not any(e.data["error"] for e in results.values())
    assert json.loads(results["describe_dataset"].text)["rows"] == 50
    explained = json.loads(results["explain_feature"].text)
    assert explained["relevance"]["missing"] and explained["spans"]
    assert "".join(e.text for e in first if e.kind == "token").startswith("Your data covers")
    assert "Workspace root" in str(model.seen[0][0].content), "the system prompt file is used"

    second = run_turn(session, "Generate two samples each for the top two missing features")
    errors = [e for e in second if e.kind == "tool_result" and e.data["error"]]
    assert len(errors) == 1 and "train.jsonl" in errors[0].text and "no such file" in errors[0].text
    asked = [e for e in second if e.kind == "confirm"]
    assert len(asked) == 1 and asked[0].name == "generate_and_verify"
    assert asked[0].data["samples"] == 4 and asked[0].data["seconds"] > 0
    started = json.loads(next(e.text for e in second
                              if e.kind == "tool_result" and e.name == "generate_and_verify"))
    assert started["job_id"] and started["tool"] == "generate_and_verify"  # a job, at once
    gen = finished(second)
    assert gen["generated"] == 4 == gen["kept"] + gen["rejected"]
    rows = (root / "synthetic.jsonl").read_text().splitlines()
    assert len(rows) == gen["kept"] and all(json.loads(r)["provenance"]["feature"] in gen[
        "features"] for r in rows)
    assert len((root / "synthetic.rejected.jsonl").read_text().splitlines()) == gen["rejected"]
    assert f"Kept {gen['kept']} of 4" in "".join(e.text for e in second if e.kind == "token")

    third = run_turn(session, "Run one improvement round")
    assert [e.name for e in third if e.kind == "confirm"] == ["improve"]
    done = finished(third)
    assert [r["round"] for r in done["rounds"]] == [0, 1] and done["stop_reason"]
    assert (root / "runs" / "chat" / "data" / "round-1.jsonl").exists()
    assert not model.script and not session.pending()


def test_decline_then_resume_by_id(box: Toolbox, root: Path) -> None:
    model = ScriptedModel(script=[
        calls(("generate_and_verify", {"anchor": "anchor.jsonl", "data": "seed.jsonl",
                                       "features": [1, 2], "out": "declined.jsonl"})),
        lambda m: "OK, nothing generated." if "declined" in str(m[-1].content) else "??",
        calls(("describe_dataset", {"path": "../outside.jsonl"})),
        "That path is outside the workspace.",
    ])
    session = ChatSession(graph_for(box, model))
    events = run_turn(session, "generate for features 1 and 2", answer=False)
    assert [e.kind for e in events if e.kind in ("confirm", "tool_result")] == [
        "confirm", "tool_result"]
    assert json.loads(next(e.text for e in events if e.kind == "tool_result"))["cancelled"]
    assert "".join(e.text for e in events if e.kind == "token") == "OK, nothing generated."
    assert not (root / "declined.jsonl").exists()
    refused = run_turn(session, "describe ../outside.jsonl")
    assert "outside the workspace root" in next(e.text for e in refused
                                                if e.kind == "tool_result")

    # a new agent (new model, new connection to the same sqlite) continues the same thread
    later = ScriptedModel(script=["Welcome back."])
    again = ChatSession(graph_for(box, later), session.id)
    assert again.exists and len(again.messages) == len(session.messages)
    reply = run_turn(again, "where were we?")
    assert "".join(e.text for e in reply if e.kind == "token") == "Welcome back."
    history = [str(m.content) for m in later.seen[0]]
    assert "generate for features 1 and 2" in history and "where were we?" in history
    assert ChatSession(graph_for(box, later), "no-such-session").exists is False


def test_langgraph_json_graphs_import_and_compile(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`langgraph dev` would load these: each entry imports and returns a compiled graph."""
    import importlib.util

    from langgraph.graph.state import CompiledStateGraph

    repo = Path(__file__).resolve().parents[2]
    spec = json.loads((repo / "langgraph.json").read_text())
    assert spec["dependencies"] == ["."] and set(spec["graphs"]) == {"improve", "chat"}
    monkeypatch.chdir(repo)
    monkeypatch.setenv("FACSYNTH_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("FACSYNTH_ROOT", str(root))
    monkeypatch.setenv("FACSYNTH_LLM_BASE_URL", "http://127.0.0.1:9/v1")  # never contacted
    monkeypatch.setenv("FACSYNTH_LLM_MODEL", "test")
    nodes = {}
    for name, ref in spec["graphs"].items():
        file, attr = ref.split(":")
        module_spec = importlib.util.spec_from_file_location(f"studio_{name}", repo / file)
        assert module_spec and module_spec.loader
        module = importlib.util.module_from_spec(module_spec)
        # as langgraph's server loads it: registered, so pydantic resolves its annotations
        monkeypatch.setitem(sys.modules, module_spec.name, module)
        module_spec.loader.exec_module(module)
        graph = getattr(module, attr)()
        assert isinstance(graph, CompiledStateGraph)
        nodes[name] = set(graph.get_graph().nodes)
    assert {"load", "coverage", "generate", "verify", "decide"} <= nodes["improve"]
    assert {"agent", "tools"} <= nodes["chat"]
