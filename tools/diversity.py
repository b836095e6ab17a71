"""Dataset diversity and distribution matching on frozen features: the Vendi score,
G-Vendi (Vendi over a proxy model's gradient embeddings), a greedy Vendi pool selection, and
MMD re-weighting of synthetic rows towards real ones.

- Vendi score (Friedman & Dieng, 2023): for n unit-normalised rows X, K = X Xᵀ (cosine Gram
  matrix); VS = exp(H(λ)), λ the eigenvalues of K/n, H the Shannon entropy. The nonzero
  eigenvalues of X Xᵀ/n and Xᵀ X/n agree, so the smaller of the n×n and d×d matrices is
  decomposed (float64, `numpy.linalg.eigvalsh`); rounding's tiny negatives are clipped to 0
  and λ renormalised to sum 1. Identical rows give 1, n orthogonal rows give n. Order q ≠ 1
  is the Rényi form (Pasarkar & Dieng, 2024, "Cousins of the Vendi score").
- G-Vendi (Jung et al., 2025, "Prismatic Synthesis: Gradient-based Data Diversification
  Boosts Generalization in LLM Reasoning"): the Vendi score of per-row loss gradients of a
  proxy model, randomly projected (TRAK, Park et al., 2023). The paper's proxy is a small LM;
  here it is a one-hidden-layer head on the frozen features (`fit_head`): x̃ = x
  standardised (mean and std of the features it is fit on; a constant feature keeps scale
  1), h = tanh(W1 x̃ + b1) with H = 32 units, logit z = w2·h + b2, fit to the labels by
  scikit-learn's MLPClassifier (full-batch L-BFGS, seeded Glorot start, L2 penalty 1/c on
  the weights; deterministic for a seed, one BLAS thread). A row's gradient of its log loss
  with respect to θ = (W1, b1, w2, b2) is (p - y)·∇θz in closed form (`head_gradients`):
  with a = (p - y)·w2 ⊙ (1 - h²), dW1 = a ⊗ x̃, db1 = a, dw2 = (p - y)·h, db2 = p - y. It
  is projected by a fixed seeded Rademacher matrix P ([H·d + 2H + 1, dim], entries ±1/√dim)
  without forming the [n, H·d] block dW1: row i's projected dW1 is Σ_h a_ih (x̃_iᵀ P_h),
  P_h the [d, dim] rows of unit h, one matrix product per chunk of rows (n·d·H·dim
  multiply-adds in all); then each row is unit-normalised.
  What the Vendi score sees: p - y is one number per row, so neither its size (how wrong
  the head is) nor its sign (the label; K = D C D, D = diag(±1)) moves G-Vendi; what the head
  learned enters through ∇θz = [(w2 ⊙ (1 - h²)) ⊗ x̃, w2 ⊙ (1 - h²), h, 1], which depends
  on the rows non-linearly and on the trained θ: a row that saturates hidden units (|h| ≈ 1)
  loses their W1 part, and rows alike in x̃ on opposite sides of a unit's boundary differ.
  (A logistic head's ∇θz was [x, 1], so G-Vendi was the Vendi score of the features whatever
  the head or labels.) Different labels on the same features train a different θ and give a
  different G-Vendi: a head that learns a linear rule sees about the features' diversity, one
  that learns an XOR far more, and random labels it memorises most. A head with nothing to
  learn (each row present with both labels) ends near W1 = 0, w2 = 0, where every row's
  gradient is alike and G-Vendi is near 1: it measures what the rows teach the proxy. With
  one label only the head is left at its seeded initialisation (Glorot-uniform weights
  drawn for the seed, zero biases): a logistic output cannot be fit to one class (the loss
  falls as b2 grows without bound), and the gradients are then those of a random tanh
  network on x̃.
- `g_vendi_greedy`: pool selection that adds, one at a time, the candidate that raises the
  labelled set's Vendi score of order 2 most. VS₂ = 1/Σλ² = n²/‖S‖²_F with S = Σ x xᵀ over
  the set (the d×d form), and adding x gives ‖S + x xᵀ‖²_F = ‖S‖²_F + 2 xᵀSx + 1, so the gain
  needs only xᵀSx per candidate: computed once in O(m d²) for m candidates, then updated by
  (xᵀx*)² after each pick, O(m d) per step. Order 2 rather than Shannon because the Shannon
  gain needs each candidate's updated spectrum (a secular equation per candidate per step).
- `mmd_weights` (SynAlign, Ren et al., 2025, "Few-shot LLM Synthetic Data with
  Distribution Matching"): kernel mean matching (Huang et al., 2007): weights β minimising
  the MMD between the β-weighted synthetic rows and the real rows under a Gaussian kernel
  (median-heuristic bandwidth), min ½βᵀ(K + ρI)β - κᵀβ with κᵢ = (n_s/n_r) Σⱼ k(sᵢ, rⱼ) and
  0 ≤ β ≤ `bound`, solved with scipy's L-BFGS-B (bounds only, O(n_s²) per iteration), then
  rescaled to sum n_s. Two departures from plain KMM, both for synthetic rows that sit close
  together: the ridge ρ (default 1) spreads weight over rows alike, where unregularised KMM
  piles it on a few of them (a sparse, NNLS-like solution); and KMM's sum constraint
  |Σβ - n_s| ≤ n_s·ε is left to the rescaling, because held as an equality inside the solve
  it puts the missing mass on rows uncorrelated with the rest, which are the outliers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from tools.errors import DataError

log = logging.getLogger(__name__)


def _matrix(x: np.ndarray | Sequence[Sequence[float]], what: str) -> np.ndarray:
    out = np.asarray(x, dtype=np.float64)
    if out.ndim != 2 or not len(out):
        raise DataError(f"{what}: need a non-empty [n, d] array, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise DataError(f"{what}: contains NaN or infinite values")
    return out


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise DataError(f"{what}: row {zero[0]} is all zeros (no direction to compare)")
    return np.asarray(x / norms[:, None])


def _spectrum(x: np.ndarray) -> np.ndarray:
    """λ of K/n for unit rows x [n, d], from the smaller of X Xᵀ and Xᵀ X; sums to 1."""
    n, d = x.shape
    gram = x @ x.T if n <= d else x.T @ x
    lam = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    return np.asarray(lam / lam.sum())


def vendi_score(embeddings: np.ndarray | Sequence[Sequence[float]], *, q: float = 1.0) -> float:
    """The Vendi score of [n, d] rows (cosine similarity): between 1 (all rows alike) and
    min(n, d) (mutually orthogonal rows). `q`: its order (1: Shannon; q > 0)."""
    if q <= 0:
        raise DataError(f"vendi_score: order q must be > 0, got {q}")
    lam = _spectrum(_unit(_matrix(embeddings, "vendi_score"), "vendi_score"))
    lam = lam[lam > 0]
    if q == 1:
        from scipy.special import entr

        return float(np.exp(entr(lam).sum()))
    if np.isinf(q):
        return float(1.0 / lam.max())
    return float(np.sum(lam**q) ** (1.0 / (1.0 - q)))


class Head(NamedTuple):
    """The proxy: a one-hidden-layer tanh head on standardised frozen features,
    p(y = 1 | x) = σ(w2·tanh(W1 x̃ + b1) + b2), x̃ = (x - mean) / scale."""

    mean: np.ndarray  # [d]
    scale: np.ndarray  # [d]
    w1: np.ndarray  # [H, d]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H]
    b2: float

    def logit(self, features: np.ndarray) -> np.ndarray:
        """[n] the head's logits of [n, d] feature rows (p(y = 1) = σ(logit))."""
        return _forward(features, np.zeros(len(features)), self, 0, "Head.logit").logit


