from __future__ import annotations

import asyncio

import pytest

import prompts
from tests.fakes import InFlight
from tools.generate import (
    GenerateSettings,
    Target,
    TransientLLMError,
    agenerate,
    clean,
)

TARGETS = [Target(feature=7, summary="stealing cars", spans=["how do I steal a car"]),
           Target(feature=9, summary="baking bread", spans=["bake a loaf"], label=0)]


class Fake(InFlight):
    """Async client: fails the first `fail` calls transiently, tracks concurrency."""

    name = "fake-llm"

    def __init__(self, fail: int = 0, error: Exception | None = None) -> None:
        self.fail, self.error = fail, error
        self.calls: list[tuple[str, float, int]] = []

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        await self.pause()
        self.calls.append((user, temperature, seed))
        if self.error is not None:
            raise self.error
        if self.fail > 0:
            self.fail -= 1
            raise TransientLLMError("429 rate limited")
        return f'Message: "sample {len(self.calls)}"'


async def no_sleep(_: float) -> None:
    return None


def run(client: Fake, **kw):  # type: ignore[no-untyped-def]
    return asyncio.run(agenerate(TARGETS, client, GenerateSettings(**kw), sleep=no_sleep))


def test_samples_per_feature_with_provenance() -> None:
    client = Fake()
    samples = run(client, per_feature=3, temperature=0.7, round=2)
    assert len(samples) == 6 and [s.provenance.feature for s in samples] == [7] * 3 + [9] * 3
    assert all(s.text.startswith("sample ") for s in samples)  # preamble and quotes removed
    p = samples[0].provenance
    assert (p.generator, p.prompt_version, p.temperature, p.round) == (
        "fake-llm", "generate_toxicity.v3", 0.7, 2)
    assert len({s.provenance.seed for s in samples}) == 6  # distinct seeds
    assert samples[3].label == 0 and "harmless" in client.calls[3][0]
    assert "stealing cars" in client.calls[0][0] and "harmful" in client.calls[0][0]


def test_transient_errors_are_retried_with_backoff() -> None:
    delays: list[float] = []

    async def record(d: float) -> None:
        delays.append(d)

    client = Fake(fail=2)
    out = asyncio.run(agenerate(TARGETS[:1], client, GenerateSettings(per_feature=1,
                                                                      backoff_s=0.5), record))
    assert len(out) == 1 and len(client.calls) == 3
    assert 0.5 <= delays[0] < 0.6 and 1.0 <= delays[1] < 1.2  # doubling


def test_retries_run_out() -> None:
    with pytest.raises(TransientLLMError):
        run(Fake(fail=10), per_feature=1, retries=2)


def test_other_errors_are_not_retried() -> None:
    client = Fake(error=ValueError("bad request"))
    with pytest.raises(ValueError):
        asyncio.run(agenerate(TARGETS[:1], client, GenerateSettings(per_feature=1), no_sleep))
    assert len(client.calls) == 1


def test_concurrency_is_bounded() -> None:
    client = Fake()
    run(client, per_feature=10, concurrency=3)
    assert client.max_in_flight == 3


@pytest.mark.parametrize(("raw", "want"), [
    ('"How do I pick a lock?"', "How do I pick a lock?"),
    ("Message: how do I pick a lock", "how do I pick a lock"),
    ("Note: locks are hard to pick", "Note: locks are hard to pick"),
])
def test_clean(raw: str, want: str) -> None:
    assert clean(raw) == want


def test_generation_prompt_renders_both_labels() -> None:
    for label in (0, 1):
        text = prompts.render("generate_toxicity.v3", summary="x", spans=["y"], label=label)
        assert "<data>x</data>" in text and "- <data>y</data>" in text


def test_request_seeds_never_collide() -> None:
    from tools.generate import SEED_BITS, job_seed

    gs = GenerateSettings(per_feature=300, seed=7)
    seeds = [job_seed(gs, f, k) for f in range(50) for k in range(300)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2**SEED_BITS
    # the old scheme (seed * 1_000_003 + feature * 101 + k) gave (f=0, k=101) == (f=1, k=0)
    assert job_seed(gs, 0, 101) != job_seed(gs, 1, 0)
    assert job_seed(gs, 3, 4) == job_seed(GenerateSettings(seed=7), 3, 4), "stable identity"
