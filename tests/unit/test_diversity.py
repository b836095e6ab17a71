"""tools/diversity.py: Vendi and G-Vendi (Prismatic Synthesis' gradient-space diversity), the
head's gradients against autograd, greedy Vendi selection and SynAlign's MMD weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.fakes import bag_of_words
from tests.unit.test_baselines import SEEDS
from tools import diversity
from tools.diversity import (
    fit_head,
    g_vendi,
    g_vendi_greedy,
    gradient_embeddings,
    head_gradients,
    mmd_weights,
    vendi_score,
)
from tools.errors import DataError


def test_vendi_score_hand_computed_cases() -> None:
    assert vendi_score(np.ones((5, 3))) == pytest.approx(1.0)
    assert vendi_score(np.eye(4)) == pytest.approx(4.0)
    assert vendi_score(3.0 * np.eye(3)[[0, 1, 2, 0, 1, 2]]) == pytest.approx(3.0)  # scale-free
    c = 0.6  # two rows with cosine c: eigenvalues (1 ± c) / 2
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    rows = np.array([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    assert vendi_score(rows) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()))
    assert vendi_score(rows, q=2) == pytest.approx(1 / (lam**2).sum())
    assert vendi_score(rows, q=math.inf) == pytest.approx(1 / lam.max())


def test_vendi_score_uses_either_gram_matrix_alike() -> None:
    rows = np.eye(2)[[0, 0, 0, 1]]  # n > d: the d x d form; eigenvalues 3/4, 1/4
    lam = np.array([0.75, 0.25])
    expected = math.exp(-(lam * np.log(lam)).sum())
    assert vendi_score(rows) == pytest.approx(expected)
    wide = np.hstack([rows, np.zeros((4, 6))])  # n < d: the n x n form
    assert vendi_score(wide) == pytest.approx(expected)
    x = np.random.default_rng(0).normal(size=(30, 5))
    assert vendi_score(x) == pytest.approx(vendi_score(np.hstack([x, np.zeros((30, 40))])))
    assert 1 <= vendi_score(x) <= 5


def test_vendi_score_bad_input_is_a_one_line_error() -> None:
    for bad, match in ((np.zeros((0, 3)), "non-empty"), (np.array([[1.0, 0], [0, 0]]),
                       "row 1 is all zeros"), (np.array([1.0, 2.0]), r"\[n, d\]"),
                       (np.array([[np.nan, 1.0]]), "NaN")):
        with pytest.raises(DataError, match=match) as e:
            vendi_score(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="order"):
        vendi_score(np.eye(2), q=0)


def xor_data(n: int = 200, d: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian rows and two labellings of them: a linear rule and an XOR."""
    x = np.random.default_rng(0).normal(size=(n, d))
    return x, (x[:, 0] > 0).astype(int), (x[:, 0] * x[:, 1] > 0).astype(int)


def test_head_gradients_match_torch_autograd() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 5)) * [1.0, 3.0, 0.1, 1.0, 2.0] + [0.0, 5.0, 0.0, -1.0, 0.0]
    y = (x[:, 0] + x[:, 2] * 10 > 0).astype(int)
    head = fit_head(x, y, hidden=4)
    assert head.w1.shape == (4, 5) and head.w2.shape == (4,) and head.b1.shape == (4,)
    grads = head_gradients(x, y, head=head)
    assert grads.shape == (9, 4 * 5 + 2 * 4 + 1)
    params = [torch.tensor(p, dtype=torch.float64, requires_grad=True)
              for p in (head.w1, head.b1, head.w2, np.float64(head.b2))]
    w1, b1, w2, b2 = params
    xs = torch.tensor((x - x.mean(axis=0)) / x.std(axis=0), dtype=torch.float64)
    logits = torch.tanh(xs @ w1.T + b1) @ w2 + b2
    assert np.allclose(head.logit(x), logits.detach().numpy(), rtol=1e-12, atol=1e-12)
    target = torch.tensor(y, dtype=torch.float64)
    for i in range(9):  # one row's loss at a time: its own gradient
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[i], target[i])
        auto = torch.autograd.grad(loss, params, retain_graph=True)
        want = np.concatenate([g.detach().numpy().reshape(-1) for g in auto])
        assert np.allclose(grads[i], want, rtol=1e-10, atol=1e-13)


