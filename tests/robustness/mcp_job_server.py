"""`facsynth serve` over stdio on the tiny model, for the job tests: `python -m
tests.robustness.mcp_job_server serve ROOT PARTS DELAY` serves, and the jobs it starts run
detached as `... work ROOT PARTS DELAY JOB_ID` (the worker of agent/jobs.py). PARTS holds
the tiny model folder (the test writes it once); the LLM is the scripted EchoLLM, each
generation request taking DELAY seconds, so a job runs long enough to disconnect from or
cancel."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from agent.mcp_server import serve
from agent.toolbox import Toolbox
from memory.feature_memory import InMemoryFeatureMemory
from tests.fakes import TOY_ANCHOR, EchoLLM, bag_of_words, mean_residual, tiny_model, tiny_sae
from tools.coverage import JudgeSettings
from tools.settings import Settings
from tools.workspace import Workspace


class SlowEcho(EchoLLM):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        await asyncio.sleep(self.delay)
        return await super().achat(system, user, temperature=temperature, seed=seed)


def box(root: Path, parts: Path, delay: float, worker: list[str] | None = None) -> Toolbox:
    settings = Settings(
        home=parts / "home", model=str(parts / "model"), threshold="absolute", delta=0.0,
        judge=JudgeSettings(min_support=1, min_support_frac=0.0, min_log_odds=0.5))
    ws = Workspace(settings)
    lm = tiny_model()
    ws.__dict__["model"] = lm
    center = mean_residual(lm, 2, [t for t, _ in TOY_ANCHOR])
    ws.__dict__["sae"] = tiny_sae(layer=2, d_sae=256, k=4, center=center)
    ws.__dict__["memory"] = InMemoryFeatureMemory(bag_of_words)
    llm: Any = SlowEcho(delay)
    return Toolbox(settings, root, workspace=ws, llm=llm, job_worker=worker)


if __name__ == "__main__":
    mode, root, parts, delay = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    if mode == "serve":
        worker = [sys.executable, "-m", "tests.robustness.mcp_job_server", "work", str(root),
                  str(parts), delay]
        with box(root, parts, float(delay), worker) as b:
            serve(b)
    else:
        with box(root, parts, float(delay)) as b:
            b.jobs.execute(sys.argv[5])
