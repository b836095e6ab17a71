"""Held-out splits of a labelled dataset that keep near-duplicates on one side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

PREFIX_CHARS = 100
"""Rows whose first 100 characters match (case and spacing aside) are near-duplicates: in
ToxicChat, 106 rows share a jailbreak template's opening with another row."""


def near_duplicate_groups(texts: Sequence[str], prefix: int = PREFIX_CHARS) -> np.ndarray:
    """[n] group id per row: rows with the same normalised opening share an id."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(" ".join(t.lower().split())[:prefix], len(ids))
                     for t in texts])


def stratified_split(
    labels: Sequence[int], test_frac: float, seed: int,
    texts: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pool_idx, eval_idx), both sorted: a held-out eval split of about `test_frac` of the
    rows with the same class ratio as the pool (any non-zero label counts as positive).

    Given `texts`, near-duplicate rows (`near_duplicate_groups`) stay on one side, so a
    template seen in training is not also scored as held-out (sklearn's
    StratifiedGroupKFold, one fold of round(1 / test_frac) held out). Without near-duplicates
    the split is the plain stratified one."""
    y = np.asarray(labels).astype(bool)
    rows = np.arange(len(y))
    groups = near_duplicate_groups(texts) if texts is not None else rows
    if len(np.unique(groups)) == len(rows):
        pool, ev = train_test_split(rows, test_size=test_frac, stratify=y, random_state=seed)
        return np.sort(pool), np.sort(ev)
    folds = StratifiedGroupKFold(n_splits=max(2, round(1 / test_frac)), shuffle=True,
                                 random_state=seed)
    pool, ev = next(folds.split(rows, y, groups))
    return np.sort(pool), np.sort(ev)
