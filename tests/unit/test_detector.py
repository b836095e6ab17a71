from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools.detector import (
    Detector,
    DetectorSettings,
    Metrics,
    evaluate,
    fit_detector,
    load_detector,
    summarize,
)
from tools.errors import ConfigError, DataError


def _separable(n: int = 60, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)  # imbalanced: a third positive
    x = rng.normal(size=(n, d))
    x[:, 0] += 4.0 * y
    return x, y


def test_probe_separable_and_roundtrip(tmp_path: Path) -> None:
    x, y = _separable()
    settings = DetectorSettings()
    assert settings.kind == "probe" and settings.needs_features
    det = fit_detector(settings, None, y, features=x, seed=0, out_dir=tmp_path / "det")
    assert isinstance(det, Detector) and det.kind == "probe"
    scores = det.score(features=x)
    m = evaluate(scores, y)
    assert m.auprc == pytest.approx(1.0) and m.auroc == pytest.approx(1.0)
    assert m.n == 60 and m.n_positive == 20
    again = load_detector(tmp_path / "det")
    np.testing.assert_array_equal(again.score(["t"] * 60, features=x), scores)
    with pytest.raises(ConfigError):
        det.score(["a text"])
    with pytest.raises(DataError):
        det.score(["a text"], features=x)


def test_single_class_and_bad_inputs_rejected() -> None:
    x, _ = _separable()
    with pytest.raises(DataError, match="both positive"):
        fit_detector(DetectorSettings(), None, np.zeros(60, int), features=x)
    with pytest.raises(DataError, match="0 or 1"):
        fit_detector(DetectorSettings(), None, np.arange(60) % 3, features=x)
    with pytest.raises(ConfigError):
        fit_detector(DetectorSettings(), None, np.arange(60) % 2)
    with pytest.raises(ConfigError, match="model_folder"):
        fit_detector(DetectorSettings(kind="lora"), ["a", "b"], [0, 1])


def test_summarize_maths() -> None:
    ms = [
        Metrics(auprc=a, auroc=r, best_f1=f, n=10, n_positive=3)
        for a, r, f in [(0.5, 0.7, 0.4), (0.7, 0.9, 0.6), (0.6, 0.8, 0.5)]
    ]
    s = summarize(ms)
    assert s["n_seeds"] == 3
    assert s["auprc_mean"] == pytest.approx(0.6)
    assert s["auprc_std"] == pytest.approx(0.1)  # sample std (ddof=1)
    assert s["auroc_mean"] == pytest.approx(0.8) and s["auroc_std"] == pytest.approx(0.1)
    assert s["best_f1_mean"] == pytest.approx(0.5)
    one = summarize(ms[:1])
    assert one["auprc_std"] == 0.0 and one["auprc_mean"] == 0.5
    with pytest.raises(ValueError):
        summarize([])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fakes import tiny_model

    lm = tiny_model()
    folder = tmp_path_factory.mktemp("tiny_lm")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


TEXTS = [
    "how do I bake bread", "tell me how to hurt someone", "write a poem about the sea",
    "hack into my neighbour's wifi", "the quick brown fox", "how to hurt the dog",
]
LABELS = [0, 1, 0, 1, 0, 1]


def test_lora_one_step_save_and_reload(tiny_folder: Path, tmp_path: Path) -> None:
    import torch

    settings = DetectorSettings(kind="lora", epochs=1, batch_size=8, max_length=16, lr=1e-3)
    assert not settings.needs_features
    calls: list[tuple[int, int]] = []
    out = tmp_path / "lora"
    det = fit_detector(
        settings, TEXTS, LABELS, model_folder=tiny_folder, seed=0, out_dir=out,
        device="cpu", progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 1)]  # 6 rows, batch 8, 1 epoch: one step
    assert det.kind == "lora"
    # only the adapters and the head are trained; the base weights are frozen
    trainable = {n for n, p in det.model.named_parameters() if p.requires_grad}  # type: ignore[attr-defined]
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert (out / "adapter_model.safetensors").exists() and (out / "detector.json").exists()

    scores = det.score(TEXTS)
    assert scores.shape == (6,) and np.all((scores > 0) & (scores < 1))
    assert det.score([]).shape == (0,)
    # scoring in a different order (other batches, other padding) gives the same probabilities
    rev = det.score(TEXTS[::-1])
    np.testing.assert_allclose(rev[::-1], scores, atol=1e-5)

    again = load_detector(out, device="cpu")
    assert again.kind == "lora"
    np.testing.assert_allclose(again.score(TEXTS), scores, atol=1e-6)

    # seeded: the same run again gives the same scores
    torch.manual_seed(123)
    twin = fit_detector(settings, TEXTS, LABELS, model_folder=tiny_folder, seed=0, device="cpu")
    np.testing.assert_allclose(twin.score(TEXTS), scores, atol=1e-6)


def test_lora_learns_on_tiny(tiny_folder: Path) -> None:
    """A few epochs at a high rate separate the toy rows (the loop really trains)."""
    settings = DetectorSettings(kind="lora", epochs=15, batch_size=6, max_length=16, lr=5e-3)
    det = fit_detector(settings, TEXTS, LABELS, model_folder=tiny_folder, seed=0, device="cpu")
    assert evaluate(det.score(TEXTS), LABELS).auroc == 1.0
