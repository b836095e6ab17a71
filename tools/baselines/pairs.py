"""Baselines for pair tasks (reward, steering): whole pairs in the task's generation layout,
read back with the task's parser, under the same request loop and budget as the text
baselines (driver `_drive`).

- `random`: the task's own generation prompt with no target feature: a random seed row is
  shown (`task.examples`, as fac's hosts), the theme is left open. The untargeted twin of
  fac's requests.
- `self-instruct`: a few seed rows (and accepted generated ones, as for texts), then
  "write example N+1"; ROUGE-L against the pool rejects near copies.
- `cot-self-instruct`: the text method's chain-of-thought prompt over a few seed rows'
  messages gives the new message (tools/baselines/cot.py).
- `sao`: a persona's message, two replies sampled alike and the model's own ranking of them
  (tools/baselines/sao.py); preference pairs (the reward task) only.
Every request of the first three goes through the task's `writer` (the reward task writes
the message, then each reply, in separate requests), like fac's; sao writes its own pairs.

Evol-instruct, magpie, prismatic and synalign rewrite, invent or target single user
messages, so they have no pair version. A pair's replies may decline (a preferred reply
often does), so refusal words do not reject a pair; an unparseable reply does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from prompts import render
from tools.baselines.base import (
    METHODS,
    NO_FEATURE,
    BaselineError,
    BaselineSettings,
    Call,
    Strategy,
    version,
)
from tools.baselines.cot import CoTSelfInstruct, MarkerCut
from tools.baselines.driver import _drive
from tools.baselines.methods import SelfInstruct
from tools.baselines.sao import SAOPairs
from tools.generate import AsyncChatClient
from tools.verify import Provenance, Sample

PROMPT_SELF_INSTRUCT = "baseline_pairs_self_instruct.v1"
PAIR_METHODS = ("random", "self-instruct", "cot-self-instruct", "sao")
OPEN_THEME = "any topic that examples like this one cover"


class _Parsed(Strategy):
    """Replies are read with the task's parser and kept in its canonical layout."""

    refusals_ok = True

    def __init__(self, task: Any) -> None:
        self.task = task

    def extract(self, reply: str) -> str:
        row = self.task.parse(reply)
        return self.task.format_row(*row) if row else ""


class PairRandom(_Parsed):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, task: Any,
                 seeds: list[str], rng: random.Random) -> None:
        super().__init__(task)
        self.client, self.s, self.seeds, self.rng = client, s, seeds, rng

    def request(self, seed: int) -> tuple[Call, Any]:
        user = render(self.task.generate_prompt, summary=OPEN_THEME, spans=[], label=1,
                      host=self.rng.choice(self.seeds), k=0)
        return (lambda: self.client.achat(self.task.system, user,
                                          temperature=self.s.temperature, seed=seed)), None


class PairSelfInstruct(_Parsed, SelfInstruct):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, task: Any,
                 seeds: list[str], rng: random.Random) -> None:
        _Parsed.__init__(self, task)
        SelfInstruct.__init__(self, client, s, seeds, rng)
        self.system = task.system

    def prompt(self, examples: list[str]) -> str:
        return render(PROMPT_SELF_INSTRUCT, examples=examples)


class PairCoT(_Parsed, CoTSelfInstruct):
    """CoT-Self-Instruct's prompt (no label) for the message; the client is the task's
    writer over `MarkerCut`, so the writer sees only the text after the marker."""

    def __init__(self, client: AsyncChatClient, s: BaselineSettings, task: Any,
                 seeds: list[str], rng: random.Random) -> None:
        _Parsed.__init__(self, task)
        CoTSelfInstruct.__init__(self, client, s, seeds, rng, None)
        self.system = task.system


def synthesize_pairs(method: str, task: Any, *, data: Any, budget: int,
                     client: AsyncChatClient, settings: BaselineSettings,
                     gate: Callable[[Sample], bool] | None = None) -> list[Sample]:
    """Up to `budget` pair samples (text: the pair's probe text, fields: the pair) by
    `method` from the real pairs `data` (shown as `task.examples`, and to the task's writer);
    fewer, with a warning, when the generator rarely writes the layout within the request
    limit. `gate`: a check of each parsed pair as its sample (see `asynthesize`)."""
    seeds = task.examples(data)
    if method not in PAIR_METHODS:
        if method in METHODS:
            raise BaselineError(f"{method} writes single texts, not pairs; pair tasks compare "
                                f"{', '.join(PAIR_METHODS)}")
        raise BaselineError(f"unknown pair baseline {method!r}; choose one of "
                            f"{', '.join(PAIR_METHODS)}")
    rng = random.Random(settings.seed)
    strategy: Strategy
    if method == "sao":  # fully self-synthetic: the seeds only reject copies
        strategy = SAOPairs(client, settings, task, rng)
    elif not seeds:
        raise BaselineError(f"{method} needs at least one seed pair")
    elif method == "cot-self-instruct":
        strategy = PairCoT(task.writer(MarkerCut(client, settings.cot_max_tokens), data),
                           settings, task, list(seeds), rng)
    else:
        make = PairRandom if method == "random" else PairSelfInstruct
        strategy = make(task.writer(client, data), settings, task, list(seeds), rng)
    def sample(text: str, seed: int) -> Sample:
        probe, fields = task.read_reply(text)
        return Sample(text=probe, label=1, fields=fields, provenance=Provenance(
            feature=NO_FEATURE, round=settings.round, generator=client.name,
            prompt_version=f"baseline-pairs-{method}.{version(method)}",
            temperature=settings.temperature, seed=seed))

    got = asyncio.run(_drive(method, strategy, known=seeds,
                             budget=budget, settings=settings, sleep=asyncio.sleep,
                             allow_short=True, gate=None if gate is None else (
                                 lambda text, seed: gate(sample(text, seed)))))
    return [sample(text, seed) for text, seed in got]