def test_gradient_embeddings_are_the_projected_exact_gradients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, _ = xor_data(60, 6)
    head = fit_head(x, y, hidden=5)
    assert np.mean((head.logit(x) > 0) == y) > 0.9
    g = gradient_embeddings(x, y, dim=64, seed=3, head=head)
    assert g.shape == (60, 64) and np.allclose(np.linalg.norm(g, axis=1), 1.0)
    p_w1, p_rest = diversity._projection(6, 5, 64, 3)  # P's W1 rows laid out [d, H·dim]
    p = np.vstack([p_w1.reshape(6, 5, 64).transpose(1, 0, 2).reshape(30, 64), p_rest])
    assert set(np.unique(p * 8)) == {-1.0, 1.0}  # Rademacher, ±1/√dim
    exact = head_gradients(x, y, head=head) @ p
    assert np.allclose(g, exact / np.linalg.norm(exact, axis=1, keepdims=True),
                       rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(diversity, "CHUNK_VALUES", 1)  # one row per chunk: the same
    assert np.allclose(g, gradient_embeddings(x, y, dim=64, seed=3, head=head),
                       rtol=1e-12, atol=1e-14)
    # a long projection keeps the exact gradients' cosines (Johnson-Lindenstrauss)
    full = head_gradients(x, y, head=head)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    long = gradient_embeddings(x, y, dim=4096, seed=3, head=head)
    assert np.abs(long @ long.T - full @ full.T).max() < 0.1


def test_gradient_embeddings_are_deterministic_for_a_seed() -> None:
    x, y, _ = xor_data(80, 6)
    first = fit_head(x, y, seed=5)
    again = fit_head(x, y, seed=5)
    def flat(h: diversity.Head) -> np.ndarray:
        return np.concatenate([h.mean, h.scale, h.w1.ravel(), h.b1, h.w2, [h.b2]])

    assert np.array_equal(flat(first), flat(again))
    g = gradient_embeddings(x, y, dim=32, seed=5)
    assert np.array_equal(g, gradient_embeddings(x, y, dim=32, seed=5))
    assert g_vendi(x, y, dim=32, seed=5) == g_vendi(x, y, dim=32, seed=5)
    assert not np.allclose(g, gradient_embeddings(x, y, dim=32, seed=6))
    assert not np.allclose(g, gradient_embeddings(x, y, dim=32, seed=6, head=first))


def test_g_vendi_sees_what_the_head_learned() -> None:
    # the same rows under two labellings: a logistic head's G-Vendi was the Vendi score of
    # [x̃, 1] for both; the tanh head's gradients carry the rule it learned
    x, linear, xor = xor_data()
    augmented = vendi_score(np.hstack([(x - x.mean(axis=0)) / x.std(axis=0), np.ones((200, 1))]))
    g_linear, g_xor = g_vendi(x, linear), g_vendi(x, xor)
    assert g_xor > 1.5 * g_linear
    assert g_xor > 1.5 * augmented and g_xor > 1.5 * vendi_score(x)
    assert np.mean((fit_head(x, xor).logit(x) > 0) == xor) > 0.9  # the XOR is learned
    # the long projection agrees with the exact gradients' Vendi score
    assert g_vendi(x, xor, dim=4096) == pytest.approx(
        vendi_score(head_gradients(x, xor)), rel=0.05)
    # p - y only scales and signs a row's gradient: with one head, flipped labels negate
    # the unit embeddings (the direction is ±∇θ logit, however sure the head is)
    head = fit_head(x, xor)
    assert np.allclose(gradient_embeddings(x, 1 - xor, head=head),
                       -gradient_embeddings(x, xor, head=head), atol=1e-12)


def test_one_label_leaves_the_head_at_its_seeded_initialisation() -> None:
    x = bag_of_words(SEEDS)
    head = fit_head(x, [1] * 5)
    assert not head.b1.any() and head.b2 == 0 and head.w1.all() and head.w2.all()
    assert np.array_equal(head.w1, fit_head(x, [0] * 5).w1)
    assert not np.allclose(head.w1, fit_head(x, [1] * 5, seed=1).w1)
    assert np.allclose(head.mean, x.mean(axis=0))
    up = gradient_embeddings(x[:1], [1], dim=64)
    down = gradient_embeddings(x[:1], [0], dim=64)
    assert np.allclose(up, -down)
    with pytest.raises(DataError, match="one 0/1 label per row"):
        gradient_embeddings(x, [1, 2, 1, 1, 1])
    with pytest.raises(DataError, match="a head for 64 features, rows have 3"):
        gradient_embeddings(np.ones((2, 3)), [1, 1], head=head)
    with pytest.raises(DataError, match="hidden"):
        fit_head(x, [1] * 5, hidden=0)


def test_g_vendi_is_vendi_of_gradient_embeddings() -> None:
    same = np.tile([1.0, 2.0, 0.5], (6, 1))
    assert g_vendi(same, [1, 0, 1, 0, 1, 0]) == pytest.approx(1.0)  # sign does not count
    assert g_vendi(same, [1] * 6) == pytest.approx(1.0)
    x = bag_of_words(SEEDS * 2)
    assert g_vendi(x, [1] * 10, dim=32) == pytest.approx(
        vendi_score(gradient_embeddings(x, [1] * 10, dim=32)))
    assert g_vendi(x, [1] * 10, dim=32) > 2
    # each row with both labels: nothing to learn, the head ends near W1 = 0, w2 = 0 and
    # every row's gradient points alike
    assert g_vendi(x, [1] * 5 + [0] * 5, dim=32) == pytest.approx(1.0, abs=0.01)


def test_g_vendi_greedy_adds_what_raises_the_vendi_score_most() -> None:
    e = np.eye(4)
    emb = np.vstack([e[0], e[0], 0.9 * e[0] + 0.1 * e[1], e[1], e[2], e[3] + 0.2 * e[2]])
    picked = g_vendi_greedy(emb, candidates=[1, 2, 3, 4, 5], labelled=[0], k=3)
    assert picked[:2] == [3, 4] and picked[2] == 5
    # each pick is the best by brute force of the order-2 Vendi score
    have = [0]
    for j in picked:
        rest = [c for c in [1, 2, 3, 4, 5] if c not in have]
        best = max(rest, key=lambda c: (vendi_score(emb[have + [c]], q=2), -c))
        assert j == best
        have.append(j)
    assert g_vendi_greedy(emb, [1, 3], [], 1) == [1]  # nothing labelled: ties, the first
    for cands, lab, k, match in (([0, 1], [0], 1, "not labelled"), ([1, 1], [0], 1,
                                 "distinct"), ([1], [0], 2, "outside"), ([9], [0], 1,
                                 "out of range")):
        with pytest.raises(DataError, match=match):
            g_vendi_greedy(emb, cands, lab, k)


def test_mmd_weights_up_weight_rows_near_the_real_data_and_drop_outliers() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 2))
    near = rng.normal(size=(10, 2)) * 0.5
    synthetic = np.vstack([near, [[20.0, 20.0], [-15.0, 18.0]], [[0.0, 0.0]], [[3.0, 0.0]]])
    w = mmd_weights(synthetic, real)
    assert w.shape == (14,) and (w >= 0).all() and w.sum() == pytest.approx(14)
    assert w[10] < 0.01 and w[11] < 0.01  # far from every real row
    assert w[:10].mean() > 1 and w[12] > 1  # in the bulk of the real rows
    assert w[12] > w[13]  # the centre beats the edge (3 std out)
    same = mmd_weights(real[:50], real[50:])
    assert 0.5 < np.median(same) < 1.5  # alike distributions: weights near 1
    assert np.allclose(mmd_weights(np.ones((3, 2)), np.ones((4, 2))), 1.0)
    with pytest.raises(DataError, match="features"):
        mmd_weights(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(DataError, match="no synthetic row lies near"):
        mmd_weights(np.array([[100.0, 100.0]]), real, bandwidth=0.1)


