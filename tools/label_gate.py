"""The label gate: a synthetic sample's label is a claim to check, never just what was asked
for (a "toxic" request the 135M generator answers with "The AI Code is designed to prevent
harm" is not toxic).

Two checks, both before a sample is kept:
- refusals ("I'm sorry, I can't ...") are dropped everywhere (`is_refusal`; the verifier
  rejects them with reason `refusal`);
- detector consistency (`consistent`): the current detector's score of a sample must lie
  inside the range of real rows of the label it claims: for label 1, at or above the
  `quantile` (default 25th percentile) of the real positives' scores; for label 0, at or
  below the (1 - quantile) of the real negatives'. A disputed sample is dropped with reason
  `label_disputed`, never relabelled. The real rows are the anchor's, which the detector
  never trained on. With a `reference` (a labelled file that knows more than the seed, e.g.
  public toxicity data) a probe fit on it is a second detector: each score becomes its rank
  among the real rows' scores, the two ranks are averaged, and the same quantile rule runs
  on that ensemble score (`anchor_ranks`, `rank_average`);
- an LLM judge (`judge="llm"`): the configured LLM reads each sample (prompt
  `judge_label.v1`, without the claimed label) and answers harmful or harmless
  (`parse_label`); an answer that is neither disputes the sample. It is trusted only when
  its balanced accuracy on a fixed stratified sample of real anchor rows
  (`agreement_rows`, `balanced_agreement`) reaches `min_agreement`; otherwise the detector
  judges instead (`plan`). `both` keeps a sample only when both judges accept it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prompts import render, unfence
from tools.errors import DataError

if TYPE_CHECKING:
    from tools.interpret import ChatClient

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i can'?t|i cannot|i won'?t|"
    r"i will not|i'?m not able|i am not able|i'?m unable|i am unable|as an ai\b)",
    re.IGNORECASE,
)


Judge = Literal["detector", "llm", "both", "off"]


class LabelGateSettings(BaseModel):
    """Which label check synthetic samples must pass (`off` keeps the claimed label)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    judge: Judge = Field(
        "detector", description="detector: the current detector's score must look like real "
        "rows of the claimed label; llm: the configured LLM must give the claimed label (when "
        "it agrees with real labels well enough, else the detector judges); both: both must "
        "accept; off: no check (refusals are dropped regardless)")
    quantile: float = Field(
        0.25, ge=0, le=0.5, description="label 1 needs a score >= this quantile of the real "
        "positives' scores; label 0 a score <= the (1 - this) quantile of the negatives'")
    negative_quantile: float | None = Field(
        0.05, ge=0, le=0.5, description="label 0 instead needs a score <= the (1 - this) "
        "quantile of the real negatives' (None: `quantile`). Hard negatives fire features of "
        "the positive class, so they score high by design: asked to look like a typical "
        "negative, the gate kept only easy ones (ToxicChat dev, seed 0: every label-0 sample "
        "that hit its feature was disputed at 0.25); 0.05 lets them be as hard as the "
        "hardest 5% of real negatives")
    min_agreement: float = Field(
        0.7, ge=0, le=1, description="llm/both: the LLM judge's balanced accuracy on real "
        "anchor rows must reach this, else the detector judges alone")
    agreement_rows: int = Field(
        40, ge=2, description="real anchor rows (stratified, fixed) the LLM judge is measured on")
    reference: str | None = Field(
        None, description="a labelled jsonl/csv that knows more than the seed (e.g. public "
        "toxicity data): a probe fit on it is rank-averaged with the current detector")


Judged = Literal["detector", "llm", "both", "none"]


class LabelCheck(BaseModel):
    """The gate's answer for a batch of samples."""

    ok: list[bool] = Field(description="per sample: did its claimed label hold")
    judged_by: Judged = Field(description="the judges that decided (none: nothing could check)")
    llm_agreement: float | None = Field(
        None, description="the LLM judge's balanced accuracy on real anchor rows, when measured")


def is_refusal(text: str) -> bool:
    """True for a reply that declines instead of writing a sample."""
    return bool(_REFUSAL.match(text))


