"""The synthesis chain on the embedded model and the demo data, with a scripted LLM (the real
LLM backends have their own tests): coverage -> interpret -> generate -> verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory.feature_memory import InMemoryFeatureMemory
from tests.fakes import EchoLLM, bag_of_words
from tools.data import load_texts
from tools.generate import GenerateSettings
from tools.settings import Settings
from tools.synthesis import generate as run_generate
from tools.synthesis import interpret_missing, span_finder, verify_samples
from tools.workspace import Workspace

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def ws() -> Workspace:
    ws = Workspace(Settings())
    ws.__dict__["memory"] = InMemoryFeatureMemory(bag_of_words)
    return ws


def test_chain_on_demo_data(ws: Workspace) -> None:
    anchor = load_texts(EXAMPLES / "anchor.jsonl", require_labels=True)
    seed = load_texts(EXAMPLES / "seed.jsonl")
    report = ws.coverage(anchor, seed)
    assert report.missing and all(m.spans for m in report.missing[:3])
    llm = EchoLLM()

    found = interpret_missing(report, llm, ws, limit=3, relevance="auto",
                              score_with=(anchor.texts, span_finder(ws, anchor)))
    assert [f.record.feature for f in found.features] == [m.feature for m in report.missing[:3]]
    assert all(f.targeted and f.record.relevance["llm"] == "Yes" for f in found.features)
    assert found.agreement is not None and found.agreement.rate == 1.0
    assert all(0 <= f.record.scores["detection"] <= 1 for f in found.features)
    calls = llm.calls
    again = interpret_missing(report, llm, ws, limit=3, relevance="auto",
                              score_with=(anchor.texts, span_finder(ws, anchor)))
    assert llm.calls == calls, "features in memory are never re-interpreted, judged or scored"
    assert again.features == found.features

    samples = run_generate(found.targets, llm, GenerateSettings(per_feature=3))
    assert len(samples) == 9 and {s.provenance.generator for s in samples} == {"echo"}
    result = verify_samples(ws, anchor, seed, samples)
    assert set(result.per_feature) == {t.feature for t in found.targets}
    assert len(result.kept) + len(result.rejected) == 9
    reasons = {v.reason for v in result.rejected}
    assert "target_inactive" in reasons  # the chit-chat replies
    assert result.kept, "echoed top spans activate their feature"
    for v in result.kept:
        assert v.activation > 0 and v.sample.provenance.feature in result.per_feature


class MuddledLLM(EchoLLM):
    """Never produces valid JSON (like a 135M model on a bad day)."""

    def chat(self, system: str, user: str) -> str:
        self.calls += 1
        return "Sure! The feature is about {stuff"


def test_invalid_llm_answers_fall_back_to_spans(ws: Workspace) -> None:
    from tools.synthesis import FALLBACK

    anchor = load_texts(EXAMPLES / "anchor.jsonl", require_labels=True)
    report = ws.coverage(anchor, load_texts(EXAMPLES / "seed.jsonl"))
    ws.__dict__["memory"] = InMemoryFeatureMemory(bag_of_words)
    found = interpret_missing(report, MuddledLLM(), ws, limit=2, relevance="auto")
    assert found.failed == [m.feature for m in report.missing[:2]]
    assert all(f.targeted and f.record.prompt_version == FALLBACK for f in found.features)
    assert found.features[0].record.summary.startswith('text like "')
    assert len(ws.memory) == 0, "fallbacks are not remembered"
