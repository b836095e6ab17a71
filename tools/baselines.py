"""Baseline synthesizers for the toxicity experiment: the same budget and output as the
targeted generator (tools.generate), without aiming at features.

- `random`: plain prompting for a message with the target label, varied only by seed.
- `self-instruct` (Wang et al., 2022; Alpaca-style, one text per request): each request
  shows a few examples drawn from a pool that starts as the seed texts and grows with
  accepted generations (by default 4 seeds + 2 generated, seeds fill in while fewer have
  been generated); a text joins the pool only if its ROUGE-L F against every pool text is
  below 0.7 (computed here by LCS with rouge-score's tokenisation, no stemmer, as the
  paper used it; rouge-score is not a dependency).
- `evol-instruct` (WizardLM, Xu et al., 2023): seed texts are evolved by an operation drawn
  uniformly from four in-depth ones (add a constraint, deepen, concretize, ask for more
  reasoning steps) and one in-breadth one (a new, rarer message in the same domain).
  Failed evolutions (empty, leaking the rewriting instruction, identical to the parent, a
  refusal) are dropped and their parent goes back to be evolved again; successful children
  are output and are the parents of the next generation, until the budget is met (with
  at least `budget` seeds, every sample is a first-generation evolution).
- `magpie` (Xu et al., 2024): an aligned model completes its own chat template's pre-query
  prefix (e.g. `<|im_start|>user\\n` for ChatML); the completion up to the end-of-turn
  marker is a user query. Needs a completion client (`AsyncCompleteClient`) and the prefix
  (`magpie_prefix(tokenizer)`). A completion with no marker is kept whole (a server that
  stops on the marker drops it), so set `max_tokens` high enough not to cut queries.

Labels: random, self-instruct and evol-instruct ask for texts with `settings.label` (1 by
default: the experiment adds positives to a toxicity detector's training set) and carry it.
Magpie texts are unlabelled (label None) unless a `labeler` (texts -> labels) is given. A
labeler, when given, labels every method's texts, so the experiment can label all methods
with one and the same rule.

Every method returns exactly `budget` samples: texts that are empty, exact duplicates of a
seed or of an earlier sample, or refusals ("sorry", "as an AI", ...) are rejected and
requested again, at most `budget * max_requests_factor` requests in all; `BaselineError` if
that is not enough, or when the LLM still fails transiently after the retries
(`tools.generate.with_backoff`). At most `concurrency` requests are in flight. Provenance:
feature -1 (no target feature), prompt_version "baseline-<method>.v2".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import re
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, cast, get_args

from pydantic import BaseModel, Field

from prompts import render
from tools.errors import FacsynthError
from tools.generate import SYSTEM, AsyncChatClient, TransientLLMError, clean, with_backoff
from tools.verify import Provenance, Sample, normalise

log = logging.getLogger(__name__)

Method = Literal["random", "self-instruct", "evol-instruct", "magpie"]
METHODS: tuple[str, ...] = get_args(Method)
NO_FEATURE = -1
VERSION = "v2"
PROMPT_RANDOM = "baseline_random.v1"
PROMPT_SELF_INSTRUCT = "baseline_self_instruct.v2"
PROMPT_EVOL_DEPTH = "baseline_evol_depth.v2"
PROMPT_EVOL_BREADTH = "baseline_evol_breadth.v2"
EVOL_DEPTH_OPS = ("constraints", "deepen", "concretize", "reasoning")
EVOL_OPS = (*EVOL_DEPTH_OPS, "breadth")

# The generator declined instead of writing a message (any method).
REFUSAL_MARKERS = (
    "sorry", "as an ai", "i can't help", "i cannot help", "i can't assist", "i cannot assist",
    "i can't provide", "i cannot provide", "i can't create", "i cannot create",
    "i can't write", "i cannot write", "i'm unable to", "i am unable to", "i won't",
    "can't fulfill", "cannot fulfill", "can't comply", "cannot comply",
)
# An evolution that copies words of the rewriting instruction (WizardLM's elimination rule).
EVOL_LEAK_MARKERS = (
    "given prompt", "rewritten prompt", "created prompt", "rewritten message",
    "rewritten version", "message to rewrite", "message for inspiration", "these instructions",
)
DEFAULT_END_MARKERS = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>"]
_PLACEHOLDER = "FACSYNTHQUERYPLACEHOLDER"

Labeler = Callable[[list[str]], Sequence[int | None]]


class BaselineError(FacsynthError):
    """A baseline could not deliver its budget: bad input, or the LLM kept failing."""


class AsyncCompleteClient(Protocol):
    """Raw text completion (no chat template applied), e.g. an OpenAI-style /completions."""

    name: str

    async def acomplete(
        self, prompt: str, *, temperature: float, seed: int, max_tokens: int
    ) -> str: ...


class BaselineSettings(BaseModel):
    label: int = Field(1, ge=0, le=1, description="label the chat-prompted methods aim for")
    temperature: float = Field(0.8, ge=0, le=2)
    concurrency: int = Field(8, ge=1)
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each time")
    seed: int = 0
    round: int = 0
    max_requests_factor: float = Field(
        5.0, ge=1, description="give up after budget x this many requests")
    example_chars: int = Field(
        600, ge=20, description="seed/pool texts shown in prompts are cut to this many chars")
    # self-instruct
    seed_examples: int = Field(4, ge=1, description="self-instruct: seed texts per prompt")
    generated_examples: int = Field(
        2, ge=0, description="self-instruct: generated texts per prompt (seeds fill in)")
    rouge_threshold: float = Field(
        0.7, gt=0, le=1, description="self-instruct: reject at this ROUGE-L F to any pool text")
    # magpie
    magpie_prefix: str | None = Field(
        None, description="pre-query template, e.g. magpie_prefix(tokenizer)")
    end_markers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_END_MARKERS),
        description="magpie: the query ends at the first of these")
    max_tokens: int = Field(256, ge=1, description="magpie: completion length limit")


# ---------------------------------------------------------------- ROUGE-L (no rouge-score)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation (no stemmer): lower case, runs of [a-z0-9]."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts: 2·LCS / (|a| + |b|) over rouge tokens (0 if either is empty)."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    if not ta or not tb:
        return 0.0
    return 2 * _lcs(ta, tb) / (len(ta) + len(tb))


class RougePool:
    """Texts to compare new ones with; `max_score` skips LCS for pairs whose bag-of-words
    overlap already bounds the score below the threshold (LCS <= overlap)."""

    def __init__(self, texts: Sequence[str] = ()) -> None:
        self._items: list[tuple[list[str], Counter[str]]] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        self._items.append((tokens, Counter(tokens)))

    def near(self, text: str, threshold: float) -> bool:
        """True when some pool text has ROUGE-L F >= threshold with `text`."""
        tokens = rouge_tokens(text)
        if not tokens:
            return False
        bag = Counter(tokens)
        for other, other_bag in self._items:
            total = len(tokens) + len(other)
            if not other or 2 * min(len(tokens), len(other)) / total < threshold:
                continue
            if 2 * sum((bag & other_bag).values()) / total < threshold:
                continue
            if 2 * _lcs(tokens, other) / total >= threshold:
                return True
        return False


# ---------------------------------------------------------------- magpie templates


def _render_user_turn(tokenizer: Any) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise BaselineError("magpie needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], tokenize=False, add_generation_prompt=False
    )
    if not isinstance(text, str) or _PLACEHOLDER not in text:
        raise BaselineError("the chat template does not render the user message verbatim")
    before, _, after = text.partition(_PLACEHOLDER)
    return before, after


def _adds_bos(tokenizer: Any) -> bool:
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer we cannot call: assume the usual
        return True
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bool(ids) and bos_id is not None and ids[0] == bos_id


def magpie_prefix(tokenizer: Any, *, keep_bos: bool | None = None) -> str:
    """The pre-query template: the chat template rendered for one user message, cut where
    the message would start (any default system turn included). A leading BOS token is
    dropped when the tokenizer adds one itself on encoding (as completion servers do, so it
    would be doubled); `keep_bos` True/False overrides that. (SmolLM2's BOS is
    `<|im_start|>`, part of the turn, and is kept.)"""
    prefix, _ = _render_user_turn(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    strip = not keep_bos if keep_bos is not None else _adds_bos(tokenizer)
    if strip and bos and prefix.startswith(bos):
        prefix = prefix[len(bos):]
    if not prefix.strip():
        raise BaselineError("the chat template has nothing before the user message")
    return prefix


def magpie_end_markers(tokenizer: Any) -> list[str]:
    """Markers that end a user turn: the first token-like piece the template puts after the
    user message (e.g. `<|im_end|>`, `<|eot_id|>`), then the EOS token."""
    _, after = _render_user_turn(tokenizer)
    markers = after.split()[:1]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in markers:
        markers.append(eos)
    if not markers:
        raise BaselineError("cannot tell where the chat template ends a user turn")
    return markers


def cut_query(completion: str, end_markers: Sequence[str]) -> str:
    """The query: the completion up to the first end-of-turn marker, stripped. (Without a
    marker, as when the server already stopped on it, the whole completion.)"""
    cut = min((i for m in end_markers if m and (i := completion.find(m)) >= 0),
              default=len(completion))
    return completion[:cut].strip()


# ---------------------------------------------------------------- methods


def _is_refusal(text: str) -> bool:
    low = text.lower().replace("’", "'")
    return any(m in low for m in REFUSAL_MARKERS)


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


Call = Callable[[], Awaitable[str]]


class _Strategy:
    """One method's state: the next request, how to read a reply, extra checks, updates."""

    def request(self, seed: int) -> tuple[Call, Any]:
        raise NotImplementedError

    def extract(self, reply: str) -> str:
        return clean(reply)

    def check(self, text: str, ctx: Any) -> str | None:
        return None

    def accepted(self, text: str, ctx: Any) -> None:
        return None

    def rejected(self, ctx: Any) -> None:
        return None


