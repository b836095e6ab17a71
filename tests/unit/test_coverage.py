from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from tools.coverage import (
    ActivityRule,
    GradedRule,
    JudgeSettings,
    active_features,
    attach_spans,
    coverage,
    feature_stats,
    feature_thresholds,
    label_judge,
)
from tools.errors import DataError

# 6 anchor rows (3 toxic, 3 benign) x 5 features, hand-made max activations.
ANCHOR = sp.csr_matrix(
    np.array(
        [
            # f0   f1   f2   f3   f4
            [2.0, 0.0, 3.0, 0.0, 0.5],  # toxic
            [2.5, 0.0, 0.0, 0.0, 0.0],  # toxic
            [1.5, 0.0, 2.0, 0.0, 0.0],  # toxic
            [0.0, 2.0, 0.0, 0.0, 0.0],  # benign
            [0.0, 3.0, 0.0, 4.0, 0.0],  # benign
            [1.2, 0.0, 0.0, 0.0, 0.0],  # benign
        ],
        dtype=np.float32,
    )
)
LABELS = [1, 1, 1, 0, 0, 0]
JUDGE = JudgeSettings(min_support=2, min_log_odds=1.0, smoothing=0.5)
RULE = ActivityRule(delta=1.0)


def act(m: sp.csr_matrix, delta: float = 1.0) -> sp.csr_matrix:
    return sp.csr_matrix((m.toarray() > delta).astype(np.float32))


def cov(data: sp.csr_matrix, labels=LABELS, graded=None):  # type: ignore[no-untyped-def]
    return coverage(act(ANCHOR), labels, act(data), anchor_max=ANCHOR, rule=RULE, judge=JUDGE,
                    graded=graded)


def test_active_features_uses_strict_threshold() -> None:
    assert active_features(act(ANCHOR, 0.0)).tolist() == [True, True, True, True, True]
    assert active_features(act(ANCHOR, 1.0)).tolist() == [True, True, True, True, False]
    assert active_features(act(ANCHOR, 3.0)).tolist() == [False, False, False, True, False]


def test_feature_stats_log_odds_by_hand() -> None:
    pos, neg, lo = feature_stats(act(ANCHOR), LABELS, smoothing=0.5)
    assert pos.tolist() == [3, 0, 2, 0, 0] and neg.tolist() == [1, 2, 0, 1, 0]
    rate = lambda k, n: (k + 0.5) / (n + 1.0)  # noqa: E731
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert lo[0] == pytest.approx(logit(rate(3, 3)) - logit(rate(1, 3)))
    assert lo[2] == pytest.approx(logit(rate(2, 3)) - logit(rate(0, 3)))


def test_label_judge_needs_support_and_log_odds() -> None:
    mask = label_judge(JUDGE)(act(ANCHOR), LABELS)
    # f0: support 3, log-odds 2.5 -> yes; f2: support 2, log-odds ~2.5 -> yes;
    # f1/f3: benign-only; f4: below delta.
    assert mask.tolist() == [True, False, True, False, False]
    stricter = label_judge(JUDGE.model_copy(update={"min_support": 3}))(act(ANCHOR), LABELS)
    assert stricter.tolist() == [True, False, False, False, False]


def test_fac_and_missing_features() -> None:
    data = sp.csr_matrix(np.array([[1.8, 0, 0, 0, 0], [0, 2.0, 0.9, 0, 0]], dtype=np.float32))
    report, task = cov(data)
    assert task.tolist() == [True, False, True, False, False]
    assert report.n_task == 2 and report.n_covered == 1 and report.fac == pytest.approx(0.5)
    assert report.anchor_fac == 1.0 and report.n_task_in_anchor == 2
    assert [m.feature for m in report.missing] == [2]  # 0.9 is not > delta
    assert report.missing[0].pos_support == 2 and report.missing[0].anchor_max == 3.0
    assert not report.saturated


def test_full_coverage_is_flagged_saturated() -> None:
    report, _ = cov(ANCHOR)
    assert report.fac == 1.0 and report.saturated and report.missing == []


def test_missing_sorted_by_log_odds_and_spans_attached() -> None:
    empty = sp.csr_matrix((1, 5), dtype=np.float32)
    report, _ = cov(empty)
    assert report.fac == 0.0
    odds = [m.log_odds for m in report.missing]
    assert odds == sorted(odds, reverse=True)
    attach_spans(report, {2: [(0, "hurt", 3.0)]})
    by_id = {m.feature: m for m in report.missing}
    assert by_id[2].spans[0].text == "hurt" and by_id[0].spans == []


