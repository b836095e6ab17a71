"""What one compare shares across its seeds and methods: the LLM client, opened on first use
and counted per method, the label gate's disputes per method, and each text's features,
remembered (agent/compare.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tools.verify import Sample


class LazyOpen:
    """Stands for an LLM client that `opener()` makes on first attribute access."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = self._opener()
        return getattr(self._client, name)


class CountedLLM:
    """The LLM client, counting the requests a method makes (its cost per kept row)."""

    def __init__(self, client: Any, root: CountedLLM | None = None) -> None:
        self._client = client
        self._root = root
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in ("with_max_tokens", "with_json_schema"):  # its calls count here too
            return lambda *args, **kwargs: CountedLLM(attr(*args, **kwargs), self._root or self)
        if name not in ("chat", "achat", "complete", "acomplete", "complete_batch"):
            return attr
        counted = self._root or self

        if name.startswith("a"):
            async def acall(*args: Any, **kwargs: Any) -> Any:
                counted.calls += 1
                return await attr(*args, **kwargs)
            return acall

        def call(*args: Any, **kwargs: Any) -> Any:
            counted.calls += len(args[0]) if name == "complete_batch" else 1
            return attr(*args, **kwargs)
        return call


class CountedGate:
    """A label gate (row -> keep), counting the rows it disputes."""

    def __init__(self, gate: Callable[[Sample], bool]) -> None:
        self.gate = gate
        self.disputed = 0

    def __call__(self, row: Sample) -> bool:
        ok = self.gate(row)
        self.disputed += not ok
        return ok


class Remembered:
    """`features` with each text's row remembered: compare fits and scores the same pool,
    seed and eval texts many times (every method, round and curve point). `add` gives rows
    computed elsewhere (the ray engine's shards)."""

    def __init__(self, features: Callable[[Sequence[str]], np.ndarray]) -> None:
        self.features = features
        self.rows: dict[str, np.ndarray] = {}

    def add(self, texts: Sequence[str], rows: np.ndarray) -> None:
        self.rows.update(zip(texts, rows, strict=True))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.rows))
        if todo:
            self.add(todo, self.features(todo))
        if not texts:
            return self.features(texts)  # its own error for an empty request
        return np.stack([self.rows[t] for t in texts])
