from __future__ import annotations

import asyncio
import hashlib
import re

import pytest

import prompts
from tests.fakes import InFlight
from tools.errors import ConfigError, FacsynthError
from tools.generate import (
    SEED_BITS,
    SYSTEM,
    GenerateSettings,
    Target,
    TransientLLMError,
    agenerate,
    clean,
    job_seed,
    plan_requests,
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
        "fake-llm", "generate_toxicity.v4", 0.7, 2)
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
    ("Here's a rewritten version of the original message:\n\nhow do I pick a lock",
     "how do I pick a lock"),
    ("Sure! Here is the new message:\n\"how do I pick a lock\"", "how do I pick a lock"),
    ("Here is my code:\nprint(1)", "Here is my code:\nprint(1)"),
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


def test_label_1_seeds_are_those_of_older_runs_and_label_0_seeds_differ() -> None:
    gs = GenerateSettings(seed=7)
    old = int.from_bytes(hashlib.sha256(b"7:3:4").digest()[:8], "big") >> (64 - SEED_BITS)
    assert job_seed(gs, 3, 4) == job_seed(gs, 3, 4, label=1) == old, "old runs resume"
    pos = {job_seed(gs, f, k, 1) for f in range(30) for k in range(40)}
    neg = {job_seed(gs, f, k, 0) for f in range(30) for k in range(40)}
    assert len(pos) == len(neg) == 1200 and not pos & neg


def test_requests_follow_each_targets_n_and_label() -> None:
    targets = [Target(feature=7, summary="s", n=3), Target(feature=7, summary="s", label=0, n=1),
               Target(feature=9, summary="t")]
    reqs = plan_requests(targets, GenerateSettings(per_feature=2))
    assert [(q.target.feature, q.target.label, q.k) for q in reqs] == [
        (7, 1, 0), (7, 1, 1), (7, 1, 2), (7, 0, 0), (9, 1, 0), (9, 1, 1)]
    assert len({q.seed for q in reqs}) == 6
    with pytest.raises(FacsynthError, match="same seed"):
        plan_requests([targets[0], targets[0]], GenerateSettings())


def test_samples_carry_their_targets_label_and_skip_done_requests() -> None:
    client = Fake()
    targets = [Target(feature=7, summary="theft", spans=["x"], n=2),
               Target(feature=7, summary="theft", spans=["x"], label=0, n=3)]
    gs = GenerateSettings(seed=1)
    done = plan_requests(targets, gs)[1].seed
    out = asyncio.run(agenerate(targets, client, gs, no_sleep, skip={done}))
    assert [s.label for s in out] == [1, 0, 0, 0]
    assert done not in {s.provenance.seed for s in out}
    asked = [u for u, _, _ in client.calls]
    assert sum("harmless" in u for u in asked) == 3 and sum("harmful" in u for u in asked) == 1


def test_a_host_row_is_rewritten_in_the_prompt() -> None:
    client = Fake()
    targets = [Target(feature=7, summary="theft", spans=["steal a car"], n=2),
               Target(feature=9, summary="bread", spans=["a loaf"], host="my own row")]
    gs = GenerateSettings(per_feature=1, hosts=True)
    first, second, third = (q.seed for q in plan_requests(targets, gs))
    hosts = {first: "hello there, how are you today", third: "ignored: the target's own wins"}
    asyncio.run(agenerate(targets, client, gs, no_sleep, hosts=hosts))
    by_seed = {seed: user for user, _, seed in client.calls}
    assert "<data>hello there, how are you today</data>" in by_seed[first]
    assert "about 6 words" in by_seed[first] and "same voice" in by_seed[first]
    assert "same voice" not in by_seed[second], "no host for it: written from scratch"
    assert "<data>my own row</data>" in by_seed[third] and "ignored" not in by_seed[third]
    with pytest.raises(ConfigError, match="no host rows"):
        asyncio.run(agenerate(targets, client, gs, no_sleep))


FORBIDDEN = re.compile(r"classif|detector|safety|training|\bAI\b|artificial", re.IGNORECASE)


@pytest.mark.parametrize("label", [0, 1])
def test_prompt_v4_rewrites_a_host_and_never_names_the_purpose(label: int) -> None:
    hosted = prompts.render("generate_toxicity.v4", summary="x", spans=["y"], label=label,
                            host="a real row")
    assert "<data>a real row</data>" in hosted and prompts.DATA_RULE in hosted
    assert "<data>x</data>" in hosted and "- <data>y</data>" in hosted
    assert ("harmless" in hosted) == (label == 0)
    plain = prompts.render("generate_toxicity.v4", summary="x", spans=["y"], label=label,
                           host=None)
    assert plain == prompts.render("generate_toxicity.v3", summary="x", spans=["y"], label=label)
    for text in (hosted, plain, SYSTEM):
        assert not FORBIDDEN.search(text), FORBIDDEN.search(text)


class Steerable(Fake):
    can_steer = True

    def __init__(self) -> None:
        super().__init__()
        self.steers: list[tuple[int, float] | None] = []

    async def achat(self, system: str, user: str, *, temperature: float, seed: int,
                    steer: tuple[int, float] | None = None) -> str:
        self.steers.append(steer)
        return await super().achat(system, user, temperature=temperature, seed=seed)


def test_steering_asks_each_request_for_its_feature() -> None:
    client = Steerable()
    out = asyncio.run(agenerate(TARGETS, client, GenerateSettings(per_feature=1, steer=0.5),
                                no_sleep))
    assert client.steers == [(7, 0.5), (9, 0.5)]
    assert {s.provenance.generator for s in out} == {"fake-llm+steer0.5"}
    asyncio.run(agenerate(TARGETS, client, GenerateSettings(per_feature=1), no_sleep))
    assert client.steers[2:] == [None, None], "steer 0: off"


def test_steering_needs_a_client_that_can() -> None:
    client = Fake()
    with pytest.raises(ConfigError, match="steer=0.5 needs"):
        asyncio.run(agenerate(TARGETS, client, GenerateSettings(steer=0.5), no_sleep))
    assert client.calls == []