@pytest.mark.parametrize(
    ("labels", "message"),
    [(None, "labelled anchor"), ([1] * 6, "both positive"), ([0] * 6, "both positive")],
)
def test_label_judge_rejects_unusable_labels(labels, message) -> None:
    with pytest.raises(DataError, match=message):
        cov(ANCHOR, labels)


def test_quantile_thresholds_are_per_feature() -> None:
    thr = feature_thresholds(ActivityRule(threshold="quantile", quantile=0.5), ANCHOR)
    # f0 non-zero values 2.0, 2.5, 1.5, 1.2 -> median 1.75; f4 has one value; none -> inf
    assert thr[0] == pytest.approx(1.75) and thr[4] == pytest.approx(0.5)
    empty = sp.csr_matrix(np.array([[0.0, 1.0]], dtype=np.float32))
    assert feature_thresholds(ActivityRule(threshold="quantile"), empty)[0] == np.inf
    q0 = feature_thresholds(ActivityRule(threshold="quantile", quantile=0.0), ANCHOR)
    assert (q0[:5] == 0).all()  # q=0: every non-zero activation counts
    absolute = feature_thresholds(ActivityRule(delta=2.0), ANCHOR)
    assert absolute.tolist() == [2.0] * 5


def test_anchor_quantile_is_one_scale_free_delta() -> None:
    thr = feature_thresholds(ActivityRule(threshold="anchor-quantile", quantile=0.5), ANCHOR)
    nz = ANCHOR.data[ANCHOR.data > 0]
    assert np.all(thr == pytest.approx(float(np.quantile(nz, 0.5))))
    doubled = feature_thresholds(ActivityRule(threshold="anchor-quantile", quantile=0.5),
                                 ANCHOR * 2)
    assert np.allclose(doubled, 2 * thr)  # same rule, any activation scale


# -- graded coverage ------------------------------------------------------------------------
# Under delta 1 the anchor activates f0 in 4 rows and f2 in 2 (the two task features).


def rows(*active: list[int], d: int = 5) -> sp.csr_matrix:
    """A data set of len(active) rows, row i activating (value 2.0) the features active[i]."""
    m = np.zeros((len(active), d), dtype=np.float32)
    for i, feats in enumerate(active):
        m[i, feats] = 2.0
    return sp.csr_matrix(m)


def test_needed_rows_by_hand() -> None:
    rule = GradedRule()  # min_rows 3, rate_frac 0.5
    # anchor rates 0.5, 0.1, 0.02 of 100 rows, data of 40 rows: 0.5 * rate * 40 = 10, 2, 0.4
    assert rule.needed(np.array([50, 10, 2]), 100, 40).tolist() == [10, 3, 2]  # 2: capped
    # 0.1 * 6 * 50 / 10 is 3.0000000000000004 in floats: still 3 rows, not 4
    assert GradedRule(min_rows=1, rate_frac=0.1).needed(np.array([6]), 10, 50).tolist() == [3]
    assert rule.needed(np.array([0]), 10, 10).tolist() == [1]  # never a zero divisor


def test_one_row_where_three_are_needed_is_a_deficit_of_two() -> None:
    report, _ = cov(rows([0]))
    assert report.fac == pytest.approx(0.5) and [m.feature for m in report.missing] == [2]
    by_id = {m.feature: m for m in report.deficits}
    assert (by_id[0].data_rows, by_id[0].needed, by_id[0].deficit) == (1, 3, 2)
    # f2 is missing: the anchor has only 2 rows of it, so it needs 2, not min_rows 3
    assert (by_id[2].data_rows, by_id[2].needed, by_id[2].deficit) == (0, 2, 2)
    assert (report.missing[0].needed, report.missing[0].deficit) == (2, 2)
    assert report.fac_graded == pytest.approx((1 / 3 + 0 / 2) / 2)


def test_anchor_against_itself_is_fully_graded() -> None:
    for graded in (GradedRule(), GradedRule(min_rows=10, rate_frac=1.0)):
        report, _ = cov(ANCHOR, graded=graded)
        assert report.fac_graded == 1.0 and report.deficits == []
        assert report.graded == graded


