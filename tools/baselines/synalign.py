"""SynAlign (Ren et al., 2025, "Few-shot LLM Synthetic Data with Distribution Matching",
WWW '25, arXiv:2502.08661): synthetic rows whose key attributes follow the real data's.

The paper's three modules, and what they are here:

- Exploration-aware sampling: a Gaussian-process uncertainty tracker picks, round by round,
  real samples unlike those already used as demonstrations -> a GP over the seeds'
  embeddings (`features`; Gaussian kernel, median-heuristic bandwidth, prior variance 1),
  updated with one observation (noise variance `synalign_noise`, 0.1) at each seed drawn,
  by the exact rank-one posterior update Σ ← Σ - Σ[:, j] Σ[j, :] / (Σ[j, j] + noise). Each
  request draws the seed of largest posterior variance (UCB with a zero mean: pure
  exploration; ties: the least drawn, then at random). A drawn seed's variance falls to at
  most noise/(1 + noise), so seeds unlike every drawn one come first, and a seed comes back
  only once every other is explored about as well.
- Latent attribute reasoning: the LLM summarises a demonstration's linguistic attributes
  and then writes new data from that summary -> one request per drawn seed (the first time
  it is drawn; cached) asks for its topic, intent and style as one line of JSON
  (`baseline_synalign_attributes.v1`, validated with pydantic; a reply that does not parse
  rejects the request as `no_summary`, and the seed is summarised again when next drawn;
  on a vLLM backend the reply is constrained to the JSON schema, `with_json_schema`);
  the generation request (`baseline_synalign.v1`) shows only that summary and the asked
  label, not the seed.
- Distribution alignment: MMD-based sampling weights make the weighted synthetic rows match
  the real rows -> `tools.diversity.mmd_weights(synthetic_features, real_features)`, kernel
  mean matching; the paper resamples by the weights, compare passes them to the detector
  as row weights instead. They are computed by the caller, after generation, against the
  real rows it holds; this module only writes the rows.

The paper runs both LLM steps on a strong API model; here both use the configured chat
client.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from prompts import render
from tools.baselines.base import BaselineSettings, Call, Features, RejectedReply, Strategy
from tools.baselines.methods import _shorten
from tools.baselines.prismatic import checked_features
from tools.diversity import gaussian_kernel, median_bandwidth
from tools.generate import SYSTEM, AsyncChatClient, json_replies

log = logging.getLogger(__name__)

PROMPT_ATTRIBUTES = "baseline_synalign_attributes.v1"
PROMPT_SYNALIGN = "baseline_synalign.v1"
SYSTEM_ATTRIBUTES = "You describe the attributes of messages, briefly and exactly."
ATTRIBUTE_CHARS = 120


class Attributes(BaseModel):
    """A seed message's latent attributes, as the LLM summarised them."""

    topic: str = Field(min_length=1)
    intent: str = Field(min_length=1)
    style: str = Field(min_length=1)


def parse_attributes(reply: str) -> Attributes:
    """The JSON object in a summary reply (from its first "{" to its last "}"), each field
    cut to ATTRIBUTE_CHARS; RejectedReply("no_summary") when there is none or it does not
    validate."""
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end < start:
        raise RejectedReply("no_summary")
    try:
        got = Attributes.model_validate_json(reply[start:end + 1])
    except ValidationError:
        raise RejectedReply("no_summary") from None
    fields = {k: " ".join(v.split())[:ATTRIBUTE_CHARS] for k, v in got.model_dump().items()}
    if not all(fields.values()):
        raise RejectedReply("no_summary")
    return Attributes(**fields)


class ExplorationTracker:
    """The GP uncertainty tracker over n seed embeddings ([n, d]): `draw()` returns the
    index of the seed of largest posterior variance and observes it."""

    def __init__(self, x: np.ndarray, noise: float, rng: random.Random) -> None:
        bandwidth = median_bandwidth(x) or 1.0  # all seeds alike: any width is as good
        self.cov = gaussian_kernel(x, x, bandwidth)  # prior covariance at the seeds
        self.noise, self.rng = noise, rng
        self.draws = np.zeros(len(x), dtype=np.int64)

    def variance(self) -> np.ndarray:
        return np.asarray(np.diag(self.cov).copy())

    def draw(self) -> int:
        var = self.variance()
        top = np.flatnonzero(var >= var.max() - 1e-9)
        least = top[self.draws[top] == self.draws[top].min()]
        j = int(self.rng.choice(least.tolist()))
        col = self.cov[:, j].copy()
        self.cov -= np.outer(col, col) / (col[j] + self.noise)
        self.draws[j] += 1
        return j


class SynAlign(Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, seeds: list[str],
                 rng: random.Random, features: Features) -> None:
        self.client, self.s, self.seeds = client, s, seeds
        x = checked_features(features, seeds, "synalign")
        self.tracker = ExplorationTracker(x, s.synalign_noise, rng)
        self.summaries: dict[int, Attributes] = {}
        self.summarise = json_replies(client, Attributes.model_json_schema(), "attributes")

    def request(self, seed: int) -> tuple[Call, Any]:
        j = self.tracker.draw()
        return (lambda: self._write(j, seed)), j

    async def _write(self, j: int, seed: int) -> str:
        t = self.s.temperature
        attrs = self.summaries.get(j)
        if attrs is None:
            ask = render(PROMPT_ATTRIBUTES,
                         message=_shorten(self.seeds[j], self.s.example_chars))
            attrs = parse_attributes(await self.summarise.achat(SYSTEM_ATTRIBUTES, ask,
                                                                temperature=t, seed=seed))
            self.summaries[j] = attrs
            log.debug("synalign: seed %d: %s", j, attrs)
        user = render(PROMPT_SYNALIGN, label=self.s.label, **attrs.model_dump())
        return await self.client.achat(SYSTEM, user, temperature=t, seed=(seed + 1) % 2**52)
