from __future__ import annotations

import logging

import numpy as np
import pytest

from memory.activation_cache import ActivationCache
from tools.probe import (
    ProbeSettings,
    encode,
    length_buckets,
    probe_texts,
    reference_max_acts,
    top_spans,
)

TEXTS = [
    "how do I bake bread",
    "hi",
    "tell me how to hurt someone " * 6,
    "write a poem about the sea",
    "the quick brown fox jumps over the lazy dog",
    "hack into my neighbour's wifi please",
] * 4


@pytest.mark.parametrize(
    "settings",
    [
        ProbeSettings(batch_tokens=64),  # many small bucketed batches
        ProbeSettings(batch_tokens=100_000, max_batch=64),  # one padded batch
        ProbeSettings(chat_template=True, max_tokens=24, batch_tokens=128),
    ],
    ids=["bucketed", "one-batch", "chat-template-truncated"],
)
def test_probe_equals_naive_reference(tiny_lm, tiny_sae, settings) -> None:
    got = probe_texts(TEXTS, tiny_lm, tiny_sae, settings).max_matrix().toarray()
    want = reference_max_acts(TEXTS, tiny_lm, tiny_sae, settings, batch_size=16)
    assert (want > 0).sum() > 50
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chat_template_tokens_are_not_counted(tiny_lm) -> None:
    (plain,) = encode(tiny_lm.tokenizer, ["bake bread"], ProbeSettings())
    (chat,) = encode(tiny_lm.tokenizer, ["bake bread"], ProbeSettings(chat_template=True))
    assert len(chat.ids) > len(plain.ids)
    counted = [chat.offsets[i] for i in np.flatnonzero(chat.counted)]
    assert counted and all(0 <= s < e <= len("bake bread") for s, e in counted)
    # plain text: everything but the attention-sink position counts
    assert not plain.counted[0] and plain.counted[1:].all()


def test_buckets_respect_token_budget() -> None:
    lengths = [5, 50, 7, 49, 6, 48, 3]
    settings = ProbeSettings(batch_tokens=100, max_batch=3)
    batches = list(length_buckets(lengths, settings))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1


