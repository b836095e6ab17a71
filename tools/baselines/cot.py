"""CoT-Self-Instruct (Yu et al., 2025, "CoT-Self-Instruct: Building high-quality synthetic
prompts for reasoning and non-reasoning tasks", arXiv:2507.23751).

The paper's recipe for non-verifiable tasks, and what it is here:

- Seeds: each request shows a few seed prompts (its instruction-following template shows
  two, drawn from one category) -> `cot_examples` (2) seed texts, drawn at random from the
  seeds, which all carry the asked label (the label plays the category).
- Reasoning before writing: the LLM first lists what the examples have in common (here:
  what makes each of them what it is, their label), plans a new prompt of similar quality
  and complexity from that list, and only then writes it, in a fixed reply layout with the
  new prompt last (`Step 3 #Synthetic Prompt#` in the paper) -> the same three steps, with
  the new message after the marker `#New message#`.
- Parsing: only the new prompt is kept -> the text after the last marker, up to a following
  `#...#` or `Step N` heading, cleaned like every baseline's text; the reasoning is dropped,
  and a reply without the marker is rejected as `no_marker`. The reply may run to
  `cot_max_tokens` (384) tokens, not the generator's max_new_tokens (96, one message): at 96
  the reasoning alone filled the reply and the marker never came.
- Filtering: for non-verifiable tasks the paper keeps only prompts that pass RIP (Yu et
  al., 2025, "R.I.P.: Better Models by Survival of the Fittest Prompts": sample responses,
  score them with a reward model, reject prompts whose lowest reward is low). There is no
  reward judge of prompts offline; facsynth's counterpart is the label gate (tools/
  label_gate.py), which fac's loop applies to its rows and `compare` to every baseline's
  (`Comparison.gate`), so this module applies only the filters every baseline shares
  (empty, refusal, duplicate).
  Answer-Consistency, the paper's filter for verifiable tasks, has nothing to check here:
  a message has no answer.

Pair tasks (`PairCoT`, tools/baselines/pairs.py): the same prompt, shown `task.examples`
(the pairs' messages or questions, no label), gives the message; the task's writer then
writes both replies, as for every pair baseline. `MarkerCut` hands the writer only the text
after the marker.
"""

from __future__ import annotations

import random
import re
from typing import Any

from prompts import render
from tools.baselines.base import BaselineSettings, Call, RejectedReply, Strategy
from tools.baselines.methods import _shorten
from tools.generate import SYSTEM, AsyncChatClient, clean, longer_replies

PROMPT_COT = "baseline_cot_self_instruct.v1"
MARKER = "#New message#"
_MARKER = re.compile(r"#\s*new\s+message\s*#\s*:?", re.IGNORECASE)
_NEXT_HEADING = re.compile(r"^\s*(?:#[^#\n]{1,40}#|step\s*\d)", re.IGNORECASE | re.MULTILINE)


def after_marker(reply: str) -> str:
    """The new message of a CoT reply: the text after the last `#New message#`, up to a
    following heading; RejectedReply("no_marker") when the reply has no marker."""
    found = list(_MARKER.finditer(reply))
    if not found:
        raise RejectedReply("no_marker")
    rest = reply[found[-1].end():]
    heading = _NEXT_HEADING.search(rest)
    return clean(rest[: heading.start()] if heading else rest)


class CoTSelfInstruct(Strategy):
    """`label` 1/0: messages of that label; None: a pair task's messages (no label)."""

    system = SYSTEM

    def __init__(self, client: AsyncChatClient, s: BaselineSettings, seeds: list[str],
                 rng: random.Random, label: int | None) -> None:
        self.client, self.s, self.seeds, self.rng, self.label = client, s, seeds, rng, label
        self.thinking = longer_replies(client, s.cot_max_tokens)

    def request(self, seed: int) -> tuple[Call, Any]:
        examples = self.rng.sample(self.seeds, min(len(self.seeds), self.s.cot_examples))
        user = render(PROMPT_COT, label=self.label,
                      examples=[_shorten(e, self.s.example_chars) for e in examples])
        return (lambda: self.thinking.achat(self.system, user,
                                            temperature=self.s.temperature, seed=seed)), examples

    def extract(self, reply: str) -> str:
        return after_marker(reply)


class MarkerCut:
    """An async chat client over `llm` for a pair task's writer: a request that asks for the
    marker (a CoT-Self-Instruct prompt) may run to `max_tokens` and its reply is cut to the
    text after the marker (see `after_marker`); other requests (the writer's replies) pass
    through unchanged."""

    def __init__(self, llm: AsyncChatClient, max_tokens: int) -> None:
        self.llm, self.thinking = llm, longer_replies(llm, max_tokens)
        self.name = llm.name

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        if MARKER not in user:
            return await self.llm.achat(system, user, temperature=temperature, seed=seed)
        return after_marker(await self.thinking.achat(system, user, temperature=temperature,
                                                      seed=seed))
