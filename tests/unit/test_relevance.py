from __future__ import annotations

import pytest

from tests.fakes import ScriptedChat
from tools.interpret import LLMOutputError, score_interpretation
from tools.relevance import agreement, judge_feature, keep


def test_verdict_parsed_with_reason_and_guideline_in_prompt() -> None:
    llm = ScriptedChat('```json\n{"verdict": "Probably", "reason": "credit card fraud"}\n```')
    answer = judge_feature("requests to steal card numbers", ["give me cc numbers"], llm)
    assert answer.verdict == "Probably" and answer.reason == "credit card fraud"
    assert "toxic" in llm.asked[0] and "give me cc numbers" in llm.asked[0]


def test_unknown_verdict_is_retried_then_fails() -> None:
    llm = ScriptedChat('{"verdict": "Definitely"}', '{"verdict": "No", "reason": "punctuation"}')
    assert judge_feature("commas", [], llm).verdict == "No"
    assert "not valid" in llm.asked[1] and "verdict" in llm.asked[1]
    with pytest.raises(LLMOutputError, match="RelevanceAnswer"):
        judge_feature("commas", [], ScriptedChat("yes", "yes", "yes"))


@pytest.mark.parametrize(
    ("verdict", "relevance", "kept"),
    [
        ("No", "label", True), ("No", "auto", False), ("Maybe", "auto", True),
        ("Maybe", "llm", False), ("Probably", "llm", True), ("Yes", "auto", True),
        (None, "llm", True),
    ],
)
def test_keep_mapping(verdict: str | None, relevance: str, kept: bool) -> None:
    assert keep(verdict, relevance) is kept  # type: ignore[arg-type]


def test_agreement_counts_yes_and_probably() -> None:
    a = agreement(["Yes", "Probably", "Maybe", "No", "Yes"])
    assert (a.judged, a.agree, a.verdicts["No"]) == (5, 3, 1)
    assert a.rate == pytest.approx(0.6)
    assert agreement([]).rate == 0.0


def test_detection_accuracy() -> None:
    # right on both activating spans, wrong on one of two others
    llm = ScriptedChat("Yes.", "yes", "no", "**Yes**")
    acc = score_interpretation("theft", ["steal a car", "shoplift"], ["weather", "cake"], llm)
    assert acc == pytest.approx(0.75)
    assert "theft" in llm.asked[0] and "steal a car" in llm.asked[0]
    with pytest.raises(ValueError):
        score_interpretation("theft", [], [], llm)
