"""The label gate: a synthetic sample's label is a claim to check, never just what was asked
for (a "toxic" request the 135M generator answers with "The AI Code is designed to prevent
harm" is not toxic).

Two checks, both before a sample is kept:
- refusals ("I'm sorry, I can't ...") are dropped everywhere (`is_refusal`; the verifier
  rejects them with reason `refusal`);
- detector consistency (`consistent`): the current detector's score of a sample must lie
  inside the range of real rows of the label it claims: for label 1, at or above the
  `quantile` (default 25th percentile) of the real positives' scores; for label 0, at or
  below the (1 - quantile) of the real negatives'. A disputed sample is dropped with reason
  `label_disputed`, never relabelled. The real rows are the anchor's, which the detector
  never trained on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tools.errors import DataError

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i can'?t|i cannot|i won'?t|"
    r"i will not|i'?m not able|i am not able|i'?m unable|i am unable|as an ai\b)",
    re.IGNORECASE,
)


class LabelGateSettings(BaseModel):
    """Which label check synthetic samples must pass (`off` keeps the claimed label)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    judge: Literal["detector", "off"] = Field(
        "detector", description="detector: the current detector's score must look like real "
        "rows of the claimed label; off: no check (refusals are dropped regardless)")
    quantile: float = Field(
        0.25, ge=0, le=0.5, description="label 1 needs a score >= this quantile of the real "
        "positives' scores; label 0 a score <= the (1 - this) quantile of the negatives'")


def is_refusal(text: str) -> bool:
    """True for a reply that declines instead of writing a sample."""
    return bool(_REFUSAL.match(text))


def consistent(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int],
    real_scores: Sequence[float] | np.ndarray, real_labels: Sequence[int], quantile: float,
) -> np.ndarray:
    """[n] bool: each sample's score lies inside the range of real rows of its label (see
    the module doc). A label the real rows never carry cannot be checked: DataError."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels)
    rs, ry = np.asarray(real_scores, dtype=float), np.asarray(real_labels)
    ok = np.zeros(len(s), dtype=bool)
    for label in (0, 1):
        mine = y == label
        if not mine.any():
            continue
        real = rs[ry == label]
        if len(real) == 0:
            raise DataError(f"no real rows labelled {label} to check synthetic label-{label} "
                            "samples against; the anchor needs both labels")
        if label == 1:
            ok[mine] = s[mine] >= np.quantile(real, quantile)
        else:
            ok[mine] = s[mine] <= np.quantile(real, 1 - quantile)
    return ok
