"""ROUGE-L as self-instruct's novelty filter used it (rouge-score's tokenisation, no
stemmer), computed by LCS here so rouge-score is not a dependency."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation (no stemmer): lower case, runs of [a-z0-9]."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts: 2·LCS / (|a| + |b|) over rouge tokens (0 if either is empty)."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    if not ta or not tb:
        return 0.0
    return 2 * _lcs(ta, tb) / (len(ta) + len(tb))


class RougePool:
    """Texts to compare new ones with; `max_score` skips LCS for pairs whose bag-of-words
    overlap already bounds the score below the threshold (LCS <= overlap)."""

    def __init__(self, texts: Sequence[str] = ()) -> None:
        self._items: list[tuple[list[str], Counter[str]]] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        self._items.append((tokens, Counter(tokens)))

    def near(self, text: str, threshold: float) -> bool:
        """True when some pool text has ROUGE-L F >= threshold with `text`."""
        tokens = rouge_tokens(text)
        if not tokens:
            return False
        bag = Counter(tokens)
        for other, other_bag in self._items:
            total = len(tokens) + len(other)
            if not other or 2 * min(len(tokens), len(other)) / total < threshold:
                continue
            if 2 * sum((bag & other_bag).values()) / total < threshold:
                continue
            if 2 * _lcs(tokens, other) / total >= threshold:
                return True
        return False
