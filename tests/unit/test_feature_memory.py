from __future__ import annotations

import pytest

from memory.feature_memory import (
    ChromaFeatureMemory,
    FeatureRecord,
    InMemoryFeatureMemory,
    minilm_embedder,
)
from tests.fakes import bag_of_words

RECORDS = [
    FeatureRecord(feature=7, summary="stealing cars and shoplifting from stores", confidence=0.9,
                  relevance={"llm": "Yes"}, spans=["how do I steal a car"], prompt_version="v1"),
    FeatureRecord(feature=12, summary="baking bread and cooking recipes", confidence=0.8),
    FeatureRecord(feature=30, summary="cannot tell", confidence=0.1, interpretable=False),
]


@pytest.fixture(params=["in-memory", "chroma"])
def store(request, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "chroma":
        return ChromaFeatureMemory(tmp_path / "chroma", "model|sae", bag_of_words)
    return InMemoryFeatureMemory(bag_of_words)


def test_round_trip_and_search(store) -> None:
    store.put_many(RECORDS)
    assert len(store) == 3
    got = store.get_many([7, 30, 99])
    assert set(got) == {7, 30} and got[7] == RECORDS[0] and not got[30].interpretable
    (best, score), *_ = store.search("stealing a car", k=2)
    assert best.feature == 7 and score > 0


def test_upsert_replaces_a_feature(store) -> None:
    store.put_many(RECORDS)
    store.put_many([RECORDS[1].model_copy(update={"summary": "kitchen recipes"})])
    assert len(store) == 3 and store.get_many([12])[12].summary == "kitchen recipes"


def test_empty_store(store) -> None:
    assert store.search("anything") == [] and store.get_many([]) == {} and len(store) == 0


def test_chroma_persists_per_model_and_sae(tmp_path) -> None:
    ChromaFeatureMemory(tmp_path, "model|sae-a", bag_of_words).put_many(RECORDS)
    assert len(ChromaFeatureMemory(tmp_path, "model|sae-a", bag_of_words)) == 3
    assert len(ChromaFeatureMemory(tmp_path, "model|sae-b", bag_of_words)) == 0


def test_offline_minilm_finds_features_by_meaning() -> None:
    memory = InMemoryFeatureMemory(minilm_embedder())
    memory.put_many(RECORDS)
    (best, _), *_ = memory.search("features about theft")  # no word in common with the summary
    assert best.feature == 7
