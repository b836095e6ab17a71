"""The `llm` relevance judge: does a feature matter for the task?

The paper's protocol: an LLM reads a feature's summary (and its top spans) under a task
guideline (a prompt file) and answers Yes / Probably / Maybe / No with a short reason.
F_task itself comes from the cheap, reproducible `label` judge (tools/coverage.py); the LLM
judge vets the missing features before samples are generated for them. With `auto`, a
feature is targeted unless the LLM says No, and the report says how often the two judges
agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, Field

from prompts import render
from tools.interpret import ChatClient, ask_json

PROMPT = "relevance_toxicity.v2"
SYSTEM = "You judge features of a language model for a content-safety team. Answer in JSON."
Verdict = Literal["Yes", "Probably", "Maybe", "No"]
Relevance = Literal["label", "llm", "auto"]
RELEVANT: frozenset[str] = frozenset({"Yes", "Probably"})


class RelevanceAnswer(BaseModel):
    verdict: Verdict
    reason: str = Field("", max_length=500)


def judge_feature(
    summary: str, spans: Sequence[str], client: ChatClient, prompt: str = PROMPT, retries: int = 2
) -> RelevanceAnswer:
    user = render(prompt, summary=summary, spans=list(spans)[:3])
    return ask_json(client, SYSTEM, user, RelevanceAnswer, retries)


def verdict_key(prompt: str) -> str:
    """Where a feature's LLM verdict under `prompt` is remembered (FeatureRecord.relevance):
    "llm" for the toxicity guideline (as before tasks), "llm:<task>" for another task's."""
    if prompt == PROMPT:
        return "llm"
    return "llm:" + prompt.removeprefix("relevance_").split(".")[0]


def keep(verdict: str | None, relevance: Relevance) -> bool:
    """Should a label-relevant missing feature with this LLM verdict be targeted?"""
    if relevance == "label" or verdict is None:
        return True
    if relevance == "llm":
        return verdict in RELEVANT
    return verdict != "No"  # auto: the label judge already chose it; the LLM may veto


class Agreement(BaseModel):
    judged: int = Field(description="label-relevant features the LLM judged")
    agree: int = Field(description="...that the LLM called Yes or Probably")
    verdicts: dict[str, int]

    @property
    def rate(self) -> float:
        return self.agree / self.judged if self.judged else 0.0


def agreement(verdicts: Iterable[str]) -> Agreement:
    """How often the LLM agrees with the label judge on features the label judge chose."""
    counts = {v: 0 for v in ("Yes", "Probably", "Maybe", "No")}
    for v in verdicts:
        counts[v] = counts.get(v, 0) + 1
    n = sum(counts.values())
    return Agreement(judged=n, agree=counts["Yes"] + counts["Probably"], verdicts=counts)
