"""The synthesis steps' bookkeeping: what reaches the generator."""

from __future__ import annotations

from memory.feature_memory import FeatureRecord, InMemoryFeatureMemory
from tests.fakes import MemoryOnlyWorkspace, ScriptedChat, bag_of_words
from tools.coverage import ActivityRule, CoverageReport, MissingFeature, Span
from tools.synthesis import interpret_missing


def report(*spans: str) -> CoverageReport:
    missing = [MissingFeature(feature=7, pos_support=3, neg_support=0, log_odds=2.0,
                              anchor_max=5.0,
                              spans=[Span(row=i, text=t, activation=5.0 - i)
                                     for i, t in enumerate(spans)])]
    return CoverageReport(rule=ActivityRule(), judge="label", n_anchor=10, n_data=5,
                          n_active_anchor=20, n_task=4, n_task_in_anchor=4, n_covered=3,
                          fac=0.75, anchor_fac=1.0, missing=missing, saturated=False)


def test_generation_sees_this_anchors_spans_not_the_remembered_ones() -> None:
    memory = InMemoryFeatureMemory(bag_of_words)
    memory.put_many([FeatureRecord(feature=7, summary="theft", confidence=0.9,
                                   spans=["a span from another anchor"])])
    found = interpret_missing(report("steal a car", "shoplift shoes"), ScriptedChat(),
                              MemoryOnlyWorkspace(memory), limit=1)
    (target,) = found.targets
    assert target.summary == "theft", "the summary is remembered (no LLM call was scripted)"
    assert target.spans == ["steal a car", "shoplift shoes"]