class _Random(_Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings) -> None:
        self.client, self.s = client, s
        self.user = render(PROMPT_RANDOM, label=s.label)

    def request(self, seed: int) -> tuple[Call, Any]:
        return (lambda: self.client.achat(SYSTEM, self.user, temperature=self.s.temperature,
                                          seed=seed)), None


class _SelfInstruct(_Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, seeds: list[str],
                 rng: random.Random) -> None:
        self.client, self.s, self.rng = client, s, rng
        self.seeds = seeds
        self.generated: list[str] = []
        self.pool = RougePool(seeds)

    def request(self, seed: int) -> tuple[Call, Any]:
        s = self.s
        n_gen = min(s.generated_examples, len(self.generated))
        n_seed = min(len(self.seeds), s.seed_examples + s.generated_examples - n_gen)
        examples = self.rng.sample(self.seeds, n_seed) + self.rng.sample(self.generated, n_gen)
        self.rng.shuffle(examples)
        user = render(PROMPT_SELF_INSTRUCT, label=s.label,
                      examples=[_shorten(e, s.example_chars) for e in examples])
        return (lambda: self.client.achat(SYSTEM, user, temperature=s.temperature,
                                          seed=seed)), examples

    def extract(self, reply: str) -> str:
        return clean(re.sub(r"^\s*(message\s*)?\d+\s*[.):]\s*", "", reply, flags=re.I))

    def check(self, text: str, ctx: Any) -> str | None:
        return "rouge" if self.pool.near(text, self.s.rouge_threshold) else None

    def accepted(self, text: str, ctx: Any) -> None:
        self.generated.append(text)
        self.pool.add(text)


