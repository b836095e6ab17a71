"""The chat-prompted baselines: `random`, `self-instruct` (Wang et al., 2022) and
`evol-instruct` (WizardLM, Xu et al., 2023), one strategy each (see the package doc)."""

from __future__ import annotations

import logging
import random
import re
from collections import deque
from typing import Any

from prompts import render
from tools.baselines.base import (
    EVOL_LEAK_MARKERS,
    EVOL_OPS,
    PROMPT_EVOL_BREADTH,
    PROMPT_EVOL_DEPTH,
    PROMPT_RANDOM,
    PROMPT_SELF_INSTRUCT,
    BaselineSettings,
    Call,
    Strategy,
)
from tools.baselines.rouge import RougePool
from tools.generate import SYSTEM, AsyncChatClient, clean
from tools.verify import normalise

log = logging.getLogger(__name__)


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


class Random(Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings) -> None:
        self.client, self.s = client, s
        self.user = render(PROMPT_RANDOM, label=s.label)

    def request(self, seed: int) -> tuple[Call, Any]:
        return (lambda: self.client.achat(SYSTEM, self.user, temperature=self.s.temperature,
                                          seed=seed)), None


class SelfInstruct(Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, seeds: list[str],
                 rng: random.Random) -> None:
        self.client, self.s, self.rng = client, s, rng
        self.seeds = seeds
        self.generated: list[str] = []
        self.pool = RougePool(seeds)

    system = SYSTEM

    def request(self, seed: int) -> tuple[Call, Any]:
        s = self.s
        n_gen = min(s.generated_examples, len(self.generated))
        n_seed = min(len(self.seeds), s.seed_examples + s.generated_examples - n_gen)
        examples = self.rng.sample(self.seeds, n_seed) + self.rng.sample(self.generated, n_gen)
        self.rng.shuffle(examples)
        user = self.prompt([_shorten(e, s.example_chars) for e in examples])
        return (lambda: self.client.achat(self.system, user, temperature=s.temperature,
                                          seed=seed)), examples

    def prompt(self, examples: list[str]) -> str:
        return render(PROMPT_SELF_INSTRUCT, label=self.s.label, examples=examples)

    def extract(self, reply: str) -> str:
        return clean(re.sub(r"^\s*(message\s*)?\d+\s*[.):]\s*", "", reply, flags=re.I))

    def check(self, text: str, ctx: Any) -> str | None:
        return "rouge" if self.pool.near(text, self.s.rouge_threshold) else None

    def accepted(self, text: str, ctx: Any) -> None:
        self.generated.append(text)
        self.pool.add(text)


class Evol(Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, seeds: list[str],
                 rng: random.Random) -> None:
        self.client, self.s, self.rng = client, s, rng
        self.seeds = seeds
        self.frontier: deque[str] = deque(rng.sample(seeds, len(seeds)))
        self.next_gen: list[str] = []
        self.children: list[str] = []
        self.generation = 1

    def _parent(self) -> str:
        if not self.frontier and self.next_gen:
            self.rng.shuffle(self.next_gen)
            self.frontier, self.next_gen = deque(self.next_gen), []
            self.generation += 1
            log.debug("evol-instruct: generation %d, %d parents", self.generation,
                      len(self.frontier))
        if self.frontier:
            return self.frontier.popleft()
        return self.rng.choice(self.seeds + self.children)  # all parents in flight

    def request(self, seed: int) -> tuple[Call, Any]:
        parent, op = self._parent(), self.rng.choice(EVOL_OPS)
        message = _shorten(parent, self.s.example_chars)
        if op == "breadth":
            user = render(PROMPT_EVOL_BREADTH, label=self.s.label, message=message)
        else:
            user = render(PROMPT_EVOL_DEPTH, label=self.s.label, message=message, operation=op)
        return (lambda: self.client.achat(SYSTEM, user, temperature=self.s.temperature,
                                          seed=seed)), parent

    def check(self, text: str, ctx: Any) -> str | None:
        if normalise(text) == normalise(ctx):
            return "same_as_parent"
        if any(m in text.lower() for m in EVOL_LEAK_MARKERS):
            return "copies_instruction"
        return None

    def accepted(self, text: str, ctx: Any) -> None:
        self.children.append(text)
        self.next_gen.append(text)

    def rejected(self, ctx: Any) -> None:
        self.next_gen.append(ctx)  # WizardLM: a failed evolution's parent goes back
