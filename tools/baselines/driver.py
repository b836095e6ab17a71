"""The request loop every baseline runs (`concurrency` workers until `budget` texts are
accepted) and `synthesize` / `asynthesize`, which pick the method's strategy."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from tools.baselines.base import (
    METHODS,
    NEEDS_FEATURES,
    NO_FEATURE,
    REFUSAL_MARKERS,
    AsyncCompleteClient,
    BaselineError,
    BaselineSettings,
    Features,
    Labeler,
    Method,
    RejectedReply,
    Strategy,
    version,
)
from tools.baselines.cot import CoTSelfInstruct
from tools.baselines.magpie import Magpie
from tools.baselines.methods import Evol, Random, SelfInstruct
from tools.baselines.prismatic import Prismatic
from tools.baselines.sao import SAO
from tools.baselines.synalign import SynAlign
from tools.generate import AsyncChatClient, TransientLLMError, with_backoff
from tools.verify import Provenance, Sample, normalise

log = logging.getLogger(__name__)


def _is_refusal(text: str) -> bool:
    low = text.lower().replace("’", "'")
    return any(m in low for m in REFUSAL_MARKERS)


async def _drive(
    method: str, strategy: Strategy, *, known: Sequence[str], budget: int,
    settings: BaselineSettings, sleep: Callable[[float], Awaitable[None]],
    allow_short: bool = False, gate: Callable[[str, int], bool] | None = None,
) -> list[tuple[str, int]]:
    """Run `concurrency` workers until `budget` texts are accepted: (text, seed) pairs.
    Fewer after the request limit: BaselineError, or with `allow_short` a warning and what
    was accepted (compare cuts every method to the smallest kept count anyway). `gate`
    (text, seed) -> keep: the last filter, after the method's own and the shared ones; a
    text it refuses is rejected as `label_disputed` and the request spent, like any other."""
    limit = max(budget, math.ceil(budget * settings.max_requests_factor))
    out: list[tuple[str, int]] = []
    seen = {normalise(t) for t in known}
    rejected: Counter[str] = Counter()
    counter = itertools.count()

    def judge(text: str, ctx: Any, seed: int) -> str | None:
        if not text:
            return "empty"
        reason = strategy.check(text, ctx)
        if reason:
            return reason
        if not getattr(strategy, "refusals_ok", False) and _is_refusal(text):
            return "refusal"
        if normalise(text) in seen:
            return "duplicate"
        return "label_disputed" if gate is not None and not gate(text, seed) else None

    in_flight = 0
    changed = asyncio.Condition()

    def may_start() -> bool:  # done, or the requests in flight could not fill the budget
        return len(out) >= budget or len(out) + in_flight < budget

    async def worker() -> None:
        nonlocal in_flight
        while True:
            async with changed:
                await changed.wait_for(may_start)
            if len(out) >= budget:
                return
            i = next(counter)
            if i >= limit:
                return
            seed = settings.seed * 1_000_003 + i
            call, ctx = strategy.request(seed)
            in_flight += 1
            try:
                reply = await with_backoff(call, settings.retries, settings.backoff_s, sleep)
                text = strategy.extract(reply)
                reason = judge(text, ctx, seed)
            except TransientLLMError as e:
                raise BaselineError(
                    f"{method}: the LLM still failed after {settings.retries} retries: {e}"
                ) from e
            except RejectedReply as e:  # the method's own verdict on this request
                text, reason = "", e.reason
            finally:
                in_flight -= 1
            if reason:
                rejected[reason] += 1
                strategy.rejected(ctx)
            else:
                seen.add(normalise(text))
                out.append((text, seed))
                strategy.accepted(text, ctx)
            async with changed:
                changed.notify_all()

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(settings.concurrency, budget))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if rejected:
        log.info("%s: rejected %s", method, dict(rejected))
    if len(out) < budget and allow_short:
        log.warning("%s: only %d of %d samples after %d requests; rejected: %s", method,
                    len(out), budget, limit, dict(rejected))
    elif len(out) < budget:
        raise BaselineError(
            f"{method}: only {len(out)} of {budget} samples after {limit} requests; rejected: "
            f"{dict(rejected)}. The generator keeps producing unusable text; raise "
            "max_requests_factor or use another generator."
        )
    return out


def _seed_texts(seeds: Sequence[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for s in seeds:
        if s.strip() and normalise(s) not in seen:
            seen.add(normalise(s))
            out.append(s.strip())
    return out


async def asynthesize(
    method: Method,
    *,
    seeds: Sequence[str],
    budget: int,
    client: AsyncChatClient | AsyncCompleteClient,
    settings: BaselineSettings | None = None,
    labeler: Labeler | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    features: Features | None = None,
    gate: Callable[[Sample], bool] | None = None,
) -> list[Sample]:
    """Exactly `budget` samples by a baseline `method`, in acceptance order.

    `seeds`: task texts (with the target label) that self-instruct, evol-instruct,
    cot-self-instruct, prismatic and synalign start from; random, magpie and sao only use
    them to reject copies. `client`: an AsyncChatClient, or for magpie an
    AsyncCompleteClient. `labeler`: labels the texts (all methods; see the module doc).
    `features`: texts -> [n, d] embeddings (e.g. tools/tasks/base.py `workspace_features`),
    needed by prismatic and synalign (`NEEDS_FEATURES`). `gate`: a check of each accepted
    text as its sample (the asked label), e.g. compare's label gate; a refused one does not
    count towards `budget` (with `labeler`, the sample's label is None when checked)."""
    settings = settings or BaselineSettings()
    if method not in METHODS:
        raise BaselineError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if budget < 0:
        raise BaselineError(f"budget must be >= 0, got {budget}")
    if method in NEEDS_FEATURES and features is None:
        raise BaselineError(f"{method} embeds texts: pass features= (texts -> [n, d] array, "
                            "e.g. tools.tasks.base.workspace_features(workspace))")
    if budget == 0:
        return []
    known = _seed_texts(seeds)
    rng = random.Random(settings.seed)
    strategy: Strategy
    if method == "magpie":
        if not callable(getattr(client, "acomplete", None)):
            raise TypeError("magpie needs a completion client with acomplete(...)")
        strategy = Magpie(cast(AsyncCompleteClient, client), settings)
    else:
        if not callable(getattr(client, "achat", None)):
            raise TypeError(f"{method} needs a chat client with achat(...)")
        chat = cast(AsyncChatClient, client)
        if method == "random":
            strategy = Random(chat, settings)
        elif method == "sao":
            strategy = SAO(chat, settings, rng)
        elif not known:
            raise BaselineError(f"{method} needs at least one non-empty seed text")
        elif method == "self-instruct":
            strategy = SelfInstruct(chat, settings, known, rng)
        elif method == "evol-instruct":
            strategy = Evol(chat, settings, known, rng)
        elif method == "cot-self-instruct":
            strategy = CoTSelfInstruct(chat, settings, known, rng, settings.label)
        elif method == "prismatic":
            strategy = Prismatic(chat, settings, known, rng, cast(Features, features))
        else:
            strategy = SynAlign(chat, settings, known, rng, cast(Features, features))

    def sample(text: str, seed: int, label: int | None) -> Sample:
        return Sample(text=text, label=label, provenance=Provenance(
            feature=NO_FEATURE, round=settings.round, generator=client.name,
            prompt_version=f"baseline-{method}.{version(method)}",
            temperature=settings.temperature, seed=seed))

    asked = None if method == "magpie" or labeler is not None else settings.label
    got = await _drive(method, strategy, known=known, budget=budget, settings=settings,
                       sleep=sleep, allow_short=settings.allow_short,
                       gate=None if gate is None else (
                           lambda text, seed: gate(sample(text, seed, asked))))
    texts = [t for t, _ in got]
    labels: Sequence[int | None]
    if labeler is not None:
        labels = list(labeler(texts))
        if len(labels) != len(texts) or any(v not in (0, 1, None) for v in labels):
            raise BaselineError("labeler must return one label (0, 1 or None) per text")
    else:
        labels = [asked] * len(texts)
    return [sample(text, seed, label) for (text, seed), label in zip(got, labels, strict=True)]


def synthesize(
    method: Method,
    *,
    seeds: Sequence[str],
    budget: int,
    client: AsyncChatClient | AsyncCompleteClient,
    settings: BaselineSettings | None = None,
    labeler: Labeler | None = None,
    features: Features | None = None,
    gate: Callable[[Sample], bool] | None = None,
) -> list[Sample]:
    """Blocking `asynthesize` (not from inside a running event loop)."""
    return asyncio.run(asynthesize(method, seeds=seeds, budget=budget, client=client,
                                   settings=settings, labeler=labeler, features=features,
                                   gate=gate))
