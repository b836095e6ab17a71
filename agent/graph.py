"""The self-improvement loop as a LangGraph state machine: its state, its wiring and its
stop rule (`decide`).

    load -> probe -> coverage -+-> interpret -> generate -> verify -> train -> evaluate -> decide
                               |  (round 0: measure the starting data, no synthesis)  ^      |
                               +------------------------------------------------> train      |
                     ^-------------------------------- continue ----------------------------+
                                                                                  stop -> END

Nodes are thin (agent/steps.py over tools/); the state holds only small, JSON-able values
(numbers, feature ids, summaries), and everything large lives in the run directory. The
graph is checkpointed after every node with LangGraph's SQLite checkpointer in the run dir,
so a killed run resumes at the node it was in (`facsynth improve --resume R`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Literal, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

from tools.rundir import LoopSettings, RunPaths

THREAD = "improve"


class LoopState(TypedDict, total=False):
    round: int
    fac: float
    fac_before: float
    n_task: int
    missing: list[int]
    targets: list[dict[str, Any]]
    per_feature: int
    generated_total: int
    metric: list[float | None]
    """the eval set's headline metric after each round (None: no model)"""
    stop_reason: str | None


def decide(state: LoopState, loop: LoopSettings) -> str | None:
    """Why the run stops after this round, or None to go on."""
    r = state.get("round", 0)
    if r > 0 and state.get("fac", 0.0) - state.get("fac_before", 0.0) < loop.epsilon:
        return f"FAC gain {state['fac'] - state['fac_before']:+.3f} < epsilon {loop.epsilon}"
    if not state.get("missing"):
        return "no task feature is missing"
    if r >= loop.max_rounds:
        return f"max rounds ({loop.max_rounds}) reached"
    if state.get("generated_total", 0) >= loop.budget:
        return f"sample budget ({loop.budget}) spent"
    scores = [s for s in state.get("metric", []) if s is not None]
    if len(scores) > loop.patience:
        best_before = max(scores[: -loop.patience])
        if max(scores[-loop.patience :]) <= best_before:
            return f"the eval metric has not improved for {loop.patience} round(s)"
    return None


def route_after_coverage(state: LoopState) -> Literal["interpret", "train"]:
    return "train" if state.get("round", 0) == 0 else "interpret"


def route_after_decide(state: LoopState) -> Literal["continue", "stop"]:
    return "stop" if state.get("stop_reason") else "continue"


def build(steps: Any, checkpointer: Any = None) -> Any:
    """The compiled graph over `steps` (an object with one method per node, see
    agent/steps.py; tests pass their own)."""
    g = StateGraph(LoopState)
    for name in ("load", "probe", "coverage", "interpret", "generate", "verify", "train",
                 "evaluate", "decide"):
        g.add_node(name, getattr(steps, name))
    g.add_edge(START, "load")
    g.add_edge("load", "probe")
    g.add_edge("probe", "coverage")
    g.add_conditional_edges("coverage", route_after_coverage, ["interpret", "train"])
    g.add_edge("interpret", "generate")
    g.add_edge("generate", "verify")
    g.add_edge("verify", "train")
    g.add_edge("train", "evaluate")
    g.add_edge("evaluate", "decide")
    g.add_conditional_edges("decide", route_after_decide, {"continue": "probe", "stop": END})
    return g.compile(checkpointer=checkpointer)


def checkpointer(run_dir: Path) -> SqliteSaver:
    """SQLite checkpoints in the run dir (shared across processes, so runs resume)."""
    conn = sqlite3.connect(RunPaths(run_dir).checkpoints, check_same_thread=False)
    return SqliteSaver(conn)


def thread(run_dir: Path) -> dict[str, Any]:
    return {"configurable": {"thread_id": THREAD}, "recursion_limit": 10_000}
