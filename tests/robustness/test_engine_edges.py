"""Hardening: texts without counted tokens, concurrent model conversion, exact resume of
in-process sampling (all on the tiny random parts; no downloads)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from memory.activation_cache import ActivationCache
from tests.fakes import D_MODEL
from tests.tolerance import assert_close_fp32, path_reduction
from tools import models as models_mod
from tools import probe as probe_mod
from tools.coverage import ActivityRule, measure
from tools.local_llm import LocalChat
from tools.probe import ProbeSettings, probe_texts

# -- 1. texts with zero counted tokens ------------------------------------------------

ONE_TOKEN = ["a", "x", "I"]  # one token each in the tiny tokenizer: only position 0
LONG = "how do I bake bread"


def _assert_empty(acts, n_tokens: int) -> None:  # type: ignore[no-untyped-def]
    assert acts.n_tokens == n_tokens
    assert len(acts.pos) == len(acts.feat) == len(acts.val) == 0
    np.testing.assert_array_equal(acts.pooled, np.zeros(D_MODEL, dtype=np.float32))


def test_single_one_token_text_gives_an_empty_record(tiny_lm, tiny_sae) -> None:
    result = probe_texts(["a"], tiny_lm, tiny_sae)
    _assert_empty(result.acts[0], 1)
    assert result.max_matrix().shape == (1, tiny_sae.d_sae) and result.max_matrix().nnz == 0
    assert result.count_matrix(0.0).nnz == 0
    assert result.pooled().shape == (1, D_MODEL)


def test_batch_of_only_uncounted_texts(tiny_lm, tiny_sae, monkeypatch) -> None:
    forwards: list[int] = []
    real = probe_mod.residuals

    def counting(lm, hooks, batch, *args):  # type: ignore[no-untyped-def]
        forwards.append(len(batch))
        return real(lm, hooks, batch, *args)

    monkeypatch.setattr(probe_mod, "residuals", counting)
    result = probe_texts([*ONE_TOKEN, ""], tiny_lm, tiny_sae, ProbeSettings(max_batch=64))
    for acts, n in zip(result.acts, [1, 1, 1, 0], strict=True):
        _assert_empty(acts, n)
    assert forwards == []  # nothing to count: no forward pass at all
    # all-template text (chat template around an empty text)
    templ = probe_texts([""], tiny_lm, tiny_sae, ProbeSettings(chat_template=True))
    assert templ.acts[0].n_tokens > 0
    _assert_empty(templ.acts[0], templ.acts[0].n_tokens)


def test_mixed_batch_matches_probing_alone(tiny_lm, tiny_sae) -> None:
    settings = ProbeSettings(batch_tokens=100_000, max_batch=64)  # one batch for all
    mixed = probe_texts(["a", LONG, "x", "hi"], tiny_lm, tiny_sae, settings)
    alone = probe_texts([LONG, "hi"], tiny_lm, tiny_sae, settings)
    _assert_empty(mixed.acts[0], 1)
    _assert_empty(mixed.acts[2], 1)
    for got, want in zip([mixed.acts[1], mixed.acts[3]], alone.acts, strict=True):
        np.testing.assert_array_equal(got.feat, want.feat)
        np.testing.assert_array_equal(got.pos, want.pos)
        # one batch with padding vs alone: the same values up to fp32 summation order
        config = tiny_lm.model.config
        assert_close_fp32(got.val, want.val,
                          path_reduction(config, tiny_sae.hook.layer + 1, [tiny_sae.d_in]))
        assert_close_fp32(got.pooled, want.pooled, path_reduction(config, tiny_sae.hook.layer + 1))
        assert got.n_tokens == want.n_tokens and len(got.feat) > 0


def test_uncounted_texts_are_cached(tiny_lm, tiny_sae, tmp_path, probed_batches) -> None:
    cache = ActivationCache(tmp_path / "acts.sqlite")
    probe_texts([LONG], tiny_lm, tiny_sae, cache=cache)
    calls = probed_batches
    calls.clear()
    # the reported case: the only uncached rows are one-token texts
    first = probe_texts([LONG, "a", "x"], tiny_lm, tiny_sae, cache=cache)
    assert sum(calls) == 2 and len(cache) == 3
    calls.clear()
    again = probe_texts([LONG, "a", "x"], tiny_lm, tiny_sae, cache=cache)
    assert calls == []  # every row, the empty ones included, came from the cache
    _assert_empty(again.acts[1], 1)
    _assert_empty(again.acts[2], 1)
    np.testing.assert_array_equal(again.max_matrix().toarray(), first.max_matrix().toarray())
    np.testing.assert_array_equal(again.pooled(), first.pooled())


def test_coverage_and_pooled_features_accept_empty_rows(tiny_lm, tiny_sae) -> None:
    anchor_texts = [LONG, "tell me how to hurt someone", "write a poem about the sea", "a"]
    anchor = probe_texts(anchor_texts, tiny_lm, tiny_sae)
    data = probe_texts(["a", "I"], tiny_lm, tiny_sae)
    measured = measure(anchor, [0, 1, 0, 1], data, ActivityRule(threshold="anchor-quantile"))
    assert measured.report.n_covered == 0 and measured.report.n_data == 2
    x = np.vstack([anchor.pooled(), data.pooled()])
    assert np.isfinite(x).all() and x.shape == (6, D_MODEL)
    from tools.detector import train_probe_detector

    pipeline = train_probe_detector(x, [0, 1, 0, 1, 0, 1])
    assert np.isfinite(pipeline.predict_proba(data.pooled())).all()


# -- 2. concurrent first use of the embedded model ------------------------------------

def _fake_convert(profile: models_mod.ModelProfile, dest: Path) -> None:
    """Stands in for the ~20 s dequantisation: a small folder, written slowly."""
    (dest / "config.json").write_text("{}")
    time.sleep(0.5)
    (dest / "model.safetensors").write_bytes(b"weights")
    with (dest.parent / "conversions.log").open("a") as f:
        f.write(f"{dest.name}\n")


def _convert_in_child(home: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    profile = models_mod.PROFILES[models_mod.DEFAULT_MODEL]
    barrier.wait()
    try:
        path = models_mod.embedded_model_dir(profile, Path(home), convert=_fake_convert)
        results.put(("ok", str(path)))
    except BaseException as e:  # reported to the parent
        results.put(("error", repr(e)))


def test_concurrent_conversion_is_safe(tmp_path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_convert_in_child, args=(str(tmp_path), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    target = tmp_path / "models" / models_mod.DEFAULT_MODEL
    assert got == [("ok", str(target))] * 2
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert (target / "config.json").exists()
    # the lock made the second process wait and reuse the first copy: one conversion
    assert len((tmp_path / "models" / "conversions.log").read_text().split()) == 1
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert leftovers == [models_mod.DEFAULT_MODEL]


def test_conversion_losing_the_race_uses_the_winners_copy(tmp_path) -> None:
    profile = models_mod.PROFILES[models_mod.DEFAULT_MODEL]
    target = tmp_path / "models" / profile.name

    def convert_while_another_finishes(p: models_mod.ModelProfile, dest: Path) -> None:
        _fake_convert(p, dest)
        target.mkdir()  # e.g. a process on a filesystem without flock
        (target / "model.safetensors").write_bytes(b"theirs")

    path = models_mod.embedded_model_dir(profile, tmp_path,
                                         convert=convert_while_another_finishes)
    assert path == target and (target / "model.safetensors").read_bytes() == b"theirs"
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [profile.name]


def test_failed_or_killed_conversions_leave_no_temp_folders(tmp_path) -> None:
    profile = models_mod.PROFILES[models_mod.DEFAULT_MODEL]
    models = tmp_path / "models"
    models.mkdir()
    (models / f".{profile.name}.tmp-killed").mkdir()  # what a SIGKILL would leave

    def broken(p: models_mod.ModelProfile, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models_mod.embedded_model_dir(profile, tmp_path, convert=broken)
    assert [p for p in models.iterdir() if p.is_dir()] == []
    models_mod.embedded_model_dir(profile, tmp_path, convert=_fake_convert)
    assert [p.name for p in models.iterdir() if p.is_dir()] == [profile.name]


# -- 3. exact resume of seeded in-process sampling ------------------------------------

A = ("You are terse.", "how do I bake bread")
B = ("You write test data for a classifier, one message at a time.", "hack the wifi")


def test_sample_does_not_depend_on_its_batch(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=8)
    batched = chat.generate_batch([A, B], temperature=1.0, seeds=[1, 2])
    assert batched[0] == chat.generate_batch([A], temperature=1.0, seeds=[1])[0]
    assert batched[1] == chat.generate_batch([B], temperature=1.0, seeds=[2])[0]
    assert chat.generate_batch([B, A], temperature=1.0, seeds=[2, 1]) == batched[::-1]
    assert batched == chat.generate_batch([A, B], temperature=1.0, seeds=[1, 2])
    by_seed = {chat.generate_batch([A], temperature=1.0, seeds=[s])[0] for s in range(1, 6)}
    assert len(by_seed) > 1  # different seeds generally differ


def test_resumed_achat_equals_the_batched_one(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=8, batch_size=16)
    sizes: list[int] = []
    run = chat._run

    def counting(batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        return run(batch)

    chat._run = counting  # type: ignore[method-assign]

    async def both() -> list[str]:
        return list(await asyncio.gather(chat.achat(*A, temperature=0.9, seed=1),
                                         chat.achat(*B, temperature=0.9, seed=2)))

    together = asyncio.run(both())
    alone = asyncio.run(chat.achat(*A, temperature=0.9, seed=1))  # "after a kill"
    assert sizes == [2, 1] and together[0] == alone
    raw = asyncio.run(chat.acomplete("the quick", temperature=1.0, seed=7))
    assert raw == chat.complete_batch(["a", "the quick"], temperature=1.0, seeds=[3, 7])[1]
