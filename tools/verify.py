"""Activation verifier: keep a generated sample only if it really activates its target.

A sample targets one missing feature. It is kept when that feature counts as active in the
sample under the same `ActivityRule` and thresholds that coverage uses (so a kept sample
covers the feature by construction), it is not empty or a refusal, and it is neither an
exact nor a near duplicate (MinHash LSH on word 3-shingles) of the existing data or of a
sample kept before it. Rejected samples keep their reason; per-feature hit rates say how
often the generator hit each target at all. Whether a kept sample's label holds is the label
gate's question (tools/label_gate.py, applied by the improve loop, which has a detector).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field

from tools.coverage import ActivityRule, activity
from tools.label_gate import is_refusal

if TYPE_CHECKING:
    from datasketch import MinHash

    from tools.probe import ProbeResult

Reason = Literal["kept", "empty", "refusal", "duplicate", "near_duplicate", "target_inactive",
                 "label_disputed"]


class Provenance(BaseModel):
    feature: int = Field(description="the missing feature this sample targets (a pool row: "
                         "the first deficit feature it fills, -1 for none)")
    round: int = 0
    generator: str = Field("", description="who wrote it; a pool row: 'pool:<file>'")
    prompt_version: str = Field("", description="the prompt; a pool row: the strategy that "
                                "picked it, 'select-<strategy>'")
    temperature: float | None = None
    seed: int | None = None
    pool_row: int | None = Field(None, description="a real pool row: its index in the pool "
                                 "file (0-based); None for a generated sample")
    fills: list[int] = Field(default_factory=list, description="a pool row: the task "
                             "features with a deficit it fills")
    score: float | None = Field(None, description="a pool row: the model's score when picked")
    labeler: str | None = Field(None, description="a pool row: who labelled it (human, file, "
                                "judge)")


class Sample(BaseModel):
    text: str = Field(description="what the verifier probes: the row itself (toxicity), or "
                      "the preferred side of a pair task's row (its probe text)")
    label: int | None = None
    provenance: Provenance
    fields: dict[str, str] | None = Field(
        None, description="a pair task's row (prompt, chosen, rejected; tools/tasks/pairs.py); "
        "None for text rows")


class Verdict(BaseModel):
    sample: Sample
    reason: Reason
    activation: float = Field(description="max activation of the target feature in the sample")

    @property
    def kept(self) -> bool:
        return self.reason == "kept"


def gate_pass_rate(kept: int, disputed: int) -> float:
    """Of the samples that reached the label gate (kept + disputed), the share it kept."""
    checked = kept + disputed
    return kept / checked if checked else 0.0


class FeatureHits(BaseModel):
    generated: int
    activated: int
    kept: int
    disputed: int = Field(0, description="passed the activation check, then dropped by the "
                          "label gate (not in `kept`)")

    @property
    def hit_rate(self) -> float:
        return self.activated / self.generated if self.generated else 0.0

    @property
    def gate_pass_rate(self) -> float:
        return gate_pass_rate(self.kept, self.disputed)


class VerifyReport(BaseModel):
    kept: list[Verdict]
    rejected: list[Verdict]
    per_feature: dict[int, FeatureHits]

    @property
    def hit_rate(self) -> float:
        n = sum(h.generated for h in self.per_feature.values())
        return sum(h.activated for h in self.per_feature.values()) / n if n else 0.0

    def gated(self, label_ok: Sequence[bool]) -> VerifyReport:
        """This report after the label gate: kept samples whose label did not hold (one
        flag per kept sample, in order) move to the rejected ones as `label_disputed`."""
        if len(label_ok) != len(self.kept):
            raise ValueError(f"{len(label_ok)} label checks for {len(self.kept)} kept samples")
        per_feature = {f: h.model_copy() for f, h in self.per_feature.items()}
        disputed = []
        for v, ok in zip(self.kept, label_ok, strict=True):
            if not ok:
                disputed.append(v.model_copy(update={"reason": "label_disputed"}))
                hits = per_feature[v.sample.provenance.feature]
                hits.kept -= 1
                hits.disputed += 1
        return VerifyReport(kept=[v for v, ok in zip(self.kept, label_ok, strict=True) if ok],
                            rejected=self.rejected + disputed, per_feature=per_feature)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _shingles(text: str, k: int = 3) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}


class NearDuplicates:
    """Exact and near-duplicate detection (MinHash LSH, Jaccard >= threshold)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self._num_perm = num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._exact: set[str] = set()
        self._n = 0

    def _hash(self, text: str) -> MinHash:
        m = self._minhash(num_perm=self._num_perm, seed=1)
        for s in _shingles(text):
            m.update(s.encode("utf-8"))
        return m

    def check(self, text: str) -> Literal["new", "duplicate", "near_duplicate"]:
        if normalise(text) in self._exact:
            return "duplicate"
        return "near_duplicate" if self._lsh.query(self._hash(text)) else "new"

    def add(self, text: str) -> None:
        self._exact.add(normalise(text))
        self._lsh.insert(str(self._n), self._hash(text))
        self._n += 1

    def add_all(self, texts: Iterable[str]) -> None:
        for t in texts:
            self.add(t)


def verify(
    samples: Sequence[Sample],
    acts: ProbeResult,
    rule: ActivityRule,
    thresholds: np.ndarray,
    *,
    existing: Iterable[str] = (),
    near_threshold: float = 0.8,
) -> VerifyReport:
    """Judge `samples` (probed in the same order as `acts`) against their targets."""
    if len(samples) != len(acts.acts):
        raise ValueError(f"{len(samples)} samples but {len(acts.acts)} probed rows")
    active = activity(acts, rule, thresholds).tocsr()
    maxes = acts.max_matrix().tocsr()
    seen = NearDuplicates(near_threshold)
    seen.add_all(existing)
    hits: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    kept: list[Verdict] = []
    rejected: list[Verdict] = []
    for i, sample in enumerate(samples):
        f = sample.provenance.feature
        on = bool(active[i, f]) if 0 <= f < acts.d_sae else False
        counts = hits[f]
        counts[0] += 1
        counts[1] += on
        reason: Reason
        if not sample.text.strip():
            reason = "empty"
        elif is_refusal(sample.text):
            reason = "refusal"
        elif (dup := seen.check(sample.text)) != "new":
            reason = dup
        elif not on:
            reason = "target_inactive"
        else:
            reason = "kept"
            seen.add(sample.text)
            counts[2] += 1
        activation = float(maxes[i, f]) if 0 <= f < acts.d_sae else 0.0
        (kept if reason == "kept" else rejected).append(
            Verdict(sample=sample, reason=reason, activation=activation)
        )
    per_feature = {
        f: FeatureHits(generated=g, activated=a, kept=k) for f, (g, a, k) in sorted(hits.items())
    }
    return VerifyReport(kept=kept, rejected=rejected, per_feature=per_feature)