class _Evol(_Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, seeds: list[str],
                 rng: random.Random) -> None:
        self.client, self.s, self.rng = client, s, rng
        self.seeds = seeds
        self.frontier: deque[str] = deque(rng.sample(seeds, len(seeds)))
        self.next_gen: list[str] = []
        self.children: list[str] = []
        self.generation = 1

    def _parent(self) -> str:
        if not self.frontier and self.next_gen:
            self.rng.shuffle(self.next_gen)
            self.frontier, self.next_gen = deque(self.next_gen), []
            self.generation += 1
            log.debug("evol-instruct: generation %d, %d parents", self.generation,
                      len(self.frontier))
        if self.frontier:
            return self.frontier.popleft()
        return self.rng.choice(self.seeds + self.children)  # all parents in flight

    def request(self, seed: int) -> tuple[Call, Any]:
        parent, op = self._parent(), self.rng.choice(EVOL_OPS)
        message = _shorten(parent, self.s.example_chars)
        if op == "breadth":
            user = render(PROMPT_EVOL_BREADTH, label=self.s.label, message=message)
        else:
            user = render(PROMPT_EVOL_DEPTH, label=self.s.label, message=message, operation=op)
        return (lambda: self.client.achat(SYSTEM, user, temperature=self.s.temperature,
                                          seed=seed)), parent

    def check(self, text: str, ctx: Any) -> str | None:
        if normalise(text) == normalise(ctx):
            return "same_as_parent"
        if any(m in text.lower() for m in EVOL_LEAK_MARKERS):
            return "copies_instruction"
        return None

    def accepted(self, text: str, ctx: Any) -> None:
        self.children.append(text)
        self.next_gen.append(text)

    def rejected(self, ctx: Any) -> None:
        self.next_gen.append(ctx)  # WizardLM: a failed evolution's parent goes back


