"""Numerical tolerances from the arithmetic, not from a run that passed.

Two fp32 computations of the same quantity that differ only in summation order (another
batch shape, another length bucket, another CPU's kernels) agree to within the rounding
error of the reductions on the path. For a dot product of length n, each order's result
is within gamma_n * sum_i |x_i y_i| of the exact value (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., eq. 3.5), with unit roundoff u = 2^-24 and
gamma_n = n u / (1 - n u); two orders therefore differ by at most 2 gamma_n sum_i |x_i y_i|.

A forward pass is a chain of such reductions: to first order their errors add, so for a
value at the end of a chain (an SAE activation after L transformer blocks) n is the sum of
the reduction lengths along the chain (`path_reduction`: each block's widest reduction,
its MLP's intermediate size, plus the SAE encoder's d_in). We bound sum_i |x_i y_i| by the
scale of the values compared (the largest |value| of the reference): an assumption
(cancellation can make the sum of magnitudes exceed the result), which the generous n
covers. The bound is loose by design: a real bug (a padding token leaking into a mean, a
wrong position mask, a dropped token) moves values by a large fraction of their scale, far
above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UNIT_ROUNDOFF = 2.0**-24
"""u for IEEE fp32 (round to nearest): half the machine epsilon 2^-23."""


def gamma(n: int, u: float = UNIT_ROUNDOFF) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term fp sum."""
    if n < 1:
        raise ValueError(f"a reduction has at least one term, got n={n}")
    if n * u >= 1:
        raise ValueError(f"n={n} is too long for a meaningful bound at u={u:g}")
    return n * u / (1 - n * u)


def fp32_tolerance(n: int, scale: float) -> float:
    """Absolute tolerance between two fp32 evaluations of the same values in different
    summation orders: 2 gamma_n * scale (see the module doc)."""
    return 2.0 * gamma(n) * float(scale)


def assert_close_fp32(got: np.ndarray, want: np.ndarray, n: int,
                      scale: float | None = None) -> float:
    """`got` equals `want` up to `fp32_tolerance(n, scale)` (scale defaults to max |want|);
    returns the tolerance used, so a test can report it."""
    want = np.asarray(want)
    s = float(np.max(np.abs(want))) if scale is None and want.size else float(scale or 0.0)
    tol = fp32_tolerance(n, s)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    return tol


def path_reduction(model_config: object, layers: int, extra: Sequence[int] = ()) -> int:
    """The summed reduction length of `layers` transformer blocks (each counted at its
    widest inner dimension: hidden or MLP intermediate size) plus `extra` reductions after
    them (an SAE encoder's d_in); see the module doc."""
    dims = [int(getattr(model_config, name)) for name in ("hidden_size", "intermediate_size")
            if getattr(model_config, name, None)]
    return layers * max([*dims, 1]) + sum(extra)
