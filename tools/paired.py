"""Paired comparisons over seeds: each method's per-seed metric minus the reference's on the
same seed (same split, same seed set), with a t-based 95% interval of the mean difference.
Pairing removes the seed-to-seed variance every method shares (which seed rows were drawn),
so a small but consistent gain shows where the unpaired means overlap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel


class PairedDiff(BaseModel):
    """Mean of (method - reference) over seeds with its 95% interval."""

    mean: float
    low: float
    high: float
    n: int
    per_seed: list[float]

    @property
    def above_zero(self) -> bool:
        return self.low > 0

    def describe(self, scale: float = 100.0) -> str:
        """e.g. "+1.2 [-0.3, +2.7]" (in AUPRC points when scale is 100)."""
        if self.n < 2:
            return f"{scale * self.mean:+.1f} [n=1]"
        return f"{scale * self.mean:+.1f} [{scale * self.low:+.1f}, {scale * self.high:+.1f}]"


def paired_diff(values: Sequence[float], reference: Sequence[float],
                confidence: float = 0.95) -> PairedDiff:
    """Per-seed differences `values[i] - reference[i]`; the interval is the t interval of
    their mean (n - 1 degrees of freedom); with one seed it is the point itself."""
    from scipy.stats import t

    if len(values) != len(reference) or not values:
        raise ValueError(f"paired_diff needs equal, non-empty lists ({len(values)} vs "
                         f"{len(reference)})")
    d = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedDiff(mean=mean, low=mean, high=mean, n=1, per_seed=d.tolist())
    half = float(t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return PairedDiff(mean=mean, low=mean - half, high=mean + half, n=len(d),
                      per_seed=d.tolist())
