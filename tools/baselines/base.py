"""What every baseline shares: method names and prompt versions, settings, the error, the
completion-client interface, and the strategy interface the driver runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, get_args

import numpy as np
from pydantic import Field

from tools.errors import FacsynthError
from tools.generate import SamplingSettings, clean

Method = Literal["random", "self-instruct", "evol-instruct", "magpie",
                 "cot-self-instruct", "sao", "prismatic", "synalign"]
METHODS: tuple[str, ...] = get_args(Method)
NEEDS_FEATURES = ("prismatic", "synalign")
"""Methods that embed texts (`features=` of synthesize): the gradient space, the GP tracker."""
NO_FEATURE = -1
VERSION = "v3"
"""Prompt version of the first four methods; the paper methods are at their own `VERSIONS`."""
VERSIONS: dict[str, str] = {"cot-self-instruct": "v1", "sao": "v1", "prismatic": "v1",
                            "synalign": "v1"}
PROMPT_RANDOM = "baseline_random.v2"
PROMPT_SELF_INSTRUCT = "baseline_self_instruct.v3"
PROMPT_EVOL_DEPTH = "baseline_evol_depth.v3"
PROMPT_EVOL_BREADTH = "baseline_evol_breadth.v3"
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

Labeler = Callable[[list[str]], Sequence[int | None]]
Features = Callable[[Sequence[str]], np.ndarray]
"""texts -> [n, d] frozen features (as tools/tasks/base.py `Features`)."""


def version(method: str) -> str:
    """The prompt version in a method's provenance (`baseline-<method>.<version>`)."""
    return VERSIONS.get(method, VERSION)


class BaselineError(FacsynthError):
    """A baseline could not deliver its budget: bad input, or the LLM kept failing."""


class RejectedReply(FacsynthError):
    """Raised inside a request (its call or `extract`) when the reply is unusable for a reason
    of the method's own (no marker, no ranking ...): the driver counts `reason` and requests
    again, as for any rejected text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AsyncCompleteClient(Protocol):
    """Raw text completion (no chat template applied), e.g. an OpenAI-style /completions."""

    name: str

    async def acomplete(
        self, prompt: str, *, temperature: float, seed: int, max_tokens: int
    ) -> str: ...


class BaselineSettings(SamplingSettings):
    label: int = Field(1, ge=0, le=1, description="label the chat-prompted methods aim for")
    max_requests_factor: float = Field(
        5.0, ge=1, description="give up after budget x this many requests")
    allow_short: bool = Field(
        False, description="fewer than budget usable texts after the requests: return them "
        "(compare decides) instead of a BaselineError")
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
    # cot-self-instruct
    cot_examples: int = Field(
        2, ge=1, description="cot-self-instruct: seed texts per prompt (the paper shows 2)")
    cot_max_tokens: int = Field(
        384, ge=16, description="cot-self-instruct: reply length for the reasoning and the new "
        "message (the generator's max_new_tokens, tuned for one short message, cut the reply "
        "before its marker)")
    # prismatic
    prismatic_clusters: int = Field(
        8, ge=2, description="prismatic: k-means clusters of the gradient embeddings")
    prismatic_dim: int = Field(
        256, ge=8, description="prismatic: random projection size of the gradients")
    prismatic_sparse: float = Field(
        0.5, gt=0, lt=1, description="prismatic: a cluster is sparse while its row count is "
        "at most this quantile of the clusters' counts")
    prismatic_examples: int = Field(
        3, ge=1, description="prismatic: rows of sparse clusters shown per prompt")
    # synalign
    synalign_noise: float = Field(
        0.1, gt=0, description="synalign: the GP tracker's noise variance per draw (the "
        "prior variance is 1); smaller: a drawn seed looks explored sooner")


Call = Callable[[], Awaitable[str]]


class Strategy:
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
