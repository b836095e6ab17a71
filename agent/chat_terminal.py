"""`facsynth chat` on the terminal: start the chat model (agent/chat.py `open_chat_model`),
build the graph over the toolbox and talk to it on rich consoles, turn by turn: streamed
replies, tool calls and results (errors in red), y/n confirmations of the long tools,
progress lines on stderr. `main` is what `facsynth chat` runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage
from rich.markup import escape

from agent.chat import (
    SESSIONS,
    ChatSession,
    Event,
    Hooks,
    build_graph,
    chat_backend,
    make_tools,
    open_chat_model,
    sessions,
    system_prompt,
)
from agent.sandbox import STATE_DIR
from agent.toolbox import Toolbox
from tools.errors import ConfigError
from tools.settings import Settings

log = logging.getLogger(__name__)

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
        except Exception as e:  # the model client failed (tool bugs are tool results): go on
            log.debug("turn failed", exc_info=True)
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
    task: str = "toxicity",
) -> None:
    """`facsynth chat`: start the chat model (and, for vllm, its server), then talk about
    datasets of `task` (tools/tasks)."""
    backend = chat_backend(settings)  # refused before anything is written
    box = Toolbox(settings, root)
    store = box.sandbox.state_path(SESSIONS)
    if session_id is not None and not store.exists():
        raise ConfigError(f"no chat session {session_id!r} in {store} (no session was saved "
                          "in this root yet)")
    checkpoints = sessions(box.root)
    if session_id is not None:
        if checkpoints.get_tuple({"configurable": {"thread_id": session_id}}) is None:
            raise ConfigError(f"no chat session {session_id!r} in "
                              f"{box.root / STATE_DIR / SESSIONS}")
    if backend == "vllm":
        err.print("starting the managed vLLM server with tool calling (a few minutes on CPU)")
    with box, open_chat_model(settings, box.root) as (model, client):
        if client is not None:
            box.use_llm(client)
        hooks = Hooks()
        tools = make_tools(box, hooks)
        graph = build_graph(model, tools, system_prompt(box, tools, task), checkpoints)
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