class _Magpie(_Strategy):
    def __init__(self, client: AsyncCompleteClient, s: BaselineSettings) -> None:
        if not s.magpie_prefix:
            raise BaselineError("magpie needs settings.magpie_prefix, e.g. "
                                "magpie_prefix(tokenizer) of the generating model")
        self.client, self.s, self.prefix = client, s, s.magpie_prefix

    def request(self, seed: int) -> tuple[Call, Any]:
        return (lambda: self.client.acomplete(self.prefix, temperature=self.s.temperature,
                                              seed=seed, max_tokens=self.s.max_tokens)), None

    def extract(self, reply: str) -> str:
        return cut_query(reply, self.s.end_markers)


async def _drive(
    method: str, strategy: _Strategy, *, known: Sequence[str], budget: int,
    settings: BaselineSettings, sleep: Callable[[float], Awaitable[None]],
) -> list[tuple[str, int]]:
    """Run `concurrency` workers until `budget` texts are accepted: (text, seed) pairs."""
    limit = max(budget, math.ceil(budget * settings.max_requests_factor))
    out: list[tuple[str, int]] = []
    seen = {normalise(t) for t in known}
    rejected: Counter[str] = Counter()
    counter = itertools.count()

    def judge(text: str, ctx: Any) -> str | None:
        if not text:
            return "empty"
        reason = strategy.check(text, ctx)
        if reason:
            return reason
        if _is_refusal(text):
            return "refusal"
        return "duplicate" if normalise(text) in seen else None

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
            except TransientLLMError as e:
                raise BaselineError(
                    f"{method}: the LLM still failed after {settings.retries} retries: {e}"
                ) from e
            finally:
                in_flight -= 1
            text = strategy.extract(reply)
            reason = judge(text, ctx)
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
    if len(out) < budget:
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
) -> list[Sample]:
    """Exactly `budget` samples by a baseline `method`, in acceptance order.

    `seeds`: task texts (with the target label) that self-instruct and evol-instruct start
    from; random and magpie only use them to reject copies. `client`: an AsyncChatClient,
    or for magpie an AsyncCompleteClient. `labeler`: labels the texts (all methods; see the
    module doc)."""
    settings = settings or BaselineSettings()
    if method not in METHODS:
        raise BaselineError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if budget < 0:
        raise BaselineError(f"budget must be >= 0, got {budget}")
    if budget == 0:
        return []
    known = _seed_texts(seeds)
    rng = random.Random(settings.seed)
    strategy: _Strategy
    if method == "magpie":
        if not callable(getattr(client, "acomplete", None)):
            raise TypeError("magpie needs a completion client with acomplete(...)")
        strategy = _Magpie(cast(AsyncCompleteClient, client), settings)
    else:
        if not callable(getattr(client, "achat", None)):
            raise TypeError(f"{method} needs a chat client with achat(...)")
        chat = cast(AsyncChatClient, client)
        if method == "random":
            strategy = _Random(chat, settings)
        elif not known:
            raise BaselineError(f"{method} needs at least one non-empty seed text")
        elif method == "self-instruct":
            strategy = _SelfInstruct(chat, settings, known, rng)
        else:
            strategy = _Evol(chat, settings, known, rng)

    got = await _drive(method, strategy, known=known, budget=budget, settings=settings,
                       sleep=sleep)
    texts = [t for t, _ in got]
    labels: Sequence[int | None]
    if labeler is not None:
        labels = list(labeler(texts))
        if len(labels) != len(texts) or any(v not in (0, 1, None) for v in labels):
            raise BaselineError("labeler must return one label (0, 1 or None) per text")
    else:
        labels = [None if method == "magpie" else settings.label] * len(texts)
    return [
        Sample(text=text, label=label, provenance=Provenance(
            feature=NO_FEATURE, round=settings.round, generator=client.name,
            prompt_version=f"baseline-{method}.{VERSION}", temperature=settings.temperature,
            seed=seed,
        ))
        for (text, seed), label in zip(got, labels, strict=True)
    ]


def synthesize(
    method: Method,
    *,
    seeds: Sequence[str],
    budget: int,
    client: AsyncChatClient | AsyncCompleteClient,
    settings: BaselineSettings | None = None,
    labeler: Labeler | None = None,
) -> list[Sample]:
    """Blocking `asynthesize` (not from inside a running event loop)."""
    return asyncio.run(asynthesize(method, seeds=seeds, budget=budget, client=client,
                                   settings=settings, labeler=labeler))
