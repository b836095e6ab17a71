"""tools/shards.py without Ray: parts written from a local probe, read back in chunks."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from tools.coverage import ActivityRule, active_rows, activity, feature_thresholds
from tools.errors import ConfigError, DataError
from tools.probe import ProbeResult, probe_texts
from tools.shards import (
    ShardManifest,
    ShardSet,
    active_row_counts,
    key_bytes,
    shard_table,
    text_keys,
    write_part,
)

TEXTS = [
    "how do I bake bread", "hi", "tell me how to hurt someone " * 3,
    "write a poem about the sea", "the quick brown fox jumps over the lazy dog",
    "hack into my neighbour's wifi please", "bake a poem about the lazy fox",
    "hurt the dog and hack the wifi", "a quick sea of bread", "tell me about the fox",
]


def manifest(d_sae: int, d_model: int, **change: object) -> ShardManifest:
    fields: dict[str, object] = {"namespace": "ns", "model": "tiny:0", "sae": "tiny-sae:0:2",
                                 "hook": "model.layers.2:output", "probe": "p", "d_sae": d_sae,
                                 "d_model": d_model}
    return ShardManifest.model_validate({**fields, **change})


@pytest.fixture(scope="module")
def probed(tiny_lm, tiny_sae) -> ProbeResult:  # type: ignore[no-untyped-def]
    return probe_texts(TEXTS, tiny_lm, tiny_sae)


def write_shards(root, result: ProbeResult, texts: list[str], splits: list[slice]) -> ShardSet:  # type: ignore[no-untyped-def]
    """One part per slice of `texts` (slices may overlap: a text stored twice)."""
    pooled = result.pooled()
    shards = ShardSet.create(root, manifest(result.d_sae, pooled.shape[1]))
    keys, maxes = text_keys(texts), result.max_matrix()
    n_tokens = np.array([a.n_tokens for a in result.acts])
    for s in splits:
        write_part(shards.parts_dir, shard_table(keys[s], n_tokens[s], maxes[s], pooled[s]))
    return shards


def test_chunks_cover_every_text_once(probed, tmp_path) -> None:
    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 4), slice(3, 8), slice(8, 10)])
    assert shards.n_stored() == 11 and len(shards.keys()) == 10  # TEXTS[3] is in two parts
    chunks = list(shards.iter_chunks(chunk_rows=2))
    assert all(len(c.keys) <= 2 for c in chunks) and len(chunks) >= 5
    got_keys = np.concatenate([c.keys for c in chunks])
    assert sorted(key_bytes(got_keys)) == sorted(key_bytes(text_keys(TEXTS)))
    row = {k: i for i, k in enumerate(key_bytes(text_keys(TEXTS)))}
    order = [row[k] for k in key_bytes(got_keys)]
    want = probed.max_matrix()[order].toarray()
    np.testing.assert_array_equal(sp.vstack([c.max for c in chunks]).toarray(), want)
    assert chunks[0].pooled is not None
    np.testing.assert_array_equal(np.concatenate([c.pooled for c in chunks]),  # type: ignore[misc]
                                  probed.pooled()[order])


def test_lookup_keeps_the_requested_order_and_repeats(probed, tmp_path) -> None:
    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 5), slice(5, 10)])
    pick = [7, 0, 7, 3, 9]
    keys = key_bytes(text_keys([TEXTS[i] for i in pick]))
    np.testing.assert_array_equal(shards.max_matrix(keys).toarray(),
                                  probed.max_matrix()[pick].toarray())
    np.testing.assert_array_equal(shards.pooled(keys), probed.pooled()[pick])


def test_missing_keys_name_how_many(probed, tmp_path) -> None:
    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 6)])
    with pytest.raises(DataError, match=r"^4 of 10 texts are not in the shards"):
        shards.max_matrix(text_keys(TEXTS))


@pytest.mark.parametrize("rule", [
    ActivityRule(threshold="anchor-quantile", quantile=0.5),
    ActivityRule(threshold="quantile", quantile=0.3),
    ActivityRule(threshold="absolute", delta=0.0),
], ids=["anchor-quantile", "per-feature", "absolute"])
def test_streaming_counts_equal_in_memory_active_rows(probed, tmp_path, rule) -> None:
    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 3), slice(2, 7), slice(7, 10)])
    thresholds = feature_thresholds(rule, probed.max_matrix()[:5])  # an "anchor": 5 rows
    data = [0, 1, 1, 4, 6, 6, 6, 9, 2]  # the data's rows, repeats included
    rows = ProbeResult(acts=[probed.acts[i] for i in data], d_sae=probed.d_sae)
    want = active_rows(activity(rows, rule, thresholds))
    got = active_row_counts(shards, thresholds, rule, keys=text_keys([TEXTS[i] for i in data]),
                            chunk_rows=2)
    assert got.n_rows == len(data) and want.sum() > 0
    np.testing.assert_array_equal(got.rows, want)
    every = active_row_counts(shards, thresholds, rule)  # each stored text once
    assert every.n_rows == len(TEXTS)
    np.testing.assert_array_equal(every.rows, active_rows(activity(probed, rule, thresholds)))


def test_count_pooling_and_missing_data_rows_are_refused(probed, tmp_path) -> None:
    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 8)])
    thresholds = np.zeros(probed.d_sae, dtype=np.float32)
    with pytest.raises(ConfigError, match="pooling=count"):
        active_row_counts(shards, thresholds, ActivityRule(pooling="count", min_tokens=2))
    with pytest.raises(DataError, match="^2 of 10 distinct data texts"):
        active_row_counts(shards, thresholds, ActivityRule(), keys=text_keys(TEXTS))


def test_shards_of_another_probe_are_refused(probed, tmp_path) -> None:
    write_shards(tmp_path, probed, TEXTS, [slice(0, 2)])
    other = manifest(probed.d_sae, probed.pooled().shape[1], sae="wide-sae:1", namespace="ns2")
    with pytest.raises(ConfigError, match="sae 'tiny-sae:0:2' \\(wanted 'wide-sae:1'\\)"):
        ShardSet.create(tmp_path, other)
    with pytest.raises(DataError, match="not a shard set"):
        ShardSet.open(tmp_path / "nowhere")


def test_a_killed_write_leaves_no_part(probed, tmp_path, monkeypatch) -> None:
    """A part is whole or absent: a write that dies midway leaves only a .tmp- file (here
    removed at once), and the next ShardSet.create clears any left by a killed process."""
    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 5)])
    (shards.parts_dir / ".tmp-killed.parquet").write_bytes(b"PAR1 half a file")
    real = pq.write_table

    def dies(table, where, **kw):  # type: ignore[no-untyped-def]
        real(table, where, **kw)
        where.truncate(10)  # half written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", dies)
    table = shard_table(text_keys(TEXTS[5:]), np.ones(5), probed.max_matrix()[5:],
                        probed.pooled()[5:])
    with pytest.raises(KeyboardInterrupt):
        write_part(shards.parts_dir, table)
    assert len(shards.files()) == 1 and len(shards.keys()) == 5  # the debris is not read
    ShardSet.create(tmp_path, shards.manifest)
    assert [p.name for p in shards.parts_dir.iterdir()] == [shards.files()[0].name]


def test_measure_over_shards_equals_measure(probed, tmp_path) -> None:
    from tools.coverage import JudgeSettings, measure
    from tools.shards import measure_shards

    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 6), slice(4, 10)])
    anchor = ProbeResult(acts=probed.acts[:8], d_sae=probed.d_sae)
    labels = [1, 1, 1, 0, 0, 1, 0, 0]
    data = [2, 3, 3, 8, 9]
    rule, judge = ActivityRule(threshold="anchor-quantile", quantile=0.5), JudgeSettings()
    want = measure(anchor, labels, ProbeResult([probed.acts[i] for i in data], probed.d_sae),
                   rule, judge)
    got = measure_shards(anchor, labels, shards, rule, judge,
                         keys=text_keys([TEXTS[i] for i in data]))
    assert got.report == want.report
    np.testing.assert_array_equal(got.task, want.task)
    np.testing.assert_array_equal(got.thresholds, want.thresholds)
