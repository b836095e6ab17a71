"""Content-addressed cache of per-text SAE activations.

One SQLite file per (model, SAE, hook, tokenisation settings) namespace; one row per
text, keyed by the SHA-256 of the text. A probe commits each batch in one transaction,
so a killed probe leaves every committed row whole and the rest simply absent.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TextActs:
    """SAE activations of one text: every non-zero (token, feature, value) triple.

    Token positions index the text's own token sequence (0 = first token fed to the
    model). Only positions the probe counts (not padding, the first position or chat-
    template tokens) appear. `pooled` is the mean layer residual over those positions.
    """

    n_tokens: int
    pos: np.ndarray  # int32 [nnz]
    feat: np.ndarray  # int32 [nnz]
    val: np.ndarray  # float32 [nnz]
    pooled: np.ndarray  # float32 [d_model]


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class ActivationCache:
    """Rows of `TextActs` keyed by text hash, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS acts (key BLOB PRIMARY KEY, n_tokens INTEGER,"
            " pos BLOB, feat BLOB, val BLOB, pooled BLOB)"
        )
        self._db.commit()

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, TextActs]:
        found: dict[bytes, TextActs] = {}
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 500):  # SQLite caps bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, n_tokens, pos, feat, val, pooled FROM acts WHERE key IN ({marks})",
                chunk,
            )
            for key, n, pos, feat, val, pooled in rows:
                found[key] = TextActs(
                    n_tokens=n,
                    pos=np.frombuffer(pos, dtype=np.int32),
                    feat=np.frombuffer(feat, dtype=np.int32),
                    val=np.frombuffer(val, dtype=np.float32),
                    pooled=np.frombuffer(pooled, dtype=np.float32),
                )
        return found

    def put_many(self, items: Mapping[bytes, TextActs]) -> None:
        """Insert rows in one transaction (all or none)."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO acts VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        key,
                        a.n_tokens,
                        a.pos.astype(np.int32).tobytes(),
                        a.feat.astype(np.int32).tobytes(),
                        a.val.astype(np.float32).tobytes(),
                        a.pooled.astype(np.float32).tobytes(),
                    )
                    for key, a in items.items()
                ],
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM acts").fetchone()[0])

    def close(self) -> None:
        self._db.close()