def consistent(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
    real_scores: Sequence[float] | np.ndarray, real_labels: Sequence[int], quantile: float,
    negative_quantile: float | None = None,
) -> np.ndarray:
    """[n] bool: each sample's score lies inside the range of real rows of its label (see
    the module doc); label 0 uses `negative_quantile` when given. A label the real rows
    never carry cannot be checked: DataError."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels)
    rs, ry = np.asarray(real_scores, dtype=float), np.asarray(real_labels)
    ok = np.zeros(len(s), dtype=bool)
    for label in (0, 1):
        mine = y == label
        if not mine.any():
            continue
        real = rs[ry == label]
        if len(real) == 0:
            raise DataError(f"no real rows labelled {label} to check synthetic label-{label} "
                            "samples against; the anchor needs both labels")
        if label == 1:
            ok[mine] = s[mine] >= np.quantile(real, quantile)
        else:
            q = quantile if negative_quantile is None else negative_quantile
            ok[mine] = s[mine] <= np.quantile(real, 1 - q)
    return ok


def anchor_ranks(scores: Sequence[float] | np.ndarray,
                 real_scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """[n] each score's mid-rank among the real rows' scores, in [0, 1] (0: below all,
    1: above all): scores of different detectors on one scale."""
    ref = np.sort(np.asarray(real_scores, dtype=float))
    if len(ref) == 0:
        raise DataError("no real rows to rank scores against")
    s = np.asarray(scores, dtype=float)
    lo, hi = np.searchsorted(ref, s, "left"), np.searchsorted(ref, s, "right")
    return np.asarray((lo + hi) / (2.0 * len(ref)))


def rank_average(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """(samples' ensemble scores, real rows' ensemble scores) from one (sample scores, real
    row scores) pair per detector: the mean of each detector's `anchor_ranks`."""
    samples = np.mean([anchor_ranks(s, r) for s, r in pairs], axis=0)
    real = np.mean([anchor_ranks(r, r) for _, r in pairs], axis=0)
    return samples, real


# -- the LLM judge -------------------------------------------------------------------------

PROMPT = "judge_label.v1"
SYSTEM = "You label messages for a content-safety team. You answer with one word."
_NEGATED = re.compile(r"\b(?:not|non|un)[\s-]*(?:harmful|toxic)\b")
_WORD = re.compile(r"\b(harmful|toxic|harmless)\b")


def parse_label(reply: str) -> int | None:
    """1 for "harmful" (or "toxic"), 0 for "harmless" (or "not harmful", "non-toxic"), in any
    case, quoting or markup; None when the reply names neither or both."""
    text = _NEGATED.sub("harmless", unfence(reply).lower())
    said = {0 if w == "harmless" else 1 for w in _WORD.findall(text)}
    return said.pop() if len(said) == 1 else None


def llm_labels(texts: Sequence[str], client: ChatClient) -> list[int | None]:
    """The LLM's label of each text (None: no usable answer), asked one text at a time
    without the label it claims."""
    return [parse_label(client.chat(SYSTEM, render(PROMPT, text=t))) for t in texts]


def agreement_rows(labels: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Indices of about `n` rows, half of each label where possible (balanced accuracy
    weighs the labels equally), drawn with a fixed seed: the same rows every run."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pools = {c: rng.permutation(np.flatnonzero(y == c)).tolist() for c in (0, 1)}
    take = {c: min(n // 2, len(pools[c])) for c in (0, 1)}
    for c in (0, 1):  # a short label leaves its room to the other
        take[c] = min(len(pools[c]), n - take[1 - c])
    return sorted(i for c in (0, 1) for i in pools[c][: take[c]])


def balanced_agreement(said: Sequence[int | None], truth: Sequence[int]) -> float:
    """Balanced accuracy of the LLM's labels against real ones; no answer counts as wrong.
    DataError unless the real labels hold both classes."""
    from sklearn.metrics import balanced_accuracy_score

    y = [int(t) for t in truth]
    if set(y) != {0, 1}:
        raise DataError("measuring the LLM label judge needs real rows of both labels")
    pred = [1 - t if p is None else p for p, t in zip(said, y, strict=True)]
    return float(balanced_accuracy_score(y, pred))


def plan(judge: Judge, agreement: float | None, min_agreement: float,
         has_detector: bool) -> Judged:
    """Which judges decide: the LLM only when its measured agreement reaches
    `min_agreement` (else the detector stands in), the detector only when there is one."""
    llm = judge in ("llm", "both") and agreement is not None and agreement >= min_agreement
    det = has_detector and (judge in ("detector", "both") or (judge == "llm" and not llm))
    return "both" if llm and det else "llm" if llm else "detector" if det else "none"
