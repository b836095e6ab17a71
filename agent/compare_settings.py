"""What `facsynth compare` runs: its methods, protocols and settings, checked before any work
(agent/compare.py runs them)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.detector import DetectorSettings
from tools.errors import ConfigError
from tools.pool.select import STRATEGIES, SelectSettings
from tools.pool.source import PoolEngine, RayPool
from tools.rundir import LoopSettings

BASELINES = ("random", "self-instruct", "evol-instruct", "magpie", "cot-self-instruct", "sao",
             "prismatic", "synalign")
PAIR_BASELINES = ("random", "self-instruct", "cot-self-instruct", "sao")
TEXT_ONLY = ("evol-instruct", "magpie", "prismatic", "synalign")
"""Baselines that write single texts only (pair tasks compare the others)."""
PICKS = tuple(f"pick-{s}" for s in STRATEGIES)
"""The pool strategies as methods (`--labels pool`): each labels `budget` pool rows."""
FIXED = ("seed", "full", "fac", *BASELINES, *PICKS)
DEFAULT_METHODS = ("seed", "full", "fac", "random", "self-instruct", "evol-instruct", "magpie")
PAIR_METHODS = ("seed", "full", "fac", "random", "self-instruct")
POOL_METHODS = ("seed", *PICKS)
Protocol = Literal["seed", "anchor", "pool"]
Progress = Callable[[str], None]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""A variant's name: it names files in the work folder, so a safe slug."""


def pick_strategy(method: str) -> str | None:
    """The strategy of a pick method (`pick-fac` -> fac), None for other methods."""
    return method[len("pick-"):] if method.startswith("pick-") else None


