"""Feature interpreter: an LLM summarises what a feature responds to, from its top spans.

The LLM is any object with `chat(system, user) -> str` (the agent layer adapts langchain's
ChatOpenAI to it; tests use scripted fakes), so this module stays framework-free. The reply
must be a JSON object matching `Interpretation`; an invalid reply is sent back with the
validation error and asked again, up to `retries` times. Features already in the feature
memory are never interpreted again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, Field, ValidationError

from memory.feature_memory import FeatureMemory, FeatureRecord
from prompts import render
from tools.coverage import Span
from tools.errors import FacsynthError

log = logging.getLogger(__name__)

PROMPT = "interpret_feature.v1"
SYSTEM = "You are a careful interpretability researcher. You answer in JSON only."


class ChatClient(Protocol):
    def chat(self, system: str, user: str) -> str: ...


class LLMOutputError(FacsynthError):
    """The LLM did not produce valid structured output after the allowed retries."""


class Interpretation(BaseModel):
    summary: str = Field(min_length=1)
    interpretable: bool = True
    confidence: float = Field(ge=0, le=1)


def _parse(reply: str) -> Interpretation:
    text = reply.strip()
    # Chat models like to wrap JSON in a fenced block; take the outermost object.
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end < start:
        raise ValueError("no JSON object in the reply")
    result = Interpretation.model_validate(json.loads(text[start : end + 1]))
    if result.summary.strip().lower().rstrip(".") == "cannot tell":
        result.interpretable = False
    return result


def interpret_feature(
    spans: Sequence[Span], client: ChatClient, retries: int = 2
) -> Interpretation:
    """One feature's summary from its top spans (peak token last)."""
    user = render(PROMPT, spans=spans)
    problem = ""
    for attempt in range(retries + 1):
        ask = user if not problem else (
            f"{user}\n\nYour previous answer was not valid ({problem}). "
            "Reply with the JSON object only."
        )
        reply = client.chat(SYSTEM, ask)
        try:
            return _parse(reply)
        except ValidationError as e:
            problem = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        except ValueError as e:  # json.JSONDecodeError included
            problem = str(e)[:200]
        log.info("interpretation attempt %d invalid: %s", attempt + 1, problem)
    raise LLMOutputError(f"no valid interpretation after {retries + 1} attempts: {problem}")


def interpret_features(
    spans: Mapping[int, Sequence[Span]],
    client: ChatClient,
    memory: FeatureMemory,
    retries: int = 2,
) -> dict[int, FeatureRecord]:
    """Records for every feature in `spans`: from memory when known, else interpreted once
    and stored."""
    known = memory.get_many(spans)
    fresh = []
    for feature, feature_spans in spans.items():
        if feature in known:
            continue
        result = interpret_feature(feature_spans, client, retries)
        fresh.append(FeatureRecord(
            feature=feature, summary=result.summary, confidence=result.confidence,
            interpretable=result.interpretable, spans=[s.text for s in feature_spans],
            prompt_version=PROMPT,
        ))
        memory.put_many(fresh[-1:])  # store as we go: a crash loses at most one feature
    return {**known, **{r.feature: r for r in fresh}}
