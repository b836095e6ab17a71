"""Prismatic Synthesis (Jung et al., 2025, "Prismatic Synthesis: Gradient-based Data
Diversification Boosts Generalization in LLM Reasoning").

The paper measures diversity as G-Vendi, the Vendi score of a proxy model's projected loss
gradients (tools/diversity.py), and grows a dataset towards the under-populated parts of
that gradient space. Its recipe, and what it is here:

- Gradient space: per-row loss gradients of a small proxy LM, randomly projected (TRAK) and
  normalised -> the proxy is a one-hidden-layer tanh head (32 units) on the frozen features
  the project already has (`features`, e.g. the mean layer residual), standardised by the
  seeds' mean and std; a row's gradient of its log loss w.r.t. all the head's parameters,
  in closed form, projected to `prismatic_dim` (256) by a fixed seeded Rademacher matrix
  and unit-normalised (`tools.diversity.gradient_embeddings`). All rows here carry the
  asked label, so the head stays at its seeded initialisation (a logistic output cannot be
  fit to one class), fixed on the seeds and reused for every reply: the gradient space is
  that of a random tanh network, non-linear in the features (mostly their cosine times how alike
  the rows' hidden-unit slopes are), not the features' directions themselves.
- Clusters: k-means over the gradient embeddings -> scikit-learn's KMeans, k =
  `prismatic_clusters` (8, at most one per row), fit on the seeds and refit on seeds plus
  kept rows after every k kept rows (one "round" of the paper's iteration).
- Sparse clusters: those with the fewest rows -> a cluster is sparse while its row count
  (seeds and kept rows) is at most the `prismatic_sparse` quantile (0.5: the median) of the
  clusters' counts (the smallest count is always at most it, so some cluster is sparse).
- Generation: the LLM is prompted with seed rows drawn from sparse clusters -> each request
  picks a sparse cluster at random and shows `prismatic_examples` (3) of its rows (topped
  up from other sparse clusters when it has fewer), with the asked label.
- Filter: keep a generated row only if it falls into a sparse cluster -> the reply is
  embedded (one `features` call), assigned to its nearest centroid, and rejected as
  `dense_cluster` unless that cluster is sparse at that moment; kept rows count towards
  their cluster, so a cluster stops being sparse once it has caught up.
- Until the budget: the shared request loop (tools/baselines/driver.py `_drive`).

The paper's LLM is a strong reasoning model writing math problems with solutions; here the
configured chat client writes messages, and there is nothing to solve or verify.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np

from prompts import render
from tools.baselines.base import BaselineError, BaselineSettings, Call, Features, Strategy
from tools.baselines.methods import _shorten
from tools.diversity import fit_head, gradient_embeddings
from tools.generate import SYSTEM, AsyncChatClient, clean

log = logging.getLogger(__name__)

PROMPT_PRISMATIC = "baseline_prismatic.v1"


def checked_features(features: Features, texts: list[str], method: str) -> np.ndarray:
    """`features(texts)` as a float [len(texts), d] array; BaselineError otherwise."""
    x = np.asarray(features(texts), dtype=np.float64)
    if x.ndim != 2 or len(x) != len(texts):
        raise BaselineError(f"{method}: features returned shape {x.shape} for {len(texts)} "
                            "texts; need one row per text")
    return x


class Prismatic(Strategy):
    def __init__(self, client: AsyncChatClient, s: BaselineSettings, seeds: list[str],
                 rng: random.Random, features: Features) -> None:
        self.client, self.s, self.rng, self.features = client, s, rng, features
        self.rows = list(seeds)
        x = checked_features(features, self.rows, "prismatic")
        self.head = fit_head(x, [s.label] * len(x), seed=s.seed)
        self.emb = self._embed(x)
        self._cluster()
        self._last: tuple[str, np.ndarray, int] | None = None

    def _embed(self, x: np.ndarray) -> np.ndarray:
        """[n, dim] unit gradient embeddings of feature rows x."""
        return gradient_embeddings(x, [self.s.label] * len(x), dim=self.s.prismatic_dim,
                                   seed=self.s.seed, head=self.head)

    def _cluster(self) -> None:
        from sklearn.cluster import KMeans

        distinct = len(np.unique(self.emb.round(9), axis=0))  # k-means needs k distinct rows
        k = min(self.s.prismatic_clusters, distinct)
        self.kmeans = KMeans(n_clusters=k, n_init=4, random_state=self.s.seed).fit(self.emb)
        self.assigned = list(self.kmeans.labels_)
        self.counts = np.bincount(self.assigned, minlength=k)
        self.kept_since = 0
        log.debug("prismatic: %d rows in %d clusters, counts %s", len(self.rows), k,
                  self.counts.tolist())

    def sparse(self) -> np.ndarray:
        """[k] bool: the clusters whose row count is at most the sparse quantile."""
        return np.asarray(self.counts <= np.quantile(self.counts, self.s.prismatic_sparse))

    def request(self, seed: int) -> tuple[Call, Any]:
        sparse = [int(c) for c in np.flatnonzero(self.sparse() & (self.counts > 0))]
        cluster = self.rng.choice(sparse)
        members = [i for i, c in enumerate(self.assigned) if c == cluster]
        n = min(self.s.prismatic_examples, len(members))
        shown = self.rng.sample(members, n)
        others = [i for i, c in enumerate(self.assigned) if c in sparse and c != cluster]
        shown += self.rng.sample(others, min(self.s.prismatic_examples - n, len(others)))
        user = render(PROMPT_PRISMATIC, label=self.s.label,
                      examples=[_shorten(self.rows[i], self.s.example_chars) for i in shown])
        return (lambda: self.client.achat(SYSTEM, user, temperature=self.s.temperature,
                                          seed=seed)), cluster

    def extract(self, reply: str) -> str:
        return clean(reply)

    def check(self, text: str, ctx: Any) -> str | None:
        e = self._embed(checked_features(self.features, [text], "prismatic"))
        cluster = int(self.kmeans.predict(e)[0])
        if not self.sparse()[cluster]:
            return "dense_cluster"
        self._last = (text, e[0], cluster)  # read by `accepted` right after, if kept
        return None

    def accepted(self, text: str, ctx: Any) -> None:
        assert self._last is not None and self._last[0] == text
        _, e, cluster = self._last
        self.rows.append(text)
        self.emb = np.vstack([self.emb, e])
        self.assigned.append(cluster)
        self.counts[cluster] += 1
        self.kept_since += 1
        if self.kept_since >= len(self.counts):  # one round: refit on seeds + kept rows
            self._cluster()