class CompareSettings(BaseModel):
    """What `facsynth compare` runs (flags map one to one)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: str = Field("toxicity", description="what the rows are and what is trained on "
                      "them (tools/tasks: toxicity, reward, steering)")
    task_options: dict[str, Any] = Field(default_factory=dict,
                                         description="the task's own options")
    fields: dict[str, str] = Field(default_factory=dict, description="a pair task's column "
                                   "names, schema field -> column")
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> settings: fac with other LoopSettings "
        "(e.g. {'fac-nogate': {'label_gate': {'judge': 'off'}}}), or, for a name starting "
        "with pick-, a pool strategy with other SelectSettings (e.g. {'pick-fac-s0': "
        "{'strategy': 'fac', 'score_power': 0}})")
    labels: Protocol = "seed"
    budget: int = Field(100, ge=1, description="kept rows every synthetic method adds (with "
                        "--labels pool: pool rows every pick method labels)")
    request_factor: float = Field(
        3.0, ge=1, description="fac and the baselines stop after budget * this many requests")
    seeds: int = Field(5, ge=1)
    seed_frac: float = Field(0.1, gt=0, lt=1, description="share of the pool in a seed set")
    eval_frac: float = Field(0.25, gt=0, lt=1, description="held out when no eval file")
    rounds: int = Field(2, ge=1, description="fac: improve rounds")
    relevance: Literal["label", "llm", "auto"] = Field(
        "label", description="fac: which features are task-relevant (label: the task labels "
        "of the protocol; llm/auto: also the LLM's verdict)")
    top: int = Field(50, ge=1, description="fac: features targeted per round")
    loop: dict[str, Any] = Field(
        default_factory=dict, description="LoopSettings fields for fac and every variant")
    select: SelectSettings = Field(default_factory=SelectSettings, description="--labels "
                                   "pool: how every pick method picks (its strategy aside)")
    curve: list[int] = Field(default_factory=list, description="--labels pool: label counts "
                             "the learning curve reports (default: each doubling of the "
                             "batch, and the budget)")
    synthetic_share: float | None = Field(
        None, ge=0, lt=1, description="every method's added rows get this share of each "
        "class's weight in the detector (None: the same weight as real rows)")
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    engine: PoolEngine = Field("local", description="--labels pool with --pool: how the pool "
                               "is probed (local: in this process; ray: on Ray into shards, "
                               "as `facsynth probe --engine ray`; the picks then run in "
                               "memory, as on the local engine)")
    ray: RayPool = Field(default_factory=RayPool, description="--engine ray: shards, address, "
                         "actors and batch size")

    def check(self) -> None:
        """Every setting that can be checked before any work (a ConfigError otherwise)."""
        from tools.tasks import get_task

        get_task(self.task, **self.task_options)  # an unknown task or option fails now
        for name in self.variants:
            if not NAME.fullmatch(name):
                raise ConfigError(f"--variant {name!r}: a variant's name is letters, digits, "
                                  "'-' and '_' (at most 64, no dots or slashes: it names "
                                  "files in the work folder)")
        if self.task != "toxicity":
            text_only = [m for m in self.methods if m in TEXT_ONLY]
            if text_only:
                raise ConfigError(f"{', '.join(text_only)}: a text baseline; the {self.task} "
                                  f"task compares {', '.join(PAIR_BASELINES)} (they write "
                                  "whole pairs)")
        known = set(FIXED) | set(self.variants)
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ConfigError(f"unknown methods {', '.join(unknown)}: choose from "
                              f"{', '.join(FIXED)} or a --variant name")
        clash = set(self.variants) & set(FIXED)
        if clash:
            raise ConfigError(f"variant names {', '.join(sorted(clash))} clash with methods")
        picks = [m for m in self.methods if self.is_pick(m)]
        if picks and self.labels != "pool":
            raise ConfigError(f"{', '.join(picks)}: pool strategies label pool rows; run them "
                              "with --labels pool")
        if self.labels == "pool" and self.task != "toxicity":
            raise ConfigError(f"--labels pool: the {self.task} task has no pool path yet (a "
                              "pool row would be a pair whose preferred side a person "
                              "picks); use --labels seed or anchor")
        if self.labels == "pool" and "full" in self.methods:
            raise ConfigError("--labels pool: full knows every pool label; its reference is "
                              "seed (drop full from --methods, or use --labels anchor)")
        if self.engine == "ray" and self.labels != "pool":
            raise ConfigError("--engine ray probes the --pool file on Ray: use it with "
                              "--labels pool --pool FILE")
        if self.ray.candidates is not None:
            raise ConfigError("compare picks from the whole probed pool in memory: "
                              "candidates is an improve --engine ray setting")
        self.loop_for("fac", 0)  # --set: every loop setting, checked now
        for name in self.variants:
            if self.is_pick(name):
                self.select_for(name)
            else:
                self.loop_for(name, 0)

    @property
    def reference(self) -> str:
        return "full" if self.labels == "anchor" else "seed"

    def is_pick(self, method: str) -> bool:
        return method.startswith("pick-")

    def synthetic(self) -> list[str]:
        """The methods that generate rows (not seed, full or a pick method)."""
        return [m for m in self.methods if m not in ("seed", "full") and not self.is_pick(m)]

    def picks(self) -> list[str]:
        return [m for m in self.methods if self.is_pick(m)]

    def loop_for(self, method: str, seed: int) -> LoopSettings:
        requests = math.ceil(self.budget * self.request_factor)
        base = {"max_rounds": self.rounds, "budget": requests,
                "per_round": math.ceil(requests / self.rounds), "top": self.top,
                "epsilon": 0.0, "patience": self.rounds + 1, "seed": seed,
                **self.loop, **self.variants.get(method, {})}
        from agent.runs import validated

        where = "--set" if method == "fac" else f"--variant {method}"
        return validated(LoopSettings, f"compare loop settings ({where})", **base)

    def select_for(self, method: str) -> SelectSettings:
        """A pick method's settings: `select`, its strategy, its variant's overrides."""
        from agent.runs import validated

        strategy = pick_strategy(method)
        base = {**self.select.model_dump(), "strategy": strategy if strategy in STRATEGIES
                else "fac", **self.variants.get(method, {})}
        return validated(SelectSettings, f"pool selection settings of {method}", **base)


def work_key(settings: CompareSettings, *parts: Any) -> str:
    """Content hash of everything that shapes generated sets (settings and input texts);
    the seed count, the method list, the variants and the scoring-only `synthetic_share`
    are left out: seed s and method m are the same whatever else runs, so adding seeds,
    methods or variants reuses what is done (a variant whose settings changed under the
    same name is refused: `Comparison.generate`). The pool protocol generates as the seed
    protocol does, so the two share their work; the pick methods' own settings name their
    cached picks and rows instead (`PoolPicker`). The engine only says where the pool is
    probed (the same values up to fp32 order), so it is left out too."""
    left_out = {"seeds", "methods", "variants", "synthetic_share", "select", "curve",
                "engine", "ray"}
    if settings.task == "toxicity" and not settings.task_options:
        left_out |= {"task", "task_options"}  # as before tasks: their caches stay valid
    if not settings.fields:
        left_out.add("fields")
    shape = settings.model_dump(mode="json", exclude=left_out)
    if shape["labels"] == "pool":
        shape["labels"] = "seed"
    blob = json.dumps([shape, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def external_knowledge(settings: CompareSettings) -> list[str]:
    """What a method knew beyond the protocol's labels (declared in every report)."""
    out = []
    if settings.synthetic():
        out.append("the generator LLM's own knowledge (all synthetic methods)")
    if settings.picks():
        out.append("the pool's own labels, revealed for the rows a pick method picked (the "
                   "label column plays the annotator)")
    gates = [settings.loop.get("label_gate", {}), *(v.get("label_gate", {})
                                                    for v in settings.variants.values())]
    for gate in gates:
        if isinstance(gate, dict) and gate.get("reference"):
            out.append(f"label gate reference data {gate['reference']}")
        if isinstance(gate, dict) and gate.get("judge") in ("llm", "both"):
            out.append("the LLM label judge")
    return sorted(set(out))
