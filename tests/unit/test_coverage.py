from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from tools.coverage import (
    ActivityRule,
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


def cov(data: sp.csr_matrix, labels=LABELS):  # type: ignore[no-untyped-def]
    return coverage(act(ANCHOR), labels, act(data), anchor_max=ANCHOR, rule=RULE, judge=JUDGE)


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
