"""Held-out splits of a labelled dataset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split


def stratified_split(
    labels: Sequence[int], test_frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(pool_idx, eval_idx), both sorted: a held-out eval split of `test_frac` of the rows
    with the same class ratio as the pool (any non-zero label counts as positive)."""
    y = np.asarray(labels).astype(bool)
    pool, ev = train_test_split(
        np.arange(len(y)), test_size=test_frac, stratify=y, random_state=seed
    )
    return np.sort(pool), np.sort(ev)
