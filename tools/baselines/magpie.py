"""Magpie (Xu et al., 2024): an aligned model completes its own chat template's pre-query
prefix and the completion, up to the end-of-turn marker, is a user query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tools.baselines.base import (
    AsyncCompleteClient,
    BaselineError,
    BaselineSettings,
    Call,
    Strategy,
)

_PLACEHOLDER = "FACSYNTHQUERYPLACEHOLDER"


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


class Magpie(Strategy):
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
