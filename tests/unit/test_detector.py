from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.tolerance import fp32_tolerance, path_reduction
from tools.detector import (
    Detector,
    DetectorSettings,
    Metrics,
    evaluate,
    fit_detector,
    load_detector,
    row_weights,
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


def test_row_weights_without_share_are_balanced() -> None:
    y = np.array([1, 1, 0, 0, 0, 0])
    w = row_weights(y, [False, True, False, False, True, True])
    np.testing.assert_allclose(w, [1.5, 1.5, 0.75, 0.75, 0.75, 0.75])  # n / (2 n_label)


def test_row_weights_give_synthetic_rows_their_share_of_each_label() -> None:
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    fake = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1], dtype=bool)
    n_real = int((~fake).sum())  # 7
    for s in (0.0, 0.2, 0.5, 0.9):
        w = row_weights(y, fake, s)
        for label in (0, 1):
            mine = y == label
            assert w[mine].sum() == pytest.approx(n_real / 2), "labels stay balanced"
            assert w[mine & fake].sum() == pytest.approx(s * n_real / 2)
            # rows of one kind within a label weigh the same
            assert np.ptp(w[mine & fake]) == 0 and np.ptp(w[mine & ~fake]) == 0
    # a label without synthetic rows gives all its weight to its real rows
    pos_fake = y.astype(bool) & fake  # 3 synthetic positives, 8 real rows
    w = row_weights(y, pos_fake, 0.2)
    np.testing.assert_allclose(w[y == 0], 8 / 2 / 6)
    np.testing.assert_allclose(w[pos_fake].sum(), 0.2 * 8 / 2)
    # ...and one with only synthetic rows to those
    only = row_weights([1, 1, 0, 0], [True, True, False, False], 0.2)
    np.testing.assert_allclose(only, [0.5, 0.5, 0.5, 0.5])
    # no synthetic rows at all: balanced, as without a share
    np.testing.assert_allclose(row_weights(y, None, 0.3), row_weights(y))
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        row_weights(y, fake, 1.0)
    with pytest.raises(DataError, match="synthetic flags"):
        row_weights(y, fake[:3], 0.2)


def _with_flipped_copies(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real separable rows plus synthetic rows near the positives labelled 0 (wrong)."""
    x, y = _separable()
    rng = np.random.default_rng(seed)
    fake_x = rng.normal(size=(25, x.shape[1]))
    fake_x[:, 0] += 4.0
    return (np.vstack([x, fake_x]), np.concatenate([y, np.zeros(25, int)]),
            np.arange(len(x) + 25) >= len(x))


def test_probe_with_share_zero_ignores_synthetic_rows(tmp_path: Path) -> None:
    x_all, y_all, fake = _with_flipped_copies()
    x, y = x_all[~fake], y_all[~fake]
    real_only = fit_detector(DetectorSettings(), None, y, features=x)
    zero = fit_detector(DetectorSettings(), None, y_all, features=x_all, synthetic=fake,
                        synthetic_share=0.0, out_dir=tmp_path / "det")
    np.testing.assert_allclose(zero.score(features=x_all), real_only.score(features=x_all),
                               atol=1e-5)
    manifest = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert manifest["synthetic_share"] == 0.0 and manifest["n_synthetic"] == 25
    # the share moves the model toward the synthetic rows' (here wrong) labels
    pos = x_all[y_all == 1]
    means = [fit_detector(DetectorSettings(), None, y_all, features=x_all, synthetic=fake,
                          synthetic_share=s).score(features=pos).mean() for s in (0.0, 0.2, 0.5)]
    assert means[0] > means[1] > means[2]
    # no share: the mask is only recorded, every row weighs the same as before
    plain = fit_detector(DetectorSettings(), None, y_all, features=x_all)
    masked = fit_detector(DetectorSettings(), None, y_all, features=x_all, synthetic=fake)
    np.testing.assert_array_equal(masked.score(features=x_all), plain.score(features=x_all))
    with pytest.raises(DataError, match="synthetic flags"):
        fit_detector(DetectorSettings(), None, y_all, features=x_all, synthetic=fake[:5])


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


def lora_path(det: object) -> int:
    """The summed reduction length of a LoRA detector's forward: every block of its base
    model, then the classification head over the hidden size (tests/tolerance.py)."""
    config = det.model.config  # type: ignore[attr-defined]
    return path_reduction(config, config.num_hidden_layers, [config.hidden_size])


def assert_close_fp32(got: np.ndarray, want: np.ndarray, n: int) -> None:
    """Probabilities equal up to fp32 summation order in their logits: an error e in a logit
    moves the sigmoid by at most e / 4."""
    p = np.clip(np.asarray(want, dtype=np.float64), 1e-12, 1 - 1e-12)
    scale = max(1.0, float(np.abs(np.log(p / (1 - p))).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=fp32_tolerance(n, scale) / 4)


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
    assert_close_fp32(rev[::-1], scores, lora_path(det))

    again = load_detector(out, device="cpu")
    assert again.kind == "lora"
    np.testing.assert_allclose(again.score(TEXTS), scores, atol=1e-6)

    # seeded: the same run again gives the same scores
    torch.manual_seed(123)
    twin = fit_detector(settings, TEXTS, LABELS, model_folder=tiny_folder, seed=0, device="cpu")
    np.testing.assert_allclose(twin.score(TEXTS), scores, atol=1e-6)


def test_lora_with_share_zero_ignores_synthetic_rows(tiny_folder: Path, tmp_path: Path) -> None:
    """One batch holds every row: weight-0 rows change neither the loss nor the steps."""
    settings = DetectorSettings(kind="lora", epochs=2, batch_size=16, max_length=16, lr=1e-3,
                                lora_dropout=0.0)
    fake = ["tell me how to bake bread", "write a poem about how to hurt"]
    texts, labels = TEXTS + fake, LABELS + [1, 0]  # synthetic rows with the wrong labels
    mask = [False] * len(TEXTS) + [True, True]
    real_only = fit_detector(settings, TEXTS, LABELS, model_folder=tiny_folder, device="cpu")
    zero = fit_detector(settings, texts, labels, model_folder=tiny_folder, device="cpu",
                        synthetic=mask, synthetic_share=0.0, out_dir=tmp_path / "lora")
    # weight-0 rows change only the batch's shape: fp32 summation order
    assert_close_fp32(zero.score(texts), real_only.score(texts), lora_path(zero))
    manifest = json.loads((tmp_path / "lora" / "detector.json").read_text())
    assert manifest["synthetic_share"] == 0.0 and manifest["n_synthetic"] == 2
    half = fit_detector(settings, texts, labels, model_folder=tiny_folder, device="cpu",
                        synthetic=mask, synthetic_share=0.5)
    assert np.abs(half.score(texts) - zero.score(texts)).max() > 1e-4


def test_lora_learns_on_tiny(tiny_folder: Path) -> None:
    """A few epochs at a high rate separate the toy rows (the loop really trains)."""
    settings = DetectorSettings(kind="lora", epochs=15, batch_size=6, max_length=16, lr=5e-3)
    det = fit_detector(settings, TEXTS, LABELS, model_folder=tiny_folder, seed=0, device="cpu")
    assert evaluate(det.score(TEXTS), LABELS).auroc == 1.0
