"""`facsynth chat`: a tool-calling agent over the toolbox (agent/toolbox.py).

The graph is a small LangGraph `StateGraph` over `MessagesState`:

    START -> agent -+-> tools (one task per tool call, via Send) -> agent
                    +-> END (no tool calls)

`agent` is any langchain chat model bound to the tools (ChatOpenAI on an OpenAI-compatible
endpoint, or on facsynth's managed vLLM server started with tool calling on). Tools are
thin wrappers of the toolbox; errors the user or the model can fix (FacsynthError, a refused
path, invalid arguments) come back to the model as error ToolMessages. The two long tools
(generate_and_verify, improve) first `interrupt()` with the estimated sample count and time;
the conversation resumes with `Command(resume=True/False)`. Conversations are checkpointed
with SqliteSaver in `<root>/.facsynth/chat.sqlite`, one thread per session id.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, SystemMessage
from langchain_core.messages import ToolMessage as LCToolMessage
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallWithContext, ToolInvocationError
from langgraph.types import Command, Send, interrupt
from rich.markup import escape

from agent.config import Settings
from agent.toolbox import (
    STATE_DIR,
    Budget,
    Cancelled,
    Examples,
    FeatureId,
    FeatureList,
    K,
    Limit,
    PathArg,
    PerFeature,
    ProgressFn,
    Query,
    Rounds,
    Toolbox,
    Top,
)
from prompts import PROMPT_DIR, fence, render, unfence
from tools.errors import ConfigError, FacsynthError

PROMPT = "chat_system.v2"
SESSIONS = "chat.sqlite"
RECURSION_LIMIT = 60
CONFIRMED_TOOLS = ("generate_and_verify", "improve")
TOOL_CALL_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
"""vLLM server flags for OpenAI-style tool calls (hermes `<tool_call>` JSON)."""
HANDLED = (FacsynthError, ValueError, OSError, ToolInvocationError)
"""Tool errors returned to the model as error ToolMessages (anything else is a bug)."""


def approved(answer: Any) -> bool:
    """A resume value that means yes: True, or a string like 'y' / 'yes'."""
    if isinstance(answer, bool):
        return answer
    if isinstance(answer, dict):
        return approved(answer.get("approved"))
    return str(answer).strip().lower() in {"y", "yes", "ok", "true", "go"}


@dataclass
class Hooks:
    """What the tools report while they run (the CLI shows it; tests leave it alone)."""

    progress: ProgressFn | None = None


def make_tools(box: Toolbox, hooks: Hooks | None = None, confirm: bool = True) -> list[BaseTool]:
    """The toolbox as langchain tools (JSON results; long tools ask to confirm first)."""
    hooks = hooks or Hooks()

    def progress(message: str, done: float, total: float | None) -> None:
        if hooks.progress is not None:
            hooks.progress(message, done, total)

    def ask(tool: str, question: str, estimate: Any, args: dict[str, Any]) -> bool:
        if not confirm:
            return True
        answer = interrupt({"tool": tool, "question": question, "samples": estimate.samples,
                            "seconds": estimate.seconds, "backend": estimate.backend,
                            "args": args})
        return approved(answer)

    def describe_dataset(path: PathArg, examples: Examples = 3) -> str:
        """Rows, label balance (1 = harmful), text lengths, duplicates and example rows of a
        dataset file (JSONL/CSV/Parquet) in the workspace."""
        return box.describe_dataset(path, examples).model_dump_json()

    def coverage(anchor: PathArg, data: PathArg, top: Top = 10) -> str:
        """Feature Activation Coverage (FAC) of `data` against the task features of the
        labelled `anchor` set, with the top missing features and a span that activates each."""
        return box.coverage(anchor, data, top, progress=progress).model_dump_json()

    def missing_features(anchor: PathArg, data: PathArg, limit: Limit = 20) -> str:
        """The task features `data` never activates (most task-specific first), each with
        its anchor spans and known summary."""
        return box.missing_features(anchor, data, limit).model_dump_json()

    def search_features(query: Query, k: K = 10) -> str:
        """Search the feature memory (features interpreted so far) by meaning, e.g.
        'weapons' or 'insults'."""
        return box.search_features(query, k).model_dump_json()

    def explain_feature(anchor: PathArg, data: PathArg, feature: FeatureId) -> str:
        """What one SAE feature responds to (summary), its strongest anchor spans and its
        relevance to the task (support on harmful vs benign rows, missing or not)."""
        return box.explain_feature(anchor, data, feature).model_dump_json()

    def generate_and_verify(
        anchor: PathArg, data: PathArg, features: FeatureList, per_feature: PerFeature = 2,
        out: PathArg = "synthetic.jsonl",
    ) -> str:
        """Write `per_feature` new samples for each listed missing feature, keep only those
        that activate their feature (and are no duplicates); kept rows go to `out` (JSONL),
        rejected ones beside it. Asks the user to confirm first."""
        for p in (anchor, data):
            box.resolve(p, must_exist=True)
        box.resolve(out)
        est = box.estimate_generation(features, per_feature)
        args = {"anchor": anchor, "data": data, "features": features,
                "per_feature": per_feature, "out": out}
        if not ask("generate_and_verify",
                   f"Generate {est.samples} samples for {len(set(features))} features into "
                   f"{out} (about {_duration(est.seconds)} on {est.backend})?", est, args):
            return Cancelled(message="the user declined; nothing was generated. Ask what "
                             "to change (fewer features or samples).").model_dump_json()
        return box.generate_and_verify(anchor, data, features, per_feature, out,
                                       progress=progress).model_dump_json()

    def improve(
        anchor: PathArg, data: PathArg, run_dir: PathArg = "runs/chat", rounds: Rounds = 1,
        budget: Budget = 40, top: Top = 5, per_feature: PerFeature = 2, resume: bool = False,
    ) -> str:
        """Run self-improvement rounds in `run_dir`: coverage, interpret, generate, verify,
        train a detector, evaluate; stops when FAC stops improving or at `rounds`/`budget`.
        Asks the user to confirm first."""
        if not resume:
            for p in (anchor, data):
                box.resolve(p, must_exist=True)
        box.resolve(run_dir)
        est = box.estimate_improve(rounds, budget, top, per_feature)
        args = {"anchor": anchor, "data": data, "run_dir": run_dir, "rounds": rounds,
                "budget": budget, "top": top, "per_feature": per_feature, "resume": resume}
        if not ask("improve",
                   f"Run {rounds} improve round(s) in {run_dir}: up to {est.samples} samples, "
                   f"about {_duration(est.seconds)} on {est.backend}?", est, args):
            return Cancelled(message="the user declined; no run was started.").model_dump_json()
        return box.improve(anchor, data, run_dir, rounds, budget, top, per_feature,
                           resume=resume, progress=progress).model_dump_json()

    def report(run_dir: PathArg) -> str:
        """Write the HTML report of an improve run and summarise its rounds."""
        return box.report(run_dir).model_dump_json()

    funcs: list[Callable[..., str]] = [describe_dataset, coverage, missing_features,
                                       search_features, explain_feature, generate_and_verify,
                                       improve, report]
    return [StructuredTool.from_function(_fenced(f), name=f.__name__) for f in funcs]


def _fenced(tool: Callable[..., str]) -> Callable[..., str]:
    """`tool` whose JSON result reaches the model fenced as data: it quotes dataset rows and
    spans, which must never read as instructions (the system prompt says so)."""

    @functools.wraps(tool)
    def call(*args: Any, **kwargs: Any) -> str:
        return fence(tool(*args, **kwargs))

    return call


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def system_prompt(box: Toolbox, tools: Sequence[BaseTool]) -> str:
    files = sorted(
        box.rel(p) for pattern in ("*.jsonl", "*.csv", "*.parquet", "*/*.jsonl", "*/*.csv")
        for p in box.root.glob(pattern) if STATE_DIR not in p.parts
    )[:20]
    return render(PROMPT, root=str(box.root), files=files,
                  tools=[{"name": t.name, "description": t.description.split("\n")[0]}
                         for t in tools])


def build_graph(model: Any, tools: Sequence[BaseTool], system: str,
                checkpointer: Any = None) -> Any:
    """The compiled chat graph (see the module doc)."""
    bound = model.bind_tools(list(tools))

    def agent(state: MessagesState) -> dict[str, Any]:
        reply = bound.invoke([SystemMessage(system), *state["messages"]])
        return {"messages": [reply]}

    def route(state: MessagesState) -> Any:
        last = state["messages"][-1]
        calls = last.tool_calls if isinstance(last, AIMessage) else []
        if not calls:
            return END
        return [Send("tools", ToolCallWithContext(__type="tool_call_with_context",
                                                  tool_call=call, state=state))
                for call in calls]

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode(list(tools), handle_tool_errors=HANDLED))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", route, ["tools", END])
    g.add_edge("tools", "agent")
    return g.compile(checkpointer=checkpointer)


def sessions(root: Path) -> SqliteSaver:
    """The SQLite checkpointer holding every chat session under `root`."""
    path = root / STATE_DIR / SESSIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteSaver(sqlite3.connect(path, check_same_thread=False))


# -- a conversation -------------------------------------------------------------------------

EventKind = Literal["token", "tool_call", "tool_result", "confirm", "error"]


@dataclass
class Event:
    kind: EventKind
    text: str = ""
    name: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class ChatSession:
    """One conversation (a LangGraph thread): `send` a user message or `answer` pending
    confirmations; both stream `Event`s until the agent replies or asks to confirm."""

    def __init__(self, graph: Any, session_id: str | None = None) -> None:
        self.graph = graph
        self.id = session_id or uuid.uuid4().hex[:12]
        self.config: dict[str, Any] = {"configurable": {"thread_id": self.id},
                                       "recursion_limit": RECURSION_LIMIT}

    @property
    def messages(self) -> list[BaseMessage]:
        return list(self.graph.get_state(self.config).values.get("messages", []))

    @property
    def exists(self) -> bool:
        return bool(self.messages)

    def pending(self) -> list[Any]:
        """Interrupts waiting for an answer (confirmations of long tools)."""
        return list(self.graph.get_state(self.config).interrupts)

    def send(self, text: str) -> Iterator[Event]:
        if self.pending():
            raise ConfigError("a confirmation is pending: answer it first")
        yield from self._run({"messages": [("user", text)]})

    def answer(self, answers: dict[str, Any] | bool) -> Iterator[Event]:
        """Resume pending confirmations: one value for all, or {interrupt id: value}."""
        pending = self.pending()
        if not pending:
            raise ConfigError("nothing to confirm")
        if not isinstance(answers, dict):
            answers = {p.id: answers for p in pending}
        yield from self._run(Command(resume=answers))

    def _run(self, payload: Any) -> Iterator[Event]:
        from langgraph.errors import GraphRecursionError

        streamed: set[str] = set()
        try:
            for mode, chunk in self.graph.stream(payload, self.config,
                                                 stream_mode=["messages", "updates"]):
                if mode == "messages":
                    msg, meta = chunk
                    if (meta.get("langgraph_node") == "agent"
                            and isinstance(msg, AIMessageChunk) and msg.text):
                        streamed.add(msg.id or "")
                        yield Event("token", msg.text)
                    continue
                for node, update in chunk.items():
                    if node == "__interrupt__":
                        for intr in update:
                            yield Event("confirm", str(intr.value.get("question", "")),
                                        name=str(intr.value.get("tool", "")),
                                        data={"id": intr.id, **intr.value})
                        continue
                    for msg in (update or {}).get("messages", []):
                        yield from self._message_events(msg, streamed)
        except GraphRecursionError:
            yield Event("error", f"stopped after {RECURSION_LIMIT} steps without an answer")

    @staticmethod
    def _message_events(msg: Any, streamed: set[str]) -> Iterator[Event]:
        if isinstance(msg, AIMessage):
            if msg.text and (msg.id or "") not in streamed:
                yield Event("token", msg.text)
            for call in msg.tool_calls:
                yield Event("tool_call", name=call["name"], data=dict(call["args"]))
        elif isinstance(msg, LCToolMessage):
            yield Event("tool_result", unfence(msg.text), name=msg.name or "",
                        data={"error": msg.status == "error"})


# -- the chat model -------------------------------------------------------------------------

CHAT_TOKENS = 512
"""reply length for chat turns (the generator's max_new_tokens is tuned for short samples)"""


@contextlib.contextmanager
def open_chat_model(settings: Settings, root: Path) -> Iterator[tuple[Any, Any | None]]:
    """(a tool-calling chat model, an LLM client for the toolbox or None) for the block.

    endpoint: ChatOpenAI on `llm_base_url` (the toolbox opens its own client when needed);
    vllm: a managed vLLM server with tool calling on, shared by the chat and the toolbox."""
    from agent.llm import choose_backend, endpoint_client, make_chat_model, start_vllm

    backend = choose_backend(settings)
    chat_settings = settings.model_copy(
        update={"max_new_tokens": max(settings.max_new_tokens, CHAT_TOKENS)})
    if backend == "endpoint":
        yield make_chat_model(chat_settings), None
    elif backend == "vllm":
        server = start_vllm(settings, root / STATE_DIR)
        server.extra_args += TOOL_CALL_ARGS + _chat_template_args(server.model_dir)
        server.max_model_len = max(server.max_model_len, _context_length(server.model_dir))
        with server:
            served = {"llm_base_url": server.base_url, "llm_model": server.model_name}
            client = endpoint_client(settings.model_copy(update=served),
                                     f"vllm:{server.model_name}", structured="vllm")
            yield make_chat_model(chat_settings.model_copy(update=served)), client
    else:
        raise ConfigError(
            "facsynth chat needs a chat model that calls tools: an OpenAI-compatible endpoint "
            "(FACSYNTH_LLM_BASE_URL + FACSYNTH_LLM_MODEL, e.g. vLLM with "
            "--enable-auto-tool-choice) or the managed vLLM server (--generator vllm); the "
            "in-process `local` backend cannot call tools"
        )


TOOL_TEMPLATE = PROMPT_DIR / "chat_tools.v1.j2"


def _context_length(model_dir: Path, cap: int = 8192) -> int:
    """The model's context (tool schemas and results need more than the generator's 2,048
    tokens), at most `cap`."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return min(int(config.get("max_position_embeddings", 0)), cap)
    except (OSError, ValueError, TypeError):
        return 0


def _chat_template_args(model_dir: Path) -> list[str]:
    """`--chat-template` with facsynth's tool-aware ChatML template when the model's own
    template ignores tools (SmolLM2's does: the model would never see them)."""
    own = ""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        path = model_dir / name
        if path.exists():
            own += path.read_text(encoding="utf-8", errors="replace")
    if "tools" in own or not model_dir.exists():
        return []
    return ["--chat-template", str(TOOL_TEMPLATE)]


# -- the terminal ---------------------------------------------------------------------------

Ask = Callable[[Event], bool]


def run_terminal(
    session: ChatSession,
    out: Any,
    err: Any,
    hooks: Hooks,
    *,
    messages: Sequence[str] | None = None,
    yes: bool = False,
    ask: Ask | None = None,
) -> None:
    """Talk to `session` on rich consoles: from `messages` when given (then exit), else
    interactively; long tools are confirmed by `ask` (y/n on the terminal), or all by `yes`."""
    from rich.prompt import Confirm

    def confirm(event: Event) -> bool:
        if yes:
            err.print(f"[yellow]confirm:[/] {event.text} -> yes (--yes)")
            return True
        if ask is not None:
            return ask(event)
        return bool(Confirm.ask(f"[yellow]confirm:[/] {event.text}", console=out,
                                default=False))

    last = [0.0]

    def progress(message: str, done: float, total: float | None) -> None:
        import time

        now = time.monotonic()
        if now - last[0] >= 2.0 or (total is not None and done >= total):
            last[0] = now
            of = f"/{total:.0f}" if total else ""
            err.print(f"[dim]  … {message} ({done:.0f}{of})[/]")

    hooks.progress = progress
    queue = list(messages) if messages is not None else None
    if session.pending():
        err.print("[yellow]this session was waiting for a confirmation[/]")
        _turn(session.answer({p.id: confirm(Event("confirm", str(p.value.get("question", ""))))
                              for p in session.pending()}), session, out, err, confirm)
    while True:
        if queue is not None:
            if not queue:
                return
            text = queue.pop(0)
            out.print(f"[bold cyan]you>[/] {text}")
        else:
            try:
                text = out.input("[bold cyan]you>[/] ")
            except (EOFError, KeyboardInterrupt):
                out.print()
                return
        if text.strip().lower() in ("exit", "quit", "/exit", "/quit"):
            return
        if text.strip():
            _turn(session.send(text), session, out, err, confirm)


def _turn(events: Iterator[Event], session: ChatSession, out: Any, err: Any,
          confirm: Callable[[Event], bool]) -> None:
    """Show one turn's events; answer confirmations and go on until the agent is done."""
    while True:
        asked: list[Event] = []
        speaking = False
        try:
            for ev in events:
                if ev.kind == "token":
                    if not speaking:
                        out.print("[bold green]facsynth>[/] ", end="")
                        speaking = True
                    out.print(ev.text, end="", markup=False, highlight=False)
                    continue
                if speaking:
                    out.print()
                    speaking = False
                if ev.kind == "tool_call":
                    args = ", ".join(f"{k}={v!r}" for k, v in ev.data.items())
                    err.print(f"[dim]→ {ev.name}({args})[/]", markup=True, highlight=False)
                elif ev.kind == "tool_result":
                    colour = "red" if ev.data.get("error") else "dim"
                    text = ev.text if len(ev.text) <= 300 else ev.text[:300] + "…"
                    err.print(f"[{colour}]← {ev.name}: {escape(text)}[/]", highlight=False)
                elif ev.kind == "confirm":
                    asked.append(ev)
                elif ev.kind == "error":
                    err.print(f"[red]{ev.text}[/]")
        except KeyboardInterrupt:
            err.print("\n[yellow]interrupted; the conversation is saved up to the last step[/]")
            return
        except Exception as e:  # a bug in a tool or the model client: keep the session going
            err.print(f"\n[bold red]error:[/] {type(e).__name__}: {e}")
            return
        if speaking:
            out.print()
        if not asked:
            return
        events = session.answer({ev.data["id"]: confirm(ev) for ev in asked})


def main(
    settings: Settings,
    root: Path,
    out: Any,
    err: Any,
    *,
    session_id: str | None = None,
    messages: Sequence[str] | None = None,
    yes: bool = False,
) -> None:
    """`facsynth chat`: start the chat model (and, for vllm, its server), then talk."""
    from agent.llm import choose_backend

    box = Toolbox(settings, root)
    checkpoints = sessions(box.root)
    if session_id is not None:
        if checkpoints.get_tuple({"configurable": {"thread_id": session_id}}) is None:
            raise ConfigError(f"no chat session {session_id!r} in "
                              f"{box.root / STATE_DIR / SESSIONS}")
    if choose_backend(settings) == "vllm":
        err.print("starting the managed vLLM server with tool calling (a few minutes on CPU)")
    with box, open_chat_model(settings, box.root) as (model, client):
        if client is not None:
            box.use_llm(client)
        hooks = Hooks()
        tools = make_tools(box, hooks)
        graph = build_graph(model, tools, system_prompt(box, tools), checkpoints)
        session = ChatSession(graph, session_id)
        verb = "resuming" if session_id else "new"
        out.print(f"[bold]facsynth chat[/] ({verb} session [bold]{session.id}[/]; resume with "
                  f"--session {session.id}); root {box.root}; 'exit' to leave")
        if session_id:
            _recap(session, out)
        run_terminal(session, out, err, hooks, messages=messages, yes=yes)


def _recap(session: ChatSession, out: Any, n: int = 6) -> None:
    from langchain_core.messages import HumanMessage

    shown = [m for m in session.messages if isinstance(m, HumanMessage)
             or (isinstance(m, AIMessage) and m.text)][-n:]
    for m in shown:
        who = "you" if isinstance(m, HumanMessage) else "facsynth"
        text = m.text if len(m.text) <= 200 else m.text[:200] + "…"
        out.print(f"[dim]{who}> {text}[/]", highlight=False)

