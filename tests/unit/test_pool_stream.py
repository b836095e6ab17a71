"""Pool selection streamed in chunks (tools/pool/stream.py) against the in-memory pick
(tools/pool/select.py `pick_new`) on a synthetic pool, and the shard side on a tiny probe."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import scipy.sparse as sp

from tests.unit.test_shards import TEXTS, write_shards
from tools.coverage import ActivityRule, activity, feature_thresholds
from tools.errors import ConfigError, DataError
from tools.pool.select import STRATEGIES, PoolView, SelectSettings, pick_new
from tools.pool.stream import Labelled, OpenRows, StreamChunk, shard_chunks, stream_pick
from tools.probe import ProbeResult, probe_texts
from tools.ray_cluster import BATCH_SIZE
from tools.shards import text_keys
from tools.verify import NearDuplicates

N_POOL, D_SAE, N_LAB = 300, 40, 10


@pytest.fixture(scope="module")
def pool() -> tuple[PoolView, list[str], list[str]]:
    """A pool whose scores follow a few features (so some are relevant by the model), a
    labelled set that makes others relevant by the labels, two anchor task features; texts
    that are no near-duplicates of each other."""
    rng = np.random.default_rng(7)
    active = sp.random(N_POOL + N_LAB, D_SAE, density=0.12, random_state=rng, format="csr")
    active.data[:] = 1.0
    effect = np.where(np.arange(D_SAE) < 6, 3.0, 0.0)
    scores = 1 / (1 + np.exp(-(active @ effect - 3.5 + rng.normal(0, 0.5, N_POOL + N_LAB))))
    labels = (scores[N_POOL:] > 0.5).astype(int)
    labels[:2] = [0, 1]
    task = np.zeros(D_SAE, dtype=bool)
    task[[30, 31]] = True
    pooled = rng.normal(size=(N_POOL + N_LAB, 5))
    vocab = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choice(vocab, 12)) for _ in range(N_POOL + N_LAB)]
    view = PoolView(active=active[:N_POOL], pooled=pooled[:N_POOL], scores=scores[:N_POOL],
                    labelled_active=active[N_POOL:], labelled_pooled=pooled[N_POOL:],
                    labels=labels, groups=np.arange(N_POOL), task=task)
    return view, texts[:N_POOL], texts[N_POOL:]


def chunked(view: PoolView, size: int = 37) -> Iterator[StreamChunk]:
    """The pool in chunks, in a shuffled storage order (as shards hold it)."""
    order = np.random.default_rng(3).permutation(N_POOL)
    for start in range(0, N_POOL, size):
        idx = order[start : start + size]
        assert view.scores is not None
        yield StreamChunk(idx, np.ones(len(idx), dtype=np.int64), view.active[idx],
                          view.pooled[idx], view.scores[idx])


def both(pool, strategy: str, n: int, candidates: int):  # type: ignore[no-untyped-def]
    view, texts, labelled = pool
    settings = SelectSettings(strategy=strategy)  # type: ignore[arg-type]

    def seen() -> NearDuplicates:
        s = NearDuplicates(settings.near_threshold)
        s.add_all(labelled)
        return s

    want = pick_new(view, settings, n, texts, seen(), seed=5)
    lab = Labelled(view.labelled_active, view.labelled_pooled, view.labels, view.task)
    got = stream_pick(lambda: chunked(view), lab, settings, n,
                      lambda rows: [texts[r] for r in rows], seen(), scored=True, seed=5,
                      candidates=candidates)
    assert all(p.text == texts[p.row] for p in got)
    return [(p.row, p.fills, p.score) for p in want], [(p.row, p.pick.fills, p.pick.score)
                                                        for p in got]


@pytest.mark.parametrize("strategy", ["fac", "uncertainty", "top-score"])
def test_few_candidates_give_the_same_first_pick(pool, strategy) -> None:
    want, got = both(pool, strategy, 8, candidates=20)
    assert len(got) == 8 and got[0] == want[0]
    if strategy == "fac":
        assert want[0][1], "the first pick fills deficits"
    else:  # a fixed key: every pick is among the candidates
        assert got == want


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_candidates_holding_the_pool_give_every_pick(pool, strategy) -> None:
    want, got = both(pool, strategy, 12, candidates=N_POOL)
    assert got == want and len(got) == 12
    if strategy == "fac":
        assert sum(bool(f) for _, f, _ in got) >= 3


def test_random_and_coreset_sample_the_pool(pool) -> None:
    for strategy in ("random", "coreset"):
        want, got = both(pool, strategy, 10, candidates=30)
        assert len({r for r, _, _ in got}) == 10
    a, b = both(pool, "random", 10, candidates=30)[1], both(pool, "random", 10, 30)[1]
    assert a == b  # seeded, whatever the chunks


def test_text_detectors_and_no_model(pool) -> None:
    view, texts, _ = pool
    lab = Labelled(view.labelled_active, view.labelled_pooled, view.labels, view.task)
    unscored = [StreamChunk(c.rows, c.count, c.active, c.pooled, None) for c in chunked(view)]
    fetched: list[int] = []

    def texts_of(rows: np.ndarray) -> list[str]:
        fetched.extend(rows.tolist())
        return [texts[r] for r in rows]

    def by_text(ts: list[str]) -> np.ndarray:
        assert view.scores is not None
        return np.array([view.scores[texts.index(t)] for t in ts])

    got = stream_pick(lambda: unscored, lab, SelectSettings(), 5, texts_of,
                      NearDuplicates(), scored=False, candidates=50, score_texts=by_text)
    assert len(got) == 5 and got[0].pick.fills and len(fetched) == 50  # scored: candidates
    with pytest.raises(ConfigError, match="the top-score strategy ranks every pool row"):
        stream_pick(lambda: unscored, lab, SelectSettings(strategy="top-score"), 5, texts_of,
                    NearDuplicates(), scored=False, score_texts=by_text)
    with pytest.raises(ConfigError, match="the fac strategy needs the current model's"):
        stream_pick(lambda: unscored, lab, SelectSettings(), 5, texts_of, NearDuplicates(),
                    scored=False)


def test_open_rows_stand_for_their_lowest_open_row() -> None:
    keys = text_keys(["a", "b", "a", "c", "a", "b"])
    got = OpenRows.of(keys, taken={0, 1, 5})
    assert sorted(zip(got.row.tolist(), got.count.tolist(), strict=True)) == [(2, 2), (3, 1)]
    assert len(OpenRows.of(keys, taken=range(6)).keys) == 0


def test_shard_chunks_are_the_local_activity(tiny_lm, tiny_sae, tmp_path) -> None:
    probed: ProbeResult = probe_texts(TEXTS, tiny_lm, tiny_sae)
    shards = write_shards(tmp_path, probed, TEXTS, [slice(0, 6), slice(4, 10)])
    rule = ActivityRule(threshold="anchor-quantile", quantile=0.5)
    thresholds = feature_thresholds(rule, probed.max_matrix()[:5])
    pool_keys = text_keys([*TEXTS, TEXTS[3]])  # row 10 repeats row 3
    open_rows = OpenRows.of(pool_keys, taken={3, 7})
    chunks = list(shard_chunks(shards, open_rows, thresholds, rule,
                               lambda x: x[:, 0], chunk_rows=3))
    rows = np.concatenate([c.rows for c in chunks])
    assert sorted(rows.tolist()) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    text_of = [*TEXTS, TEXTS[3]]
    want = activity(ProbeResult(acts=[probed.acts[TEXTS.index(text_of[r])] for r in rows],
                                d_sae=probed.d_sae), rule, thresholds)
    assert want.nnz > 0
    np.testing.assert_array_equal(sp.vstack([c.active for c in chunks]).toarray(),
                                  want.toarray())
    np.testing.assert_array_equal(np.concatenate([c.scores for c in chunks]),  # type: ignore[misc]
                                  np.concatenate([c.pooled[:, 0] for c in chunks]))
    with pytest.raises(DataError, match="^1 of 9 open pool texts are not in the shards"):
        list(shard_chunks(shards, OpenRows.of(text_keys([*TEXTS, "new"]), {3, 7}),
                          thresholds, rule))
    with pytest.raises(ConfigError, match="pooling=count"):
        list(shard_chunks(shards, open_rows, thresholds,
                          ActivityRule(pooling="count", min_tokens=2)))


def test_improve_flags_pick_the_ray_engine_and_the_config_keeps_it(tmp_path) -> None:
    from typer.testing import CliRunner

    from agent.cli import app
    from agent.cli.improve import _pool
    from agent.cli.measure import Engine, ray_pool
    from agent.runs import load_pool
    from tools.rundir import RunConfig

    base = ["improve", "--anchor", "a.jsonl", "--data", "d.jsonl", "--run-dir", "r"]
    res = CliRunner().invoke(app, [*base, "--pool", "p.jsonl", "--shards", "s"])
    assert res.exit_code == 2 and "--shards needs --engine ray" in res.output
    res = CliRunner().invoke(app, [*base, "--engine", "ray"])
    assert res.exit_code == 2 and "--engine ray probes and picks from a pool" in res.output
    pool = _pool(tmp_path / "p.jsonl", None, "human", "fac", 25, 100, "text", "label",
                 ray_pool(Engine.ray, tmp_path / "s", None, 2, None))
    cfg = RunConfig(anchor="a", data="d", pool=pool)
    cfg.write(tmp_path)
    back = RunConfig.read(tmp_path).pool
    assert back is not None and back.engine == "ray" and back.ray.concurrency == 2
    assert back.ray.shards == str(tmp_path / "s") and back.ray.batch_size == BATCH_SIZE
    assert load_pool(cfg) is None  # streamed: the pool's rows are never loaded