def test_enough_rows_clear_the_deficit_and_extra_rows_do_not_count() -> None:
    report, _ = cov(rows([0, 2], [0, 2], [0], [0, 2], [0], [0]))
    assert report.fac_graded == 1.0 and report.deficits == []
    assert report.fac == 1.0


def test_deficits_sorted_by_deficit_then_log_odds() -> None:
    # 8 rows, 4 toxic: fA on all toxic rows, fB also on one benign row (lower log-odds),
    # fC on two toxic rows only; all three are task features.
    anchor = rows([0, 1, 2], [0, 1, 2], [0, 1], [0, 1], [1], [], [], [], d=3)
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    data = rows([1], [2], [], d=3)

    def run(graded: GradedRule) -> tuple[list[int], list[int]]:
        report, task = coverage(act(anchor), labels, act(data), anchor_max=anchor, rule=RULE,
                                judge=JUDGE, graded=graded)
        assert task.tolist() == [True, True, True] and report.missing[0].feature == 0
        assert report.missing[0].deficit == report.missing[0].needed
        return [m.feature for m in report.deficits], [m.deficit for m in report.deficits]

    # needed: fA min(4, 3) = 3, fB min(5, 3) = 3, fC min(2, 3) = 2; data has 0, 1, 1
    assert run(GradedRule()) == ([0, 1, 2], [3, 2, 1])
    # min_rows 2: fA needs 2 (deficit 2), fB and fC 2 (deficit 1 each): fB has higher log-odds
    assert run(GradedRule(min_rows=2)) == ([0, 1, 2], [2, 1, 1])
    # min_rows 1: fA alone is short; fB and fC are not deficits
    assert run(GradedRule(min_rows=1)) == ([0], [1])


def test_binary_fac_and_missing_do_not_depend_on_the_graded_rule() -> None:
    data = rows([0], [1])
    base, _ = cov(data)
    for graded in (GradedRule(min_rows=1), GradedRule(min_rows=50, rate_frac=1.0)):
        other, _ = cov(data, graded=graded)
        assert (other.fac, other.n_covered, other.anchor_fac, other.saturated) == (
            base.fac, base.n_covered, base.anchor_fac, base.saturated)
        assert [m.feature for m in other.missing] == [m.feature for m in base.missing]
    strict, _ = cov(data, graded=GradedRule(min_rows=50, rate_frac=1.0))
    assert strict.fac == 0.5 and strict.fac_graded < base.fac_graded < strict.fac


def test_spans_reach_the_deficits_too() -> None:
    report, _ = cov(rows([0]))
    attach_spans(report, {0: [(1, "punch", 2.5)], 2: [(0, "hurt", 3.0)]})
    assert {m.feature: m.spans[0].text for m in report.deficits} == {0: "punch", 2: "hurt"}
    assert report.missing[0].spans[0].text == "hurt"


def test_graded_rule_is_validated() -> None:
    with pytest.raises(ValueError):
        GradedRule(rate_frac=0.0)
    with pytest.raises(ValueError):
        GradedRule(rate_frac=1.5)
    with pytest.raises(ValueError):
        GradedRule(min_rows=0)
    with pytest.raises(ValueError):
        GradedRule(unknown=1)  # type: ignore[call-arg]


def test_paired_judge_compares_the_sides_of_each_pair() -> None:
    from tools.coverage import JudgeSettings, feature_stats, label_judge

    # feature 0 fires on both sides of every pair (shared prompt): no contrast; feature 1
    # fires on the 1 side of 6 pairs and the 0 side of none; feature 2 fires on the 0 side
    sides = []
    for i in range(8):
        sides += [[0, 1] if i < 6 else [0], [0, 2]]
    anchor = rows(*sides, d=3)
    labels = [1, 0] * 8
    only_one, only_zero, lo = feature_stats(anchor, labels, 0.5, paired=True)
    assert only_one.tolist() == [0, 6, 0] and only_zero.tolist() == [0, 0, 8]
    assert lo[1] > 2 > 0 == lo[0] and lo[2] < 0
    judge = JudgeSettings(min_support=2).for_pairs()
    assert judge.paired and judge.min_log_odds == judge.paired_min_log_odds
    assert label_judge(judge)(anchor, labels).tolist() == [False, True, False]
