"""Runs or resumes one improve run through the real run factory (`start_run`, `run_loop`) on
the tiny model, for the kill -9 tests: `python -m tests.robustness.improve_driver RUN MODEL SAE
BACKEND [KILL]`, started in a folder holding anchor.jsonl and seed.jsonl.

BACKEND is `fake` (the scripted EchoLLM), `local` (in-process generation on the tiny
model) or `pool` (the pool path: pool.jsonl's rows picked by fac and labelled by the file,
then `--source both` synthesis by EchoLLM). KILL is `NODE:ROUND` (SIGKILL the process as
that node starts) or `samples:N` (SIGKILL it when the generator is asked for sample N+1:
generation is made sequential then, so exactly N samples are in the journal). Without KILL
the run goes to its stop rule; an existing run folder is resumed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from agent.graph import LoopSettings
from agent.runs import RunConfig, build_settings, run_loop, start_run
from memory.feature_memory import InMemoryFeatureMemory
from tests.fakes import EchoLLM, bag_of_words
from tools.pool.select import SelectSettings
from tools.pool.source import PoolSource
from tools.workspace import Workspace

LOOP = LoopSettings(max_rounds=2, top=3, per_feature=3, budget=100, epsilon=0.0, patience=5)


class KillAfter:
    """The LLM, one generation request at a time; SIGKILL before request `n + 1`."""

    def __init__(self, llm: Any, n: int) -> None:
        self.llm, self.n, self.asked = llm, n, 0
        self.lock: asyncio.Lock | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            if self.asked == self.n:
                os.kill(os.getpid(), signal.SIGKILL)
            self.asked += 1
            return str(await self.llm.achat(system, user, temperature=temperature, seed=seed))


def main(run: Path, model: str, sae: str, backend: str, kill: str | None = None) -> None:
    settings = build_settings(model=model, sae=sae, generator="local", judge={
        "min_support": 1, "min_support_frac": 0.0, "min_log_odds": 0.5})
    ws = Workspace(settings)
    ws.__dict__["memory"] = InMemoryFeatureMemory(bag_of_words)
    llm: Any = EchoLLM()
    if backend == "local":
        from tools.local_llm import LocalChat

        llm = LocalChat(ws.model, max_new_tokens=12)
    at: tuple[str, int] | None = None
    if kill and kill.startswith("samples:"):
        llm = KillAfter(llm, int(kill.split(":")[1]))
    elif kill:
        node, r = kill.split(":")
        at = (node, int(r))

    def before(node: str, r: int) -> None:
        if (node, r) == at:
            os.kill(os.getpid(), signal.SIGKILL)

    resuming = (run / "config.json").exists()
    if resuming:
        cfg = RunConfig.read(run)
    else:
        pool = None
        if backend == "pool":
            pool = PoolSource(path="pool.jsonl", labeler="file", source="both", budget=8,
                              select=SelectSettings(batch=4))
        cfg = start_run(run, RunConfig(
            anchor="anchor.jsonl", data="seed.jsonl", relevance="label",
            settings={"model": model, "sae": sae, "generator": "local"},
            loop=LOOP.model_dump(), detector={"kind": "probe"}, pool=pool))
    run_loop(run, cfg, resuming, workspace=ws, llm=llm, before=before)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
