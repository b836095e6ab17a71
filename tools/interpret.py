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
from typing import Protocol, TypeVar

from pydantic import BaseModel, Field, ValidationError

from memory.feature_memory import FeatureMemory, FeatureRecord
from prompts import render
from tools.coverage import Span
from tools.errors import FacsynthError
from tools.generate import json_replies

log = logging.getLogger(__name__)

PROMPT = "interpret_feature.v2"
SYSTEM = "You are a careful interpretability researcher. You answer in JSON only."
SCORE_PROMPT = "score_interpretation.v2"
SYSTEM_SCORE = "You are a careful interpretability researcher. You answer yes or no."
LOW_SCORE = 0.6
"""Interpretations whose detection accuracy is below this are flagged (`scores`)."""


class ChatClient(Protocol):
    def chat(self, system: str, user: str) -> str: ...


class LLMOutputError(FacsynthError):
    """The LLM did not produce valid structured output after the allowed retries."""


class Interpretation(BaseModel):
    summary: str = Field(min_length=1)
    interpretable: bool = True
    confidence: float = Field(ge=0, le=1)


M = TypeVar("M", bound=BaseModel)


def parse_json(reply: str, schema: type[M]) -> M:
    """The reply's outermost JSON object, validated against `schema`."""
    text = reply.strip()
    # Chat models like to wrap JSON in a fenced block; take the outermost object.
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end < start:
        raise ValueError("no JSON object in the reply")
    return schema.model_validate(json.loads(text[start : end + 1]))


def ask_json(client: ChatClient, system: str, user: str, schema: type[M], retries: int = 2) -> M:
    """Ask until the reply is a valid `schema` object; invalid replies are sent back with
    the validation problem, up to `retries` times. A client with `with_json_schema(schema,
    name)` (agent.llm: vLLM's structured outputs) is asked for schema-constrained replies."""
    client = json_replies(client, schema.model_json_schema(), schema.__name__)
    problem = ""
    for attempt in range(retries + 1):
        ask = user if not problem else (
            f"{user}\n\nYour previous answer was not valid ({problem}). "
            "Reply with the JSON object only."
        )
        reply = client.chat(system, ask)
        try:
            return parse_json(reply, schema)
        except ValidationError as e:
            problem = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        except ValueError as e:  # json.JSONDecodeError included
            problem = str(e)[:200]
        log.info("%s attempt %d invalid: %s", schema.__name__, attempt + 1, problem)
    raise LLMOutputError(
        f"no valid {schema.__name__} from the LLM after {retries + 1} attempts: {problem}"
    )


def interpret_feature(
    spans: Sequence[Span], client: ChatClient, retries: int = 2
) -> Interpretation:
    """One feature's summary from its top spans (peak token last)."""
    result = ask_json(client, SYSTEM, render(PROMPT, spans=spans), Interpretation, retries)
    if result.summary.strip().lower().rstrip(".") == "cannot tell":
        result.interpretable = False
    return result


def score_interpretation(
    summary: str, activating: Sequence[str], other: Sequence[str], client: ChatClient
) -> float:
    """Detection accuracy: how often the LLM, given only the summary, tells held-out spans
    where the feature fires from spans where it does not (0.5 = chance)."""
    cases = [(t, True) for t in activating] + [(t, False) for t in other]
    if not cases:
        raise ValueError("no spans to score the interpretation on")
    right = 0
    for text, fires in cases:
        reply = client.chat(SYSTEM_SCORE, render(SCORE_PROMPT, summary=summary, text=text))
        said_yes = reply.strip().lower().lstrip("\"'*").startswith("yes")
        right += said_yes == fires
    return right / len(cases)


def interpret_features(
    spans: Mapping[int, Sequence[Span]],
    client: ChatClient,
    memory: FeatureMemory,
    retries: int = 2,
    skip_failures: bool = False,
) -> dict[int, FeatureRecord]:
    """Records for every feature in `spans`: from memory when known, else interpreted once
    and stored. With `skip_failures`, a feature the LLM cannot answer validly for is left
    out (and not stored, so a later run tries again) instead of raising."""
    known = memory.get_many(spans)
    fresh = []
    for feature, feature_spans in spans.items():
        if feature in known:
            continue
        try:
            result = interpret_feature(feature_spans, client, retries)
        except LLMOutputError as e:
            if not skip_failures:
                raise
            log.warning("feature %d not interpreted: %s", feature, e)
            continue
        fresh.append(FeatureRecord(
            feature=feature, summary=result.summary, confidence=result.confidence,
            interpretable=result.interpretable, spans=[s.text for s in feature_spans],
            prompt_version=PROMPT,
        ))
        memory.put_many(fresh[-1:])  # store as we go: a crash loses at most one feature
    return {**known, **{r.feature: r for r in fresh}}