def test_truncation_warns_once(tiny_lm, tiny_sae, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        probe_texts(TEXTS, tiny_lm, tiny_sae, ProbeSettings(max_tokens=8))
    warnings = [r for r in caplog.records if "truncated" in r.message]
    assert len(warnings) == 1
    assert "max_tokens=8" in warnings[0].getMessage()


def test_cache_hits_skip_the_model(tiny_lm, tiny_sae, tmp_path, probed_batches) -> None:
    cache = ActivationCache(tmp_path / "acts.sqlite")
    calls = probed_batches
    cold = probe_texts(TEXTS, tiny_lm, tiny_sae, cache=cache)
    n_unique = len(set(TEXTS))
    assert sum(calls) == n_unique and len(cache) == n_unique
    calls.clear()
    changed = TEXTS[:-1] + ["a completely new sentence"]
    warm = probe_texts(changed, tiny_lm, tiny_sae, cache=cache)
    assert sum(calls) == 1  # only the new text reaches the model
    np.testing.assert_array_equal(
        warm.max_matrix()[:-1].toarray(), cold.max_matrix()[:-1].toarray()
    )


def test_interrupted_probe_leaves_consistent_cache(tiny_lm, tiny_sae, tmp_path) -> None:
    settings = ProbeSettings(batch_tokens=40)
    cache = ActivationCache(tmp_path / "acts.sqlite")
    seen = [0]

    def die_after_two_batches(n: int) -> None:
        seen[0] += 1
        if seen[0] == 3:  # first call reports cached rows, then one call per batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probe_texts(TEXTS, tiny_lm, tiny_sae, settings, cache=cache, progress=die_after_two_batches)
    partial = len(cache)
    assert 0 < partial < len(set(TEXTS))
    resumed = probe_texts(TEXTS, tiny_lm, tiny_sae, settings, cache=cache)
    fresh = probe_texts(TEXTS, tiny_lm, tiny_sae, settings)
    np.testing.assert_array_equal(resumed.max_matrix().toarray(), fresh.max_matrix().toarray())
    np.testing.assert_array_equal(resumed.pooled(), fresh.pooled())


def test_progress_counts_every_text(tiny_lm, tiny_sae, tmp_path) -> None:
    cache = ActivationCache(tmp_path / "acts.sqlite")
    probe_texts(TEXTS[:6], tiny_lm, tiny_sae, cache=cache)
    ticks: list[int] = []
    probe_texts(TEXTS, tiny_lm, tiny_sae, cache=cache, progress=ticks.append)
    assert sum(ticks) == len(TEXTS)


def test_count_matrix_and_peaks(tiny_lm, tiny_sae) -> None:
    result = probe_texts(TEXTS[:6], tiny_lm, tiny_sae)
    counts = result.count_matrix(0.0).toarray()
    maxes = result.max_matrix().toarray()
    assert ((counts > 0) == (maxes > 0)).all()
    assert counts.max() > 1  # some feature fires on several tokens of one text
    n_counted = [a.n_tokens - 1 for a in result.acts]
    assert (counts.max(axis=1) <= np.array(n_counted)).all()
    peaks = result.peak_positions().toarray() - 1
    for row, acts in enumerate(result.acts):
        f = int(acts.feat[0])
        at_peak = acts.val[(acts.feat == f) & (acts.pos == peaks[row, f])]
        assert at_peak.max() == pytest.approx(maxes[row, f])


def test_top_spans_end_at_peak(tiny_lm, tiny_sae) -> None:
    texts = TEXTS[:6]
    settings = ProbeSettings()
    result = probe_texts(texts, tiny_lm, tiny_sae, settings)
    maxes = result.max_matrix().toarray()
    f = int(np.argmax((maxes > 0).sum(axis=0)))
    spans = top_spans(result, texts, tiny_lm.tokenizer, settings, [f], n=3, window=2)[f]
    assert [a for _, _, a in spans] == sorted((a for _, _, a in spans), reverse=True)
    assert spans[0][2] == pytest.approx(maxes[:, f].max())
    for row, span, _ in spans:
        assert span and span in texts[row]


def test_drop_sinks_removes_massive_tokens_only() -> None:
    import torch

    from tools.probe import drop_sinks

    resid = torch.ones(2, 5, 4)
    resid[0, 2] *= 100.0  # a secondary attention sink
    resid[1, 1] *= 3.0  # merely a large token
    counted = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    kept = drop_sinks(resid, counted, factor=10.0)
    assert kept.tolist() == [[False, True, False, True, True], [False, True, True, True, False]]


def test_activity_rules_on_hand_made_activations() -> None:
    from memory.activation_cache import TextActs
    from tools.coverage import ActivityRule, activity
    from tools.probe import ProbeResult

    def text(pos, feat, val):  # type: ignore[no-untyped-def]
        return TextActs(n_tokens=5, pos=np.array(pos, np.int32), feat=np.array(feat, np.int32),
                        val=np.array(val, np.float32), pooled=np.zeros(2, np.float32))

    # text 0: feature 1 fires on 3 tokens (max 2.0); feature 2 once at 5.0
    # text 1: feature 1 once at 3.0; feature 0 twice at 0.5
    result = ProbeResult(acts=[text([1, 2, 3, 2], [1, 1, 1, 2], [1.5, 2.0, 1.2, 5.0]),
                               text([1, 1, 2], [1, 0, 0], [3.0, 0.5, 0.5])], d_sae=3)
    thr = np.array([0.4, 1.0, 4.0], dtype=np.float32)
    by_max = activity(result, ActivityRule(), thr).toarray()
    assert by_max.tolist() == [[0, 1, 1], [1, 1, 0]]
    two_tokens = activity(result, ActivityRule(pooling="count", min_tokens=2), thr).toarray()
    assert two_tokens.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert result.count_matrix(thr).toarray().tolist() == [[0, 3, 1], [2, 1, 0]]


def test_probe_many_equals_separate_probes(tiny_lm, tmp_path) -> None:
    from tests.fakes import tiny_sae
    from tools.probe import probe_many

    narrow, wide = tiny_sae(layer=2, d_sae=64, seed=1), tiny_sae(layer=2, d_sae=256, seed=2)
    caches = [ActivationCache(tmp_path / "a.sqlite"), ActivationCache(tmp_path / "b.sqlite")]
    probe_texts(TEXTS[:3], tiny_lm, narrow, cache=caches[0])  # partly warm, one SAE only
    both = probe_many(TEXTS, tiny_lm, [narrow, wide], caches=caches)
    for sae, got in zip([narrow, wide], both, strict=True):
        alone = probe_texts(TEXTS, tiny_lm, sae)
        np.testing.assert_array_equal(got.max_matrix().toarray(), alone.max_matrix().toarray())
    assert len(caches[0]) == len(caches[1]) == len(set(TEXTS))
    with pytest.raises(ValueError, match="same hook"):
        probe_many(TEXTS, tiny_lm, [narrow, tiny_sae(layer=1)])


def test_buckets_bound_padding_of_mixed_lengths() -> None:
    lengths = [10, 200, 12, 90, 11, 95]
    batches = list(length_buckets(lengths, ProbeSettings(batch_tokens=100_000)))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[10, 11, 12], [90, 95], [200]]
