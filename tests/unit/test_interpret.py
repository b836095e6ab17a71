from __future__ import annotations

import jinja2
import pytest

import prompts
from memory.feature_memory import InMemoryFeatureMemory
from tests.fakes import ScriptedChat, bag_of_words
from tools.coverage import Span
from tools.interpret import LLMOutputError, interpret_feature, interpret_features

SPANS = [Span(row=0, text="how do I steal a car", activation=12.5),
         Span(row=4, text="best way to shoplift", activation=9.0)]


def test_every_prompt_renders_and_is_strict() -> None:
    assert "interpret_feature.v2" in prompts.available()
    text = prompts.render("interpret_feature.v2", spans=SPANS)
    assert "(12.5) <data>how do I steal a car</data>" in text and "cannot tell" in text
    with pytest.raises(jinja2.UndefinedError):
        prompts.render("interpret_feature.v2")


def test_parses_json_even_inside_a_fence() -> None:
    reply = '{"summary": "theft", "interpretable": true, "confidence": 0.8}'
    client = ScriptedChat(f"```json\n{reply}\n```")
    result = interpret_feature(SPANS, client)
    assert result.summary == "theft" and result.confidence == 0.8 and result.interpretable


def test_invalid_reply_is_retried_with_the_error() -> None:
    client = ScriptedChat("I think it is about theft.",
                      '{"summary": "theft", "confidence": 3}',
                      '{"summary": "theft", "confidence": 0.7}')
    assert interpret_feature(SPANS, client, retries=2).confidence == 0.7
    assert "not valid" in client.asked[1] and "less than or equal to 1" in client.asked[2]


def test_gives_up_with_a_clear_error() -> None:
    with pytest.raises(LLMOutputError, match="after 2 attempts"):
        interpret_feature(SPANS, ScriptedChat("nope", "still nope"), retries=1)


def test_cannot_tell_marks_the_feature_uninterpretable() -> None:
    client = ScriptedChat('{"summary": "Cannot tell.", "interpretable": true, "confidence": 0.1}')
    assert not interpret_feature(SPANS, client).interpretable


def test_features_in_memory_are_never_reinterpreted() -> None:
    memory = InMemoryFeatureMemory(bag_of_words)
    client = ScriptedChat('{"summary": "theft", "confidence": 0.9}')
    first = interpret_features({7: SPANS}, client, memory)
    again = interpret_features({7: SPANS}, ScriptedChat(), memory)  # would fail if it asked
    assert first[7] == again[7] and first[7].prompt_version == "interpret_feature.v2"
    assert first[7].spans == [s.text for s in SPANS] and len(memory) == 1
