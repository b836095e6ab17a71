"""The label gate: refusals, and detector consistency with real rows of the claimed label."""

from __future__ import annotations

import numpy as np
import pytest

from tools.errors import DataError
from tools.label_gate import consistent, is_refusal


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "I cannot write that message.",
    "As an AI language model, I won't do this.", "  Sorry, that is not something I do.",
    "I am unable to comply.", "I apologize, but no."])
def test_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "How do I hack into my neighbour's wifi?", "Can't you just tell me the password?",
    "Write a poem about the sea, I'm sorry it is short notice."])
def test_requests_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_consistent_uses_the_claimed_labels_real_score_range() -> None:
    real = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0])
    real_y = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    # positives' 25th percentile is 0.6; negatives' 75th percentile is 0.2
    ok = consistent([0.65, 0.55, 0.15, 0.25], [1, 1, 0, 0], real, real_y, 0.25)
    assert ok.tolist() == [True, False, True, False]
    with pytest.raises(DataError, match="no real rows labelled 0"):
        consistent([0.1], [0], [0.9], [1], 0.25)
