"""Targeted generator: new samples aimed at one missing feature each.

For every target (a feature's summary, 2-3 of its top spans and the label it should carry)
the generator asks an LLM for one message per request, `n` requests per target at
temperature T with distinct seeds, at most `concurrency` requests in flight. Transient
failures (timeouts, 429, 5xx) are retried with exponential backoff; anything else fails
loudly. Each sample carries its provenance for the verifier and the run store.

Contrastive synthesis asks for both labels of one feature (a Target per (feature, label)):
positives, and hard negatives that share the theme. Grounding: a request may carry a *host*,
a real row of its label that the LLM rewrites so it carries the theme (the row's length,
tone and style come with it), and, on a client that can, SAE steering towards the feature
while sampling (`GenerateSettings.steer`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast

from pydantic import BaseModel, Field

from prompts import render, unfence
from tools.errors import ConfigError, FacsynthError
from tools.verify import Provenance, Sample

log = logging.getLogger(__name__)

PROMPT = "generate_toxicity.v4"
SYSTEM = "You write realistic messages that people send to chatbots, as they would type them."


class TransientLLMError(FacsynthError):
    """A failure worth retrying: timeout, rate limit (429) or server error (5xx)."""


class AsyncChatClient(Protocol):
    name: str

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str: ...


def longer_replies(client: Any, n: int) -> Any:
    """`client.with_max_tokens(n)`, replies of up to `n` tokens (a chain of thought before
    the answer), where the client offers it (the real backends), else the client itself."""
    longer = getattr(client, "with_max_tokens", None)
    return longer(n) if callable(longer) else client


def json_replies(client: Any, schema: dict[str, Any], name: str = "reply") -> Any:
    """`client.with_json_schema(schema, name)`, replies constrained to the JSON schema where
    the client offers it (agent.llm on vLLM: structured outputs), else the client itself."""
    constrain = getattr(client, "with_json_schema", None)
    return constrain(schema, name) if callable(constrain) else client


class SteeringChatClient(AsyncChatClient, Protocol):
    """A client that can steer a reply towards an SAE feature while sampling; it says so
    with `can_steer = True` (tools/local_llm.py `LocalChat` with an SAE)."""

    can_steer: bool

    async def achat(self, system: str, user: str, *, temperature: float, seed: int,
                    steer: tuple[int, float] | None = None) -> str: ...


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
    per_feature: int = Field(2, ge=1, description="requests per target without its own `n`")
    hosts: bool = Field(False, description="ground each request in a real row of its label "
                        "(the caller passes them to agenerate as `hosts`)")
    steer: float = Field(0.0, ge=0, description="steer each reply towards its target feature "
                         "with this scale (tools/local_llm.py says the unit); 0: off")
    generator: Literal["prompted", "adapted"] = Field(
        "prompted", description="prompted: an instruction LLM asked with the prompt file; "
        "adapted: the anchor's LoRA-adapted model (tools/adapted.py) continues a raw "
        "completion prompt; the caller picks the client and prompt (agenerate's `prompt`)")


PREAMBLE = re.compile(
    r"^\s*(?:sure|okay|ok|certainly|here(?:'s| is))\b[^\n:]{0,100}"
    r"\b(?:message|version|rewrite|rewritten|response)\b[^\n:]{0,60}:[ \t]*\n", re.IGNORECASE)
"""A small generator's opening line about its reply ("Here's a rewritten version of the
message:"), not part of the message."""


def clean(reply: str) -> str:
    """The message itself: no wrapping quotes, no 'Message:' style preamble or 'Here is the
    message:' line, no echoed data fence."""
    text = PREAMBLE.sub("", unfence(reply), count=1).strip()
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


def job_seed(settings: GenerateSettings, feature: int, k: int, label: int = 1) -> int:
    """The seed of the k-th request for a feature and label: also the sample's identity in a
    run. A hash of (base seed, feature, k), plus the label when it is not 1 (label-1 seeds
    stay those of runs from before contrastive synthesis, so they resume): the old
    `seed * 1_000_003 + feature * 101 + k` collided as soon as k passed 101."""
    key = f"{settings.seed}:{feature}:{k}" + ("" if label == 1 else f":label{label}")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


