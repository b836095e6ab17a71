"""The self-improvement loop as a LangGraph state machine: its state, its wiring and its
stop rule (`decide`).

    load -> probe -> coverage -+-> interpret -> generate -> verify -> train -> evaluate -> decide
                               |  (round 0: measure the starting data, no synthesis)  ^      |
                               +------------------------------------------------> train      |
                               +-> select -> label -+-(pool)----------------------> train    |
                               |   (the pool path)  +-(both)-> interpret ...                 |
                     ^-------------------------------- continue ----------------------------+
                                                                                  stop -> END

The pool path (`RunConfig.pool`): `select` picks the pool rows worth labelling, `label` gets
their labels — from the pool's label column, the label gate's judges, or a person: then it
pauses with a LangGraph `interrupt` until the labels are given (`facsynth label`), and a
resumed run asks only for the rows still waiting.

Nodes are thin (agent/steps.py over tools/); the state holds only small, JSON-able values
(numbers, feature ids, summaries), and everything large lives in the run directory. The
graph is checkpointed after every node with LangGraph's SQLite checkpointer in the run dir,
so a killed run resumes at the node it was in (`facsynth improve --resume R`).
"""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

from tools.pool.source import PoolSource
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
    picked_total: int
    """the pool path: pool rows picked so far, all rounds"""
    picked: int
    """the pool path: pool rows picked this round"""


def decide(state: LoopState, loop: LoopSettings, pool: PoolSource | None = None
           ) -> str | None:
    """Why the run stops after this round, or None to go on. The pool path stops on its own
    rules (labels spent, no row left to pick, max rounds), not on FAC or the eval metric's
    patience: a round of real labels is worth having whether or not it moves coverage or a
    small eval set's metric, and the person labelling decides when to stop."""
    r = state.get("round", 0)
    if pool is not None:
        if state.get("picked_total", 0) >= pool.budget:
            return f"label budget ({pool.budget} pool rows) spent"
        if r > 0 and not state.get("picked", 0):
            return "no pool row is left to pick"
    else:
        if r > 0 and state.get("fac", 0.0) - state.get("fac_before", 0.0) < loop.epsilon:
            return f"FAC gain {state['fac'] - state['fac_before']:+.3f} < epsilon {loop.epsilon}"
        if not state.get("missing"):
            return "no task feature is missing"
    if r >= loop.max_rounds:
        return f"max rounds ({loop.max_rounds}) reached"
    if state.get("generated_total", 0) >= loop.budget:
        return f"sample budget ({loop.budget}) spent"
    scores = [s for s in state.get("metric", []) if s is not None]
    if pool is None and len(scores) > loop.patience:
        best_before = max(scores[: -loop.patience])
        if max(scores[-loop.patience :]) <= best_before:
            return f"the eval metric has not improved for {loop.patience} round(s)"
    return None


def route_after_coverage(state: LoopState, source: str = "generate"
                         ) -> Literal["interpret", "train", "select"]:
    if state.get("round", 0) == 0:
        return "train"
    return "interpret" if source == "generate" else "select"


def route_after_label(state: LoopState, source: str = "pool") -> Literal["interpret", "train"]:
    return "interpret" if source == "both" else "train"


def route_after_decide(state: LoopState) -> Literal["continue", "stop"]:
    return "stop" if state.get("stop_reason") else "continue"


def build(steps: Any, checkpointer: Any = None, source: str = "generate") -> Any:
    """The compiled graph over `steps` (an object with one method per node, see
    agent/steps.py; tests pass their own); `source` is where new rows come from
    (generate, pool, both: `RunConfig.source`)."""
    g = StateGraph(LoopState)
    nodes = ["load", "probe", "coverage", "interpret", "generate", "verify", "train",
             "evaluate", "decide"]
    if source != "generate":
        nodes += ["select", "label"]
    for name in nodes:
        g.add_node(name, getattr(steps, name))
    g.add_edge(START, "load")
    g.add_edge("load", "probe")
    g.add_edge("probe", "coverage")
    g.add_conditional_edges("coverage", partial(route_after_coverage, source=source),
                            ["interpret", "train", "select"] if source != "generate"
                            else ["interpret", "train"])
    if source != "generate":
        g.add_edge("select", "label")
        g.add_conditional_edges("label", partial(route_after_label, source=source),
                                ["interpret", "train"])
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
