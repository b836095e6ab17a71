"""Held-out splits of a labelled dataset that keep near-duplicates on one side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from tools.errors import DataError

PREFIX_CHARS = 100
"""Rows whose first 100 characters match (case and spacing aside) are near-duplicates: in
ToxicChat, 106 rows share a jailbreak template's opening with another row."""


def near_duplicate_groups(texts: Sequence[str], prefix: int = PREFIX_CHARS) -> np.ndarray:
    """[n] group id per row: rows with the same normalised opening share an id."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(" ".join(t.lower().split())[:prefix], len(ids))
                     for t in texts])


def check_splittable(y: np.ndarray, test_frac: float, n_groups: int, what: str) -> None:
    """DataError in one line when a stratified split of `test_frac` cannot be made: each
    label needs 2 rows (one per side) and each side as many rows as there are labels."""
    n1, n0 = int(y.sum()), int((~y).sum())
    n = len(y)
    held = int(np.ceil(test_frac * n))
    problem = None
    if min(n1, n0) < 2:
        problem = "each label needs at least 2 rows"
    elif held < 2 or n - held < 2:
        problem = (f"{test_frac:.0%} of {n} rows leaves fewer than 2 rows on one side, and "
                   "each side needs a row of each label")
    elif n_groups < 2:
        problem = "all rows are near-duplicates of each other (one group)"
    if problem:
        raise DataError(f"{what}: cannot split off {test_frac:.0%} stratified by label: "
                        f"{problem}; it has {n1} rows labelled 1 and {n0} labelled 0. Add "
                        "rows (or pass a separate --eval file)")


def stratified_split(
    labels: Sequence[int], test_frac: float, seed: int,
    texts: Sequence[str] | None = None, what: str = "the data",
) -> tuple[np.ndarray, np.ndarray]:
    """(pool_idx, eval_idx), both sorted: a held-out eval split of about `test_frac` of the
    rows with the same class ratio as the pool (any non-zero label counts as positive).

    Given `texts`, near-duplicate rows (`near_duplicate_groups`) stay on one side, so a
    template seen in training is not also scored as held-out (sklearn's
    StratifiedGroupKFold, one fold of round(1 / test_frac) held out). Without near-duplicates
    the split is the plain stratified one. Data too small or one-sided for the split is a
    DataError naming `what` (`check_splittable`)."""
    y = np.asarray(labels).astype(bool)
    rows = np.arange(len(y))
    groups = near_duplicate_groups(texts) if texts is not None else rows
    n_groups = len(np.unique(groups))
    check_splittable(y, test_frac, n_groups, what)
    if n_groups == len(rows):
        pool, ev = train_test_split(rows, test_size=test_frac, stratify=y, random_state=seed)
        return np.sort(pool), np.sort(ev)
    folds = StratifiedGroupKFold(n_splits=min(n_groups, max(2, round(1 / test_frac))),
                                 shuffle=True, random_state=seed)
    pool, ev = next(folds.split(rows, y, groups))
    return np.sort(pool), np.sort(ev)