class Request(NamedTuple):
    """One generation request: the k-th for its target, and its seed (the sample's id)."""

    target: Target
    k: int
    seed: int


def plan_requests(targets: Sequence[Target], settings: GenerateSettings) -> list[Request]:
    """Every request for `targets`, in target order: `target.n` each (else `per_feature`).
    The one enumeration agenerate, the loop's journal checks and the fakes share."""
    out = [Request(t, k, job_seed(settings, t.feature, k, t.label))
           for t in targets for k in range(t.n or settings.per_feature)]
    if len({r.seed for r in out}) != len(out):
        # a feature listed twice with one label, or a hash collision (~1e-8 for 10^4
        # requests): never silently merge two samples into one identity
        raise FacsynthError("two generation requests got the same seed: list each "
                            "(feature, label) once, or change --seed")
    return out


async def agenerate(
    targets: Sequence[Target],
    client: AsyncChatClient,
    settings: GenerateSettings | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    *,
    skip: Container[int] = (),
    on_sample: Callable[[Sample], None] | None = None,
    hosts: Mapping[int, str] | None = None,
    prompt: str = PROMPT,
    to_row: Callable[[str], tuple[str, dict[str, str] | None]] | None = None,
    system: str = SYSTEM,
) -> list[Sample]:
    """The samples of `plan_requests(targets, settings)`, in that order, leaving out
    requests whose seed is in `skip` (already done by an interrupted run). `on_sample` sees
    each sample as soon as it arrives (the loop journals it). `hosts` maps a request's seed
    to the real row it rewrites (tools/synthesis.py `assign_hosts`; needed when
    `settings.hosts`); a target's own `host` wins. Each sample's label is its target's.
    `prompt` names the prompt file rendered per request (with the target's summary, spans,
    label, host and the request's k). `to_row` turns a reply into (text, fields) for a
    pair task (tools/tasks/pairs.py `reply_to_sample`); without it the text is the cleaned
    reply. `system` is the system message of every request."""
    settings = settings or GenerateSettings()
    if settings.hosts and hosts is None:
        raise ConfigError("hosts=True but no host rows were given: pass hosts= "
                          "(tools.synthesis.assign_hosts) or set hosts=False")
    steering = settings.steer > 0
    if steering and not getattr(client, "can_steer", False):
        raise ConfigError(
            f"steer={settings.steer:g} needs a generator that adds SAE feature directions "
            f"while sampling (the in-process local generator); {client.name!r} cannot: use "
            "--generator local, or --steer 0")
    generator = f"{client.name}+steer{settings.steer:g}" if steering else client.name
    gate = asyncio.Semaphore(settings.concurrency)

    def ask(target: Target, user: str, seed: int) -> Awaitable[str]:
        if not steering:
            return client.achat(system, user, temperature=settings.temperature, seed=seed)
        return cast(SteeringChatClient, client).achat(
            system, user, temperature=settings.temperature, seed=seed,
            steer=(target.feature, settings.steer))

    async def one(req: Request) -> Sample:
        target, seed = req.target, req.seed
        host = target.host or (hosts or {}).get(seed)
        user = render(prompt, summary=target.summary, spans=target.spans[:3],
                      label=target.label, host=host, k=req.k)
        async with gate:
            reply = await with_backoff(lambda: ask(target, user, seed),
                                       settings.retries, settings.backoff_s, sleep)
        text, fields = to_row(reply) if to_row else (clean(reply), None)
        sample = Sample(text=text, label=target.label, fields=fields, provenance=Provenance(
            feature=target.feature, round=settings.round, generator=generator,
            prompt_version=prompt, temperature=settings.temperature, seed=seed,
        ))
        if on_sample:
            on_sample(sample)
        return sample

    jobs = [one(r) for r in plan_requests(targets, settings) if r.seed not in skip]
    return list(await asyncio.gather(*jobs))
