"""The synthesis steps' bookkeeping: what reaches the generator."""

from __future__ import annotations

import pytest

from memory.feature_memory import FeatureRecord, InMemoryFeatureMemory
from tests.fakes import MemoryOnlyWorkspace, ScriptedChat, bag_of_words
from tools.coverage import ActivityRule, CoverageReport, MissingFeature, Span
from tools.generate import GenerateSettings, Target, plan_requests
from tools.synthesis import (
    Feature,
    Interpreted,
    allocate,
    assign_hosts,
    interpret_missing,
    round_targets,
    split_labels,
)


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


def test_describe_by_spans_asks_the_llm_nothing_but_uses_memory() -> None:
    memory = InMemoryFeatureMemory(bag_of_words)
    two = report("steal a car", "shoplift shoes")
    two.missing.append(two.missing[0].model_copy(update={"feature": 9}))
    memory.put_many([FeatureRecord(feature=9, summary="theft", confidence=0.9, spans=["x"])])
    found = interpret_missing(two, ScriptedChat(), MemoryOnlyWorkspace(memory), limit=2,
                              describe="spans")  # ScriptedChat() fails on any call
    by = {t.feature: t.summary for t in found.targets}
    assert by == {7: 'text like "steal a car"', 9: "theft"}


@pytest.mark.parametrize(("weights", "total", "cap", "want"), [
    ([10, 5, 1], 16, 8, [8, 7, 1]),     # proportional, the capped share goes to the others
    ([1, 1, 1, 1], 6, 8, [2, 2, 1, 1]),  # even weights: even spread, earlier features first
    ([100, 1, 1], 6, 8, [4, 1, 1]),      # at least one each however small the deficit
    ([5, 4, 3], 2, 8, [1, 1, 0]),        # fewer requests than features: largest first
    ([3, 2], 40, 8, [8, 8]),             # every feature capped: the rest is not spent
    ([2, 1], 0, 8, [0, 0]),
])
def test_allocation_is_proportional_capped_and_spread(
        weights: list[float], total: int, cap: int, want: list[int]) -> None:
    assert allocate(weights, total, cap) == want


def test_label_split_hits_the_ratio_over_the_round() -> None:
    assert split_labels([3, 3, 3, 3], 0.5) == [(2, 1), (1, 2), (2, 1), (1, 2)]
    assert split_labels([1, 1, 1, 1], 0.5) == [(1, 0), (0, 1), (1, 0), (0, 1)]
    assert split_labels([4, 2], 0.0) == [(4, 0), (2, 0)]
    assert split_labels([4, 2], 1.0) == [(0, 4), (0, 2)]
    split = split_labels([7, 5, 3, 1, 2], 0.3)
    assert sum(n for _, n in split) == int(0.3 * 18) and all(p + n for p, n in split)


def interpreted(*features: int, skip: int | None = None) -> Interpreted:
    return Interpreted(relevance="label", features=[
        Feature(record=FeatureRecord(feature=f, summary=f"theme {f}"), spans=[f"span {f}"],
                targeted=f != skip) for f in features])


def test_round_targets_follow_deficits_and_split_labels() -> None:
    found = interpreted(3, 4, 5, 6, skip=6)
    targets = round_targets(found, {3: 30, 4: 10, 5: 5, 6: 100}, 12, cap=8, negatives=0.5)
    per = {(t.feature, t.label): t.n for t in targets}
    # 8/3/1 by deficit (8 capped); half of the round as label 0, on the running total
    assert per == {(3, 1): 4, (3, 0): 4, (4, 1): 2, (4, 0): 1, (5, 0): 1}
    assert sum(t.n or 0 for t in targets) == 12 and 6 not in {t.feature for t in targets}
    assert all(t.summary == f"theme {t.feature}" and t.spans for t in targets)
    # no deficits known (binary coverage): an even spread, as before
    even = round_targets(found, {}, 9, cap=8, negatives=0.0)
    assert [(t.feature, t.label, t.n) for t in even] == [(3, 1, 3), (4, 1, 3), (5, 1, 3)]
    # a feature without a deficit (e.g. from the detector's errors) counts as the mean
    mixed = round_targets(found, {3: 9, 4: 1}, 15, cap=8, negatives=0.0)
    assert [t.n for t in mixed] == [8, 1, 6]  # weights 9, 1, mean 5


def test_hosts_are_real_rows_of_the_wanted_label_and_stable() -> None:
    texts = [f"toxic row {i}" for i in range(6)] + [f"benign row {i}" for i in range(6)]
    texts += ["toxic " + "x" * 700, "   "]
    labels = [1] * 6 + [0] * 6 + [1, 0]
    targets = [Target(feature=3, summary="s", n=4), Target(feature=3, summary="s", label=0, n=4),
               Target(feature=5, summary="s", n=4)]
    reqs = plan_requests(targets, GenerateSettings(seed=11))
    hosts = assign_hosts(reqs, texts, labels, seed=11, max_chars=600)
    assert set(hosts) == {q.seed for q in reqs}
    for q in reqs:
        row = hosts[q.seed]
        assert labels[texts.index(row)] == q.target.label and len(row) <= 600 and row.strip()
    by_feature = [[hosts[q.seed] for q in reqs if (q.target.feature, q.target.label) == key]
                  for key in ((3, 1), (3, 0), (5, 1))]
    assert all(len(set(h)) == 4 for h in by_feature), "different hosts across requests"
    assert by_feature[0] != by_feature[2], "each feature walks its own order"
    assert assign_hosts(reqs, texts, labels, seed=11, max_chars=600) == hosts, "deterministic"
    assert assign_hosts(reqs, texts, labels, seed=12, max_chars=600) != hosts
    # more requests than rows: hosts repeat rather than run out
    many = plan_requests([Target(feature=3, summary="s", n=9)], GenerateSettings())
    assert len(assign_hosts(many, texts, labels, seed=0)) == 9
    # no row of a label: those requests are written from scratch
    only_pos = assign_hosts(reqs, texts[:6], labels[:6], seed=11)
    assert {q.target.label for q in reqs if q.seed in only_pos} == {1}
    assert assign_hosts(reqs, texts, None, seed=11) == {}
