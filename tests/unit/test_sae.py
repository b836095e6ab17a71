from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fakes import D_MODEL, tiny_sae
from tools.errors import SAEError
from tools.probe import ProbeSettings, probe_texts
from tools.sae import HookPoint, check_fits, load_sae, resolve_hook
from tools.sae_train import TrainSettings, collect, train


@pytest.mark.parametrize(
    ("name", "hook", "layer"),
    [
        ("model.layers.15", HookPoint("model.layers.15", "output"), 15),
        ("blocks.19.hook_resid_post", HookPoint("model.layers.19", "output"), 19),
        ("blocks.7.hook_resid_pre", HookPoint("model.layers.7", "input"), 6),
    ],
)
def test_resolve_hook(name, hook, layer) -> None:
    assert resolve_hook(name) == hook and hook.layer == layer


def test_saved_sae_round_trips_and_probes_the_same(tiny_lm, tmp_path) -> None:
    sae = tiny_sae(layer=1)
    sae.sae.save_model(tmp_path / "sae")
    loaded = load_sae(str(tmp_path / "sae"))
    assert loaded.hook == HookPoint("model.layers.1") and loaded.d_sae == sae.d_sae
    texts = ["how do I bake bread", "tell me how to hurt someone"]
    a = probe_texts(texts, tiny_lm, sae).max_matrix().toarray()
    b = probe_texts(texts, tiny_lm, loaded).max_matrix().toarray()
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_sae_that_does_not_fit_the_model_is_refused(tiny_lm) -> None:
    with pytest.raises(SAEError, match="does not have"):
        check_fits(tiny_sae(layer=9), tiny_lm.model)
    wide = tiny_sae()
    wide.d_in = D_MODEL * 2
    with pytest.raises(SAEError, match="hidden size"):
        check_fits(wide, tiny_lm.model)


def test_bad_sae_specs_have_clear_errors(tmp_path) -> None:
    with pytest.raises(SAEError, match="no cfg.json"):
        load_sae(str(tmp_path))
    with pytest.raises(SAEError, match="release/sae_id"):
        load_sae("not-an-sae")


TRAIN_TEXTS = [f"how do I bake bread number {i} with the quick brown fox" for i in range(300)]
SMALL = TrainSettings(d_sae=64, k=4, n_vectors=2000, batch_size=128, n_checkpoints=2,
                      chunk_texts=16,
                      probe=ProbeSettings(max_tokens=32))


def test_collect_resumes_to_the_same_store(tiny_lm, tmp_path) -> None:
    hook = HookPoint("model.layers.1")
    full = collect(tiny_lm, [hook], TRAIN_TEXTS, tmp_path / "a", SMALL)

    def die(_phase: str, done: int, _total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(tiny_lm, [hook], TRAIN_TEXTS, tmp_path / "b", SMALL, die)
    state = json.loads((tmp_path / "b" / "activations" / "collect.json").read_text())
    assert 0 < state["vectors"] < full
    resumed = collect(tiny_lm, [hook], TRAIN_TEXTS, tmp_path / "b", SMALL)
    assert resumed == full == SMALL.n_vectors
    store = "activations/model.layers.1-output.f16"
    assert (tmp_path / "a" / store).read_bytes() == (tmp_path / "b" / store).read_bytes()


def test_train_writes_loadable_fp16_sae_with_metrics(tiny_lm, tmp_path) -> None:
    hook = HookPoint("model.layers.1")
    n = collect(tiny_lm, [hook], TRAIN_TEXTS, tmp_path, SMALL)
    metrics = train(hook, n, D_MODEL, tmp_path, SMALL, "tiny")
    assert metrics["l0"] == pytest.approx(SMALL.k)
    assert 0 <= metrics["dead_fraction"] <= 1 and metrics["explained_variance"] <= 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # checkpoints kept
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["metadata"]["hook_name"] == "model.layers.1"
    sae = load_sae(str(tmp_path / "sae"))
    assert sae.d_sae == 64 and sae.hook.layer == 1
