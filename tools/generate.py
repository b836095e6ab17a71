"""Targeted generator: new samples aimed at one missing feature each.

For every target (a feature's summary, 2-3 of its top spans and the label it should carry)
the generator asks an LLM for one message per request, n requests per feature at
temperature T with distinct seeds, at most `concurrency` requests in flight. Transient
failures (timeouts, 429, 5xx) are retried with exponential backoff; anything else fails
loudly. Each sample carries its provenance for the verifier and the run store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Protocol

from pydantic import BaseModel, Field

from prompts import render, unfence
from tools.errors import FacsynthError
from tools.verify import Provenance, Sample

log = logging.getLogger(__name__)

PROMPT = "generate_toxicity.v3"
SYSTEM = "You write realistic messages that people send to chatbots, as they would type them."


class TransientLLMError(FacsynthError):
    """A failure worth retrying: timeout, rate limit (429) or server error (5xx)."""


class AsyncChatClient(Protocol):
    name: str

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str: ...


class Target(BaseModel):
    feature: int
    summary: str
    spans: list[str] = Field(default_factory=list)
    label: int = Field(1, description="the label asked for (a claim the label gate checks)")
    host: str | None = Field(
        None, description="a real anchor row of this label to rewrite so it carries the "
        "feature's theme (grounded generation); None: write from scratch")
    n: int | None = Field(
        None, ge=1, description="requests for this target; None: GenerateSettings.per_feature")


class SamplingSettings(BaseModel):
    """How requests to a generator LLM are sampled, run and retried (targeted generation
    and the baseline synthesizers alike)."""

    temperature: float = Field(0.8, ge=0, le=2)
    concurrency: int = Field(8, ge=1)
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each time")
    seed: int = 0
    round: int = 0


class GenerateSettings(SamplingSettings):
    per_feature: int = Field(2, ge=1, description="samples per missing feature")


def clean(reply: str) -> str:
    """The message itself: no wrapping quotes, no 'Message:' style preamble, no echoed data
    fence."""
    text = unfence(reply).strip()
    first, sep, rest = text.partition(":")
    if sep and len(first.split()) <= 3 and first.lower().rstrip() in {
        "message", "user", "user message", "sample", "here is the message", "prompt",
    }:
        text = rest.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


async def with_backoff(
    call: Callable[[], Awaitable[str]], retries: int, backoff_s: float,
    sleep: Callable[[float], Awaitable[None]],
) -> str:
    """`call()`, retried on TransientLLMError up to `retries` times with exponential
    backoff (backoff_s, 2x, 4x ... plus up to 10% jitter); the last error is re-raised."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except TransientLLMError as e:
            if attempt == retries:
                raise
            delay = backoff_s * 2**attempt * (1 + 0.1 * random.random())
            log.info("transient LLM error (%s); retrying in %.1fs", e, delay)
            await sleep(delay)
    raise AssertionError("unreachable")


SEED_BITS = 52
"""Request seeds stay below 2**52: exact in JSON doubles, accepted by every server."""


def job_seed(settings: GenerateSettings, feature: int, k: int) -> int:
    """The seed of the k-th request for a feature: also the sample's identity in a run. A
    hash of (base seed, feature, k): the old `seed * 1_000_003 + feature * 101 + k` collided
    as soon as k passed 101 (a large per-feature budget)."""
    digest = hashlib.sha256(f"{settings.seed}:{feature}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


async def agenerate(
    targets: Sequence[Target],
    client: AsyncChatClient,
    settings: GenerateSettings | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    *,
    skip: Container[int] = (),
    on_sample: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """`per_feature` samples for every target, in target order, leaving out requests whose
    seed is in `skip` (already done by an interrupted run). `on_sample` sees each sample as
    soon as it arrives (the loop journals it)."""
    settings = settings or GenerateSettings()
    gate = asyncio.Semaphore(settings.concurrency)

    async def one(target: Target, k: int) -> Sample:
        seed = job_seed(settings, target.feature, k)
        user = render(PROMPT, summary=target.summary, spans=target.spans[:3], label=target.label)
        async with gate:
            reply = await with_backoff(
                lambda: client.achat(SYSTEM, user, temperature=settings.temperature, seed=seed),
                settings.retries, settings.backoff_s, sleep,
            )
        sample = Sample(text=clean(reply), label=target.label, provenance=Provenance(
            feature=target.feature, round=settings.round, generator=client.name,
            prompt_version=PROMPT, temperature=settings.temperature, seed=seed,
        ))
        if on_sample:
            on_sample(sample)
        return sample

    seeds = [job_seed(settings, t.feature, k)
             for t in targets for k in range(settings.per_feature)]
    if len(set(seeds)) != len(seeds):  # ~1e-8 for 10^4 requests; never silently merge two
        raise FacsynthError("two generation requests got the same seed; change --seed")
    jobs = [one(t, k) for t in targets for k in range(settings.per_feature)
            if job_seed(settings, t.feature, k) not in skip]
    return list(await asyncio.gather(*jobs))
