"""Reward modelling: (prompt, chosen, rejected) preference pairs -> a Bradley-Terry reward
head on frozen features, scored by pairwise accuracy on held-out pairs.

The probe reads each pair as two texts, the last `prompt_chars` characters of the prompt
followed by each response: prompt tail + chosen is the contrast's 1, prompt tail + rejected
its 0 (so F_task = features of preferred responses vs rejected ones).

The head: r(x) = w . (x / scale), P(chosen beats rejected) = sigmoid(r(x_c) - r(x_r)).
It is fit as an L2 logistic regression without intercept on the per-pair differences
d = x_c - x_r; half of the pairs, at random, enter as (-d, 0) so the problem has both
classes. Flipping a pair's sign leaves its loss unchanged and `scale` (per-dimension
root mean square of d) ignores signs, so the flips only make it a binary problem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from tools.data import read_rows
from tools.errors import ConfigError, DataError
from tools.tasks.base import Contrast, Features, check_fields
from tools.tasks.options import RewardOptions, check_options
from tools.tasks.pairs import PairDataset, PairTask, pair_weights, row_text


@dataclass(frozen=True)
class BradleyTerryHead:
    """A linear reward on frozen features: r(x) = weights . (x / scale)."""

    weights: np.ndarray  # [d]
    scale: np.ndarray  # [d], > 0

    def reward(self, x: np.ndarray) -> np.ndarray:
        """[n] reward of each feature row of x [n, d]."""
        return np.asarray((np.asarray(x) / self.scale) @ self.weights, dtype=np.float64)

    def prefer(self, x_chosen: np.ndarray, x_rejected: np.ndarray) -> np.ndarray:
        """[n] P(chosen beats rejected) per pair."""
        margin = self.reward(x_chosen) - self.reward(x_rejected)
        return np.asarray(1.0 / (1.0 + np.exp(-margin)))


class PairSplit(NamedTuple):
    """Row indices (sorted, disjoint): a small labelled seed, the rest of the training
    pool, and held-out dev pairs. Training on everything real = seed + pool."""

    seed: np.ndarray
    pool: np.ndarray
    dev: np.ndarray


@dataclass(frozen=True)
class RewardTask(PairTask):
    """`prompt_chars`: how much of the prompt (its end) the probe reads before each
    response; `c`: inverse L2 strength of the head's logistic regression."""

    name: ClassVar[str] = "reward"
    headline: ClassVar[str] = "pairwise_accuracy"
    about: ClassVar[str] = (
        "reward modelling: rows are preference pairs (prompt, chosen, rejected); the "
        "downstream model is a Bradley-Terry reward head scored by pairwise accuracy on "
        "held-out pairs")
    fields: ClassVar[tuple[str, ...]] = ("prompt", "chosen", "rejected")
    generate_prompt: ClassVar[str | None] = "generate_reward.v2"
    """Asks for the person's message; `writer` then asks for both replies (`reply_prompt`)."""
    reply_prompt: ClassVar[str] = "reply_reward.v1"
    system: ClassVar[str] = "You write realistic messages that people send to AI assistants."
    relevance_prompt: ClassVar[str] = "relevance_reward.v1"

    prompt_chars: int = 600
    c: float = 0.1

    def __post_init__(self) -> None:
        check_options(self.name, RewardOptions, {"prompt_chars": self.prompt_chars, "c": self.c})

    # -- rows ---------------------------------------------------------------------------
    def load(self, source: str | Path, *, fields: Mapping[str, str] | None = None,
             require_labels: bool = False) -> PairDataset:
        """Pairs from JSONL/CSV/Parquet or a hub id; every row needs a non-empty prompt and
        two different responses. A response may be blank: saying nothing is sometimes the
        preferred reply (4 HH-RLHF harmless-base pairs choose " " over a harmful answer).
        (A pair is its own label: `require_labels` is accepted for the common signature and
        always holds.)"""
        f = check_fields(self.name, self.fields, fields)
        prompts: list[str] = []
        chosen: list[str] = []
        rejected: list[str] = []
        for where, row in read_rows(source, list(f.values())):
            p = row_text(where, row, f["prompt"], self.fields)
            c, r = (row_text(where, row, f[k], self.fields, blank=True)
                    for k in ("chosen", "rejected"))
            if c == r:
                raise DataError(f"{where}: fields '{f['chosen']}' and '{f['rejected']}' are "
                                "the same text; a pair needs two different responses")
            prompts.append(p)
            chosen.append(c)
            rejected.append(r)
        if not prompts:
            raise DataError(f"{source}: the dataset has no rows; add at least one pair")
        return PairDataset(prompts, chosen, rejected, str(source))

    def texts(self, data: PairDataset) -> tuple[list[str], list[str]]:
        """(prompt tail + chosen, prompt tail + rejected), one of each per pair."""
        tails = [p[-self.prompt_chars:] if self.prompt_chars else "" for p in data.prompts]
        return ([t + c for t, c in zip(tails, data.chosen, strict=True)],
                [t + r for t, r in zip(tails, data.rejected, strict=True)])

    def probe_texts(self, data: PairDataset) -> Contrast:
        """Per pair, its chosen response (label 1) then its rejected one (label 0), paired:
        coverage compares what the responses say (the shared prompt would hide it; the head
        reads the prompt tail too, `texts`)."""
        texts = [t for pair in zip(data.chosen, data.rejected, strict=True) for t in pair]
        n = len(data)
        return Contrast(texts, [1, 0] * n, [i for i in range(n) for _ in (0, 1)], data.source,
                        paired=True)

    def split(self, data: PairDataset, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """About `frac` of the pairs held out; pairs whose prompts open alike (the first 100
        characters, case and spacing aside: the same dialogue) stay on one side."""
        from sklearn.model_selection import GroupShuffleSplit

        from tools.splits import near_duplicate_groups

        if not 0 < frac < 1:
            raise ConfigError(f"the held-out share must be in (0, 1), got {frac}")
        groups = near_duplicate_groups(data.prompts)
        if len(np.unique(groups)) < 2:
            raise DataError(f"{data.source}: all pairs share one prompt; nothing to hold out")
        splitter = GroupShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
        rest, held = next(splitter.split(np.arange(len(data)), groups=groups))
        return np.sort(rest), np.sort(held)

    def seed_pool_dev(self, data: PairDataset, *, seed_size: int, dev_frac: float = 0.25,
                      seed: int = 0) -> PairSplit:
        """Held-out dev pairs (`split`), then a seed of exactly `seed_size` pairs drawn by
        whole prompt groups from the rest; the pool is what remains. Fixed by `seed`."""
        from tools.splits import near_duplicate_groups

        rest, dev = self.split(data, dev_frac, seed)
        if not 0 < seed_size < len(rest):
            raise ConfigError(f"seed_size must be in [1, {len(rest) - 1}] (the {len(rest)} "
                              f"pairs outside dev), got {seed_size}")
        groups = near_duplicate_groups(data.prompts)[rest]
        members: dict[int, list[int]] = {}
        for row, g in zip(rest.tolist(), groups.tolist(), strict=True):
            members.setdefault(g, []).append(row)
        order = np.random.default_rng(seed).permutation(sorted(members))
        picked: list[int] = []
        for g in order.tolist():
            if len(picked) + len(members[g]) <= seed_size:
                picked += members[g]
            if len(picked) == seed_size:
                break
        seed_idx = np.array(sorted(picked), dtype=np.int64)
        return PairSplit(seed_idx, np.setdiff1d(rest, seed_idx), dev)

    def bind(self, ws: Any) -> RewardTask:
        """The task for a workspace (the head reads the features it is given: unchanged)."""
        return self

    # -- generated rows ------------------------------------------------------------------
    def assemble(self, message: str, good: str, bad: str, seed: int) -> str:
        """A staged pair (`StagedWriter`) in the `format_row` layout."""
        return self.format_row(f"\n\nHuman: {message}\n\nAssistant:", " " + good, " " + bad)

    def examples(self, data: PairDataset) -> list[str]:
        """Each pair's last human turn: what the generator is shown of real pairs (hosts,
        baseline examples), since `writer` asks for the message first."""
        return [self.format_row(p, c, r).split("\n", 1)[0].removeprefix("Human: ")
                for p, c, r in zip(data.prompts, data.chosen, data.rejected, strict=True)]

    def format_row(self, prompt: str, chosen: str, rejected: str) -> str:
        """A pair in the layout the generation prompt asks for (its last human turn)."""
        human = prompt.rsplit("Human:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
        return (f"Human: {' '.join(human.split())}\nBetter reply: {' '.join(chosen.split())}"
                f"\nWorse reply: {' '.join(rejected.split())}")

    def parse(self, reply: str) -> tuple[str, str, str] | None:
        """(prompt, chosen, rejected) from a reply in `format_row`'s layout, as HH-RLHF
        writes them ("\\n\\nHuman: ...\\n\\nAssistant:", replies after a space); None when
        a part is missing, empty, or both replies are the same."""
        m = _ROW.search(reply)
        if m is None:
            return None
        human, better, worse = m.group(1), m.group(2), m.group(3).split("\n\n")[0]
        human, better, worse = (" ".join(g.split()).strip("\"'") for g in (human, better, worse))
        if not (human and better and worse) or better == worse:
            return None
        return f"\n\nHuman: {human}\n\nAssistant:", " " + better, " " + worse

    # -- the downstream model ------------------------------------------------------------
    def features(self, data: PairDataset, features: Features) -> tuple[np.ndarray, np.ndarray]:
        """([n, d] chosen, [n, d] rejected) features, from one call (one probe batch)."""
        if not len(data):
            raise DataError(f"{data.source}: no pairs")
        good, bad = self.texts(data)
        x = np.asarray(features([*good, *bad]), dtype=np.float64)
        if len(x) != 2 * len(data):
            raise DataError(f"{len(x)} feature rows for {2 * len(data)} texts")
        return x[: len(data)], x[len(data):]

    def fit(self, train: PairDataset, features: Features, *, seed: int = 0,
            synthetic: Sequence[bool] | None = None,
            synthetic_share: float | None = None) -> BradleyTerryHead:
        """The Bradley-Terry head on `train`'s pairs. With `synthetic_share` s, synthetic
        pairs together weigh s of the total and real pairs 1 - s (like the detector's
        `row_weights`); without it every pair weighs the same."""
        from sklearn.linear_model import LogisticRegression

        n = len(train)
        if n < 2:
            raise DataError(f"a reward head needs at least 2 training pairs, got {n}")
        w = pair_weights(n, synthetic, synthetic_share)
        x_c, x_r = self.features(train, features)
        d = x_c - x_r
        used = d[w > 0]
        scale = np.sqrt(np.mean(used * used, axis=0))
        scale = np.where(scale > 1e-12, scale, 1.0)
        sign = np.ones(n)
        sign[np.random.default_rng(seed).permutation(n)[: n // 2]] = -1.0
        lr = LogisticRegression(C=self.c, fit_intercept=False, max_iter=5000)
        lr.fit(sign[:, None] * d / scale, (sign > 0).astype(np.int64), sample_weight=w)
        return BradleyTerryHead(np.asarray(lr.coef_[0], dtype=np.float64), scale)

    def save_model(self, model: BradleyTerryHead, folder: Path) -> None:
        from tools.tasks.pairs import save_arrays

        save_arrays(folder, {"weights": model.weights, "scale": model.scale},
                    {"task": self.name, "kind": "bradley-terry"})

    def load_model(self, folder: Path) -> BradleyTerryHead:
        from tools.tasks.pairs import load_arrays

        arrays, _ = load_arrays(folder, "reward head")
        return BradleyTerryHead(arrays["weights"], arrays["scale"])

    def agreement(self, model: BradleyTerryHead, data: PairDataset,
                  features: Features) -> np.ndarray:
        """[n] P(chosen beats rejected) under the head."""
        return model.prefer(*self.features(data, features))

    def gate(self, model: BradleyTerryHead, real: PairDataset, synthetic: PairDataset,
             features: Features, quantile: float = 0.25) -> np.ndarray:
        """A synthetic pair keeps its direction when the head prefers its chosen response at
        least as surely as it does for the `quantile` of real pairs."""
        if not len(synthetic):
            return np.zeros(0, dtype=bool)
        bar = np.quantile(self.agreement(model, real, features), quantile)
        return np.asarray(self.agreement(model, synthetic, features) >= bar)

    def metric(self, model: BradleyTerryHead, data: PairDataset,
               features: Features) -> dict[str, float]:
        """Pairwise accuracy (chosen scored above rejected; a tie counts half), the mean
        reward margin, and the number of pairs."""
        x_c, x_r = self.features(data, features)
        margin = model.reward(x_c) - model.reward(x_r)
        acc = float(np.mean(margin > 0) + 0.5 * np.mean(margin == 0))
        return {"pairwise_accuracy": acc, "mean_margin": float(margin.mean()),
                "n": float(len(data))}


_ROW = re.compile(r"Human:\s*(.+?)\n\s*Better reply:\s*(.+?)\n\s*Worse reply:\s*(.+?)\s*$",
                  re.DOTALL | re.IGNORECASE)
