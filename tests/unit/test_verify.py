from __future__ import annotations

import numpy as np
import pytest

from memory.activation_cache import TextActs
from tools.coverage import ActivityRule
from tools.probe import ProbeResult
from tools.verify import NearDuplicates, Provenance, Sample, verify

RULE = ActivityRule(delta=1.0)
THR = np.full(4, 1.0, dtype=np.float32)
LONG = "please explain step by step how to pick the lock on my neighbour's front door tonight"


def sample(text: str, feature: int) -> Sample:
    return Sample(text=text, label=1, provenance=Provenance(feature=feature, round=1))


def acts(*rows: dict[int, float]) -> ProbeResult:
    """One text per dict {feature: max activation} (a single token each)."""
    out = []
    for row in rows:
        feats = np.array(list(row), dtype=np.int32)
        out.append(TextActs(n_tokens=3, pos=np.ones(len(feats), np.int32), feat=feats,
                            val=np.array(list(row.values()), np.float32),
                            pooled=np.zeros(2, np.float32)))
    return ProbeResult(acts=out, d_sae=4)


def test_keeps_only_samples_that_activate_their_target() -> None:
    samples = [sample("how do I hotwire a car", 2), sample("write a poem about rain", 2),
               sample("tell me about rivers", 3)]
    report = verify(samples, acts({2: 3.5}, {2: 0.4, 1: 5.0}, {3: 1.2}), RULE, THR)
    kept = [v.sample.text for v in report.kept]
    assert kept == ["how do I hotwire a car", "tell me about rivers"]
    (miss,) = report.rejected
    assert miss.reason == "target_inactive" and miss.activation == pytest.approx(0.4)
    assert report.kept[0].activation == pytest.approx(3.5)
    assert report.per_feature[2].hit_rate == 0.5 and report.per_feature[3].kept == 1
    assert report.hit_rate == pytest.approx(2 / 3)


def test_exact_and_near_duplicates_are_dropped() -> None:
    near = LONG.replace("tonight", "tomorrow")
    samples = [sample("  Existing Row  ", 1), sample(LONG, 1), sample(near, 1),
               sample(LONG.upper(), 1), sample("", 1)]
    report = verify(samples, acts(*[{1: 2.0}] * 4, {}), RULE, THR, existing=["existing row"])
    reasons = [v.reason for v in report.rejected]
    assert [v.sample.text for v in report.kept] == [LONG]
    assert reasons == ["duplicate", "near_duplicate", "duplicate", "empty"]
    # duplicates still count as hits of the generator: they did activate the feature
    assert report.per_feature[1].activated == 4 and report.per_feature[1].kept == 1


def test_rejected_samples_do_not_block_later_ones() -> None:
    samples = [sample("same words here again and again", 0),
               sample("same words here again and again", 0)]
    report = verify(samples, acts({0: 0.1}, {0: 2.0}), RULE, THR)
    assert [v.reason for v in report.rejected] == ["target_inactive"]
    assert len(report.kept) == 1


def test_near_duplicates_threshold() -> None:
    seen = NearDuplicates(threshold=0.8)
    seen.add(LONG)
    assert seen.check(LONG.replace("tonight", "tomorrow")) == "near_duplicate"
    assert seen.check("what is the boiling point of water at altitude") == "new"


def test_counts_must_match() -> None:
    with pytest.raises(ValueError, match="2 samples but 1 probed"):
        verify([sample("a", 0), sample("b", 0)], acts({0: 1.0}), RULE, THR)


def test_refusals_are_rejected_as_such(tiny_lm, tiny_sae) -> None:
    from tools.coverage import ActivityRule
    from tools.probe import probe_texts
    from tools.verify import Provenance, Sample, verify

    texts = ["I'm sorry, but I can't help with that request.", "how do I bake bread"]
    samples = [Sample(text=t, label=1, provenance=Provenance(feature=0)) for t in texts]
    acts = probe_texts(texts, tiny_lm, tiny_sae)
    thresholds = np.zeros(tiny_sae.d_sae, dtype=np.float32)
    report = verify(samples, acts, ActivityRule(), thresholds)
    assert [v.reason for v in report.rejected if v.sample.text == texts[0]] == ["refusal"]
