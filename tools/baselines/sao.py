"""SAO, Self-Alignment Optimization (Yin et al., 2025, "Aligning Large Language Models via
Fully Self-Synthetic Data", arXiv:2510.06652; code github.com/SJY8460/SAO, not reachable
here). Fully self-synthetic: the model writes the prompts, the responses and the
preferences; no seed data is shown (seeds only reject copies).

The paper's recipe, and what it is here:

- Prompts from personas: the model role-plays a persona sampled from a large persona
  collection (Persona Hub, Chan et al., 2024) and writes the query that person would ask ->
  `prompts/sao_personas.v1.md`, 100 short, varied personas written for facsynth (not taken
  from Persona Hub); requests go through a seeded shuffle of the list, so every persona is
  used once before any comes back. For text tasks the message is asked with the target label
  (as every chat-prompted baseline here); for pair tasks, any message.
- Pairwise responses: the same model samples two responses to each prompt -> two requests
  with the same prompt file (`baseline_sao_reply.v1`) and different seeds.
- Self-judgment: the same model, given a ranking prompt, says which response is better;
  the winner is chosen, the other rejected (the paper then trains with SimPO) -> one request
  (`baseline_sao_rank.v1`) at temperature 0 (a verdict, not a sample) whose reply must start
  with "A" or "B" (optionally "Reply"/"Response" before it); anything else rejects the pair
  as `unranked`. The two responses are exchangeable samples, so showing the first as A adds
  no systematic bias even for a judge that favours one position.

SAO's pairs are better-vs-worse replies, so only preference tasks (`PREFERENCE_TASKS`: the
reward task) have an SAO pair version; a steering pair is behaviour-matching vs not, which
"better" does not decide.
"""

from __future__ import annotations

import random
import re
from functools import cache
from typing import Any

from prompts import render
from tools.baselines.base import (
    BaselineError,
    BaselineSettings,
    Call,
    RejectedReply,
    Strategy,
)
from tools.generate import SYSTEM, AsyncChatClient, clean
from tools.verify import normalise

PROMPT_SAO = "baseline_sao.v1"
PROMPT_SAO_REPLY = "baseline_sao_reply.v1"
PROMPT_SAO_RANK = "baseline_sao_rank.v1"
PERSONAS = "sao_personas.v1"
PREFERENCE_TASKS = frozenset({"reward"})
SYSTEM_REPLY = "You are a helpful AI assistant."
SYSTEM_RANK = "You compare replies of AI assistants and say which one is better."
_VERDICT = re.compile(r"^[\W_]*(?:(?i:reply|response)\s*)?\(?([AB])\)?(?![A-Za-z])")


@cache
def personas() -> tuple[str, ...]:
    """The persona list: each "- " line of `prompts/sao_personas.v1.md`."""
    out = tuple(line[2:].strip() for line in render(PERSONAS).splitlines()
                if line.startswith("- ") and line[2:].strip())
    if not out:
        raise BaselineError(f"prompts/{PERSONAS}.md lists no personas")
    return out


def parse_verdict(reply: str) -> str | None:
    """"A" or "B" when the ranking reply starts with that letter (after punctuation, and an
    optional "Reply"/"Response"), else None."""
    m = _VERDICT.match(reply.strip())
    return m.group(1) if m else None


class PersonaCycle:
    """Personas in a seeded random order, each once per pass over the list."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queue: list[str] = []

    def next(self) -> str:
        if not self.queue:
            self.queue = list(personas())
            self.rng.shuffle(self.queue)
        return self.queue.pop()


class SAO(Strategy):
    """Text rows: one persona-voiced message per request, with the target label."""

    def __init__(self, client: AsyncChatClient, s: BaselineSettings,
                 rng: random.Random) -> None:
        self.client, self.s = client, s
        self.personas = PersonaCycle(rng)

    def request(self, seed: int) -> tuple[Call, Any]:
        persona = self.personas.next()
        user = render(PROMPT_SAO, persona=persona, label=self.s.label)
        return (lambda: self.client.achat(SYSTEM, user, temperature=self.s.temperature,
                                          seed=seed)), persona


class SAOPairs(Strategy):
    """Pair rows: a persona's message, two sampled replies, the model's own ranking; the
    pair in the task's layout (`task.assemble`), read back with the task's parser."""

    refusals_ok = True  # a preferred reply may decline

    def __init__(self, client: AsyncChatClient, s: BaselineSettings, task: Any,
                 rng: random.Random) -> None:
        name = getattr(task, "name", "?")
        if name not in PREFERENCE_TASKS:
            raise BaselineError(f"sao: the {name} task's pairs are not better-vs-worse replies, "
                                "so SAO's self-ranking cannot direct them; use it for reward")
        self.client, self.s, self.task = client, s, task
        self.personas = PersonaCycle(rng)

    def request(self, seed: int) -> tuple[Call, Any]:
        persona = self.personas.next()
        return (lambda: self._pair(persona, seed)), persona

    async def _pair(self, persona: str, seed: int) -> str:
        t = self.s.temperature
        ask = render(PROMPT_SAO, persona=persona, label=None)
        message = clean(await self.client.achat(self.task.system, ask, temperature=t,
                                                seed=seed))
        if not message:
            raise RejectedReply("empty_message")
        answer = render(PROMPT_SAO_REPLY, message=message)
        replies = [clean(await self.client.achat(SYSTEM_REPLY, answer, temperature=t,
                                                 seed=(seed + k) % 2**52)) for k in (1, 2)]
        if not all(replies):
            raise RejectedReply("empty_reply")
        if normalise(replies[0]) == normalise(replies[1]):
            raise RejectedReply("same_replies")
        rank = render(PROMPT_SAO_RANK, message=message, first=replies[0], second=replies[1])
        verdict = parse_verdict(await self.client.achat(SYSTEM_RANK, rank, temperature=0.0,
                                                        seed=(seed + 3) % 2**52))
        if verdict is None:
            raise RejectedReply("unranked")
        chosen, rejected = replies if verdict == "A" else replies[::-1]
        return str(self.task.assemble(message, chosen, rejected, seed))

    def extract(self, reply: str) -> str:
        row = self.task.parse(reply)
        return self.task.format_row(*row) if row else ""