def _labels(labels: Sequence[int] | np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.isin(y, (0, 1)).all():
        raise DataError(f"{what}: need one 0/1 label per row ({n} rows), got shape {y.shape}")
    return y.astype(np.float64)


FIT_ITERATIONS = 500
"""L-BFGS iterations of `fit_head` at most (it usually stops earlier, at its tolerance)."""


def fit_head(features: np.ndarray, labels: Sequence[int] | np.ndarray, *, c: float = 1.0,
             seed: int = 0, hidden: int = 32) -> Head:
    """The proxy on [n, d] features: standardised by their own mean and std, then a tanh
    layer of `hidden` units and a logistic output, fit with L-BFGS (scikit-learn's
    MLPClassifier) under an L2 penalty of strength 1/`c` on the weights (as
    LogisticRegression's C). With one label only, the head at its seeded initialisation."""
    x = _matrix(features, "fit_head")
    y = _labels(labels, len(x), "fit_head")
    if hidden < 1 or c <= 0:
        raise DataError(f"fit_head: need hidden >= 1 and c > 0, got {hidden}, {c}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    scale = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, 1.0)  # constant: 1
    d = x.shape[1]
    if len(np.unique(y)) < 2:  # Glorot-uniform weights (as MLPClassifier's), zero biases
        rng = np.random.default_rng(seed)
        w1 = rng.uniform(-1.0, 1.0, (hidden, d)) * np.sqrt(6.0 / (d + hidden))
        w2 = rng.uniform(-1.0, 1.0, hidden) * np.sqrt(6.0 / (hidden + 1))
        return Head(mean, scale, w1, np.zeros(hidden), w2, 0.0)
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    model = MLPClassifier(hidden_layer_sizes=(hidden,), activation="tanh", solver="lbfgs",
                          alpha=1.0 / c, max_iter=FIT_ITERATIONS, random_state=seed)
    # one BLAS thread: L-BFGS-B's many small vector operations slow down by an order of
    # magnitude or more with a thread pool on busy cores; its matrix products here are small
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit((x - mean) / scale, y.astype(int))
    if model.n_iter_ >= FIT_ITERATIONS:
        log.debug("fit_head: L-BFGS stopped at %d iterations (loss %.4g)", model.n_iter_,
                  model.loss_)
    (w1t, w2c), (b1, b2) = model.coefs_, model.intercepts_  # [d, H], [H, 1]; [H], [1]
    return Head(mean, scale, np.array(w1t.T, dtype=np.float64), np.array(b1, dtype=np.float64),
                np.array(w2c[:, 0], dtype=np.float64), float(b2[0]))


class _Pass(NamedTuple):
    """A head's forward pass over rows, and what their log-loss gradients need."""

    x: np.ndarray  # [n, d] standardised rows
    h: np.ndarray  # [n, H] hidden units
    logit: np.ndarray  # [n]
    residual: np.ndarray  # [n] p - y = dL/dlogit
    a: np.ndarray  # [n, H] dL/d(W1 x̃ + b1) = (p - y) w2 ⊙ (1 - h²)


def _forward(features: np.ndarray, labels: Sequence[int] | np.ndarray, head: Head | None,
             seed: int, what: str) -> _Pass:
    x = _matrix(features, what)
    y = _labels(labels, len(x), what)
    head = head if head is not None else fit_head(x, y, seed=seed)
    if head.w1.shape[1] != x.shape[1]:
        raise DataError(f"{what}: a head for {head.w1.shape[1]} features, rows have "
                        f"{x.shape[1]}")
    from scipy.special import expit

    xs = (x - head.mean) / head.scale
    h = np.tanh(xs @ head.w1.T + head.b1)
    logit = h @ head.w2 + head.b2
    # p - y without cancellation: σ(z) for y = 0, -σ(-z) for y = 1 (never exactly 0 where
    # 1 - σ(z) would round to 0 for a confident row)
    residual = np.where(y == 1, -expit(-logit), expit(logit))
    return _Pass(xs, h, logit, residual, residual[:, None] * head.w2 * (1.0 - h * h))


def head_gradients(features: np.ndarray, labels: Sequence[int] | np.ndarray, *,
                   head: Head | None = None, seed: int = 0) -> np.ndarray:
    """[n, H·d + 2H + 1] exact per-row gradients of the head's log loss, w.r.t. its
    parameters in the order vec(W1) (row-major: unit by unit), b1, w2, b2. Memory n·H·d:
    for small sets (tests, inspection); `gradient_embeddings` projects without forming it."""
    f = _forward(features, labels, head, seed, "head_gradients")
    dw1 = (f.a[:, :, None] * f.x[:, None, :]).reshape(len(f.x), -1)
    return np.hstack([dw1, f.a, f.residual[:, None] * f.h, f.residual[:, None]])


@lru_cache(maxsize=4)
def _projection(d: int, hidden: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed Rademacher projection P [H·d + 2H + 1, dim], entries ±1/√dim, rows in
    `head_gradients`' order, as two read-only blocks: W1's rows laid out [d, H·dim]
    (element [j, h·dim + k] = P[h·d + j, k], for one matrix product per row chunk), and the
    other 2H + 1 rows [2H + 1, dim] as they are."""
    rng = np.random.default_rng(seed)
    rows = hidden * d + 2 * hidden + 1
    p = (2.0 * rng.integers(0, 2, size=(rows, dim), dtype=np.int8) - 1.0) / np.sqrt(dim)
    w1 = np.ascontiguousarray(p[: hidden * d].reshape(hidden, d, dim).transpose(1, 0, 2))
    rest = p[hidden * d:]
    w1, rest = w1.reshape(d, hidden * dim), np.ascontiguousarray(rest)
    w1.setflags(write=False)
    rest.setflags(write=False)
    return w1, rest


CHUNK_VALUES = 1 << 22
"""Floats of one row chunk's [rows, H, dim] intermediate in `gradient_embeddings` (32 MiB)."""


def gradient_embeddings(features: np.ndarray, labels: Sequence[int] | np.ndarray, *,
                        dim: int = 256, seed: int = 0, head: Head | None = None) -> np.ndarray:
    """[n, dim] unit-normalised per-row gradients of the head's log loss w.r.t. (W1, b1,
    w2, b2), randomly projected (the same `dim` and `seed`: the same projection), i.e. the
    rows of `head_gradients(...) @ P`, normalised. `head`: the proxy (default:
    `fit_head(features, labels, seed=seed)`); pass one head to embed new rows comparably.
    W1's block is projected as Σ_h a_h (x̃ᵀ P_h), P_h the [d, dim] slice of unit h, so
    the [n, H·d] gradients are never formed; rows go in chunks of `CHUNK_VALUES`."""
    if dim < 1:
        raise DataError(f"gradient_embeddings: dim must be >= 1, got {dim}")
    f = _forward(features, labels, head, seed, "gradient_embeddings")
    (n, d), hidden = f.x.shape, f.h.shape[1]
    p_w1, p_rest = _projection(d, hidden, dim, seed)
    rest = np.hstack([f.a, f.residual[:, None] * f.h, f.residual[:, None]])  # b1, w2, b2
    out = rest @ p_rest
    step = max(1, CHUNK_VALUES // (hidden * dim))
    for i in range(0, n, step):
        t = (f.x[i:i + step] @ p_w1).reshape(-1, hidden, dim)  # [c, H, dim]: x̃ᵀ P_h
        out[i:i + step] += np.matmul(f.a[i:i + step, None, :], t)[:, 0]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.asarray(out / np.where(norms > 0, norms, 1.0))


def g_vendi(features: np.ndarray, labels: Sequence[int] | np.ndarray, *, dim: int = 256,
            seed: int = 0, head: Head | None = None, q: float = 1.0) -> float:
    """G-Vendi of a labelled set: `vendi_score` of its `gradient_embeddings`."""
    return vendi_score(gradient_embeddings(features, labels, dim=dim, seed=seed, head=head),
                       q=q)


def g_vendi_greedy(embeddings: np.ndarray, candidates: Sequence[int],
                   labelled: Sequence[int], k: int) -> list[int]:
    """`k` of `candidates` (row indices of `embeddings`, [N, d]), in the order picked: each
    the one that raises the Vendi score (order 2) of the `labelled` rows plus those picked so
    far most (ties: the earlier candidate). See the module doc for the update."""
    x = _unit(_matrix(embeddings, "g_vendi_greedy"), "g_vendi_greedy")
    cand = np.asarray(list(candidates), dtype=np.int64)
    have = np.asarray(list(labelled), dtype=np.int64)
    for name, idx in (("candidates", cand), ("labelled", have)):
        if len(idx) and (idx.min() < 0 or idx.max() >= len(x)):
            raise DataError(f"g_vendi_greedy: {name} index out of range 0..{len(x) - 1}")
    if len(np.unique(cand)) != len(cand) or np.isin(cand, have).any():
        raise DataError("g_vendi_greedy: candidates must be distinct and not labelled")
    if not 0 <= k <= len(cand):
        raise DataError(f"g_vendi_greedy: k={k} outside 0..{len(cand)} (the candidates)")
    xc = x[cand]  # [m, d]
    scatter = x[have].T @ x[have]  # S = Σ x xᵀ over the labelled rows, [d, d]
    quad = np.einsum("md,de,me->m", xc, scatter, xc)  # xᵀ S x per candidate
    free = np.ones(len(cand), dtype=bool)
    picked: list[int] = []
    for _ in range(k):
        j = int(np.argmin(np.where(free, quad, np.inf)))  # max VS₂ = min ‖S + x xᵀ‖²_F
        picked.append(int(cand[j]))
        free[j] = False
        quad += (xc @ xc[j]) ** 2
    return picked


def median_bandwidth(x: np.ndarray, *, max_rows: int = 1000, seed: int = 0) -> float:
    """The median heuristic: the median pairwise Euclidean distance of the rows (of a fixed
    random `max_rows` of them when there are more); 0 when all rows are equal."""
    from scipy.spatial.distance import pdist

    x = _matrix(x, "median_bandwidth")
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    d = pdist(x) if len(x) > 1 else np.zeros(1)
    return float(np.median(d))


def gaussian_kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> np.ndarray:
    """[len(a), len(b)] exp(-‖a - b‖² / (2 bandwidth²))."""
    from sklearn.metrics.pairwise import rbf_kernel

    return np.asarray(rbf_kernel(a, b, gamma=1.0 / (2.0 * bandwidth**2)))


def mmd_weights(synthetic_features: np.ndarray, real_features: np.ndarray, *,
                bandwidth: float | None = None, bound: float = 10.0,
                ridge: float = 1.0) -> np.ndarray:
    """[n_s] non-negative weights of the synthetic rows, summing to n_s, that bring their
    weighted kernel mean embedding closest (MMD) to the real rows' (kernel mean matching,
    see the module doc). `bandwidth`: of the Gaussian kernel (default: the median heuristic
    over both sets together); `bound`: the largest weight of one row before the rescaling;
    `ridge`: added to the kernel matrix's diagonal (of ones).
    Rows near the real distribution get more than 1, rows far from every real row about 0;
    a DataError when every row is that far."""
    from scipy.optimize import minimize

    s = _matrix(synthetic_features, "mmd_weights (synthetic)")
    r = _matrix(real_features, "mmd_weights (real)")
    if s.shape[1] != r.shape[1]:
        raise DataError(f"mmd_weights: synthetic rows have {s.shape[1]} features, real rows "
                        f"{r.shape[1]}")
    n = len(s)
    if bound <= 0 or ridge < 0:
        raise DataError(f"mmd_weights: need bound > 0 and ridge >= 0, got {bound}, {ridge}")
    sigma = median_bandwidth(np.vstack([s, r])) if bandwidth is None else bandwidth
    if sigma <= 0:  # every row the same point: nothing to re-weight
        return np.ones(n)
    k = gaussian_kernel(s, s, sigma) + ridge * np.eye(n)
    kappa = gaussian_kernel(s, r, sigma).sum(axis=1) * (n / len(r))
    scale = 1.0 / n  # keeps the objective's gradient O(1) for the solver's tolerances

    def objective(beta: np.ndarray) -> tuple[float, np.ndarray]:
        kb = k @ beta
        return float(scale * (0.5 * beta @ kb - kappa @ beta)), scale * (kb - kappa)

    res = minimize(objective, np.ones(n), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, bound)] * n, options={"maxiter": 1000})
    if not res.success:
        log.warning("mmd_weights: L-BFGS-B stopped early (%s); using its last weights",
                    res.message)
    beta = np.clip(res.x, 0.0, bound)
    if beta.sum() <= 1e-12 * n:
        raise DataError("mmd_weights: no synthetic row lies near the real rows (every weight "
                        "is 0); check the features or pass a wider bandwidth")
    return np.asarray(beta * (n / beta.sum()))
