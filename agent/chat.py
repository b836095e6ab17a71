"""`facsynth chat`: a tool-calling agent over the facsynth tools (agent/tool_registry.py).

The graph is a small LangGraph `StateGraph` over `MessagesState`:

    START -> agent -+-> tools (one task per tool call, via Send) -> agent
                    +-> END (no tool calls)

`agent` is any langchain chat model bound to the tools (ChatOpenAI on an OpenAI-compatible
endpoint, or on facsynth's managed vLLM server started with tool calling on). `make_tools`
generates one LangChain tool per registry entry (same names, descriptions and input schemas
as the MCP server's); each returns its JSON result fenced as data (`prompts.fence`). The
tools that need confirmation (generate_and_verify, improve) first `interrupt()` with the
estimated sample count and time; the conversation resumes with `Command(resume=True/False)`.

Errors come back to the model as error ToolMessages: a project error (FacsynthError: a
missing file, a refused path, an invalid feature; `HANDLED` by the ToolNode) and bad
arguments (validated by the tool against the registry's model, unknown ones named); any other
exception is a bug: its traceback is logged and the model is told so
(`tool_registry.internal_error`). Conversations are checkpointed
with SqliteSaver in `<root>/.facsynth/chat.sqlite`, one thread per session id. The terminal
loop (`facsynth chat`) is agent/chat_terminal.py.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, SystemMessage
from langchain_core.messages import ToolMessage as LCToolMessage
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallWithContext, ToolInvocationError
from langgraph.types import Command, Send, interrupt
from pydantic import BaseModel, ValidationError

from agent.results import Cancelled
from agent.sandbox import STATE_DIR
from agent.tool_registry import TOOLS, ToolSpec, bad_arguments, internal_error
from agent.toolbox import ProgressFn, Toolbox
from prompts import PROMPT_DIR, fence, render, unfence
from tools.errors import ConfigError, FacsynthError
from tools.settings import Settings

log = logging.getLogger(__name__)

PROMPT = "chat_system.v4"
SESSIONS = "chat.sqlite"
RECURSION_LIMIT = 60
TOOL_CALL_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
"""vLLM server flags for OpenAI-style tool calls (hermes `<tool_call>` JSON)."""
HANDLED = (FacsynthError, ToolInvocationError)
"""What the ToolNode returns to the model as error ToolMessages: project errors, and bad
arguments langgraph itself catches (the tools answer their own validation errors and
internal errors; anything else would end the turn)."""


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

    def report(self, message: str, done: float, total: float | None) -> None:
        if self.progress is not None:
            self.progress(message, done, total)


def make_tools(box: Toolbox, hooks: Hooks | None = None, confirm: bool = True) -> list[BaseTool]:
    """The registry's tools over `box` as LangChain tools (fenced JSON results; the tools
    that need it ask the user to confirm first unless `confirm` is off)."""
    hooks = hooks or Hooks()
    return [chat_tool(spec, box, hooks, confirm) for spec in TOOLS]


def chat_tool(spec: ToolSpec, box: Toolbox, hooks: Hooks, confirm: bool = True) -> BaseTool:
    """One registry tool as a LangChain tool. Its input schema is the registry's argument
    model; its result reaches the model fenced as data: it quotes dataset rows and spans,
    which must never read as instructions (the system prompt says so)."""

    def call(**given: Any) -> str:
        return fence(_run(spec, box, spec.arguments(given), hooks, confirm).model_dump_json())

    def invalid(e: Any) -> str:
        # here rather than langgraph's ToolInvocationError, which drops the errors that name
        # no field (unknown arguments)
        problem = bad_arguments(spec.name, e) if isinstance(e, ValidationError) else str(e)
        return f"Error: {problem}. Fix the arguments and call again."

    # both handlers turn the error into an error ToolMessage: bad arguments, and the
    # ToolException that reports an internal error
    return StructuredTool(name=spec.name, description=spec.description, args_schema=spec.args,
                          func=call, handle_validation_error=invalid, handle_tool_error=True)


def _run(spec: ToolSpec, box: Toolbox, args: dict[str, Any], hooks: Hooks,
         confirm: bool) -> BaseModel:
    try:
        asked = spec.ask(box, args) if confirm else None
        if asked is not None:
            est = asked.estimate
            answer = interrupt({"tool": spec.name, "question": asked.question,
                                "samples": est.samples, "seconds": est.seconds,
                                "backend": est.backend, "args": args})
            if not approved(answer):
                return Cancelled(message=asked.declined)
        return spec.run(box, args, hooks.report)
    except FacsynthError as e:  # HANDLED by the ToolNode: its text, paths root-relative
        raise type(e)(box.sandbox.scrub(str(e))) from e
    except GraphBubbleUp:  # an interrupt
        raise
    except Exception as e:
        log.exception("internal error in the %s tool", spec.name)
        raise ToolException(internal_error(spec.name, e)) from e


def system_prompt(box: Toolbox, tools: Sequence[BaseTool], task: str = "toxicity") -> str:
    """The chat agent's instructions for a session on `task` (tools/tasks)."""
    from tools.tasks import TASKS

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    files = sorted(
        box.sandbox.rel(p) for pattern in ("*.jsonl", "*.csv", "*.parquet", "*/*.jsonl", "*/*.csv")
        for p in box.root.glob(pattern) if STATE_DIR not in p.parts
    )[:20]
    return render(PROMPT, root=str(box.root), files=files, task=task,
                  about=getattr(TASKS[task], "about", task),
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
    from agent.llm import endpoint_client, make_chat_model, start_vllm

    backend = chat_backend(settings)
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


def chat_backend(settings: Settings) -> str:
    """The backend the chat model runs on (endpoint or vllm); a ConfigError, before
    anything is started or written, when none can call tools."""
    from agent.llm import choose_backend

    backend = choose_backend(settings)
    if backend not in ("endpoint", "vllm"):
        raise ConfigError(
            "facsynth chat needs a chat model that calls tools: an OpenAI-compatible endpoint "
            "(FACSYNTH_LLM_BASE_URL + FACSYNTH_LLM_MODEL, e.g. vLLM with "
            "--enable-auto-tool-choice) or the managed vLLM server (--generator vllm); the "
            "in-process `local` backend cannot call tools"
        )
    return backend


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
