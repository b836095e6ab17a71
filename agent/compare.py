"""`facsynth compare`: does synthesis help *this* data? The experiment as a product command.

Split (once): without an eval file, a fixed stratified 25% of the labelled anchor is held out
(near-duplicate groups, e.g. jailbreak templates sharing their first 100 characters, stay on
one side); the rest is the pool. Each seed s draws a stratified seed set (`seed_frac`) from
the pool. Every method is a detector trained on the seed set plus its additions and scored
on the held-out rows (and on every `also_eval` file):

    seed      nothing added (the reference under --labels seed)
    full      the seed plus every other pool row with its real label (the reference under
              --labels anchor; under --labels seed an oracle that knows labels no method has)
    fac       facsynth's improve loop (agent/runs.py), `rounds` rounds
    <variant> fac with other loop settings (e.g. no label gate), for measuring one lever
    random, self-instruct, evol-instruct, magpie   the baseline synthesizers (tools/baselines)

Protocols (`labels`), stated in every result:
- seed: only the seed's labels are known. fac reads the pool as unlabelled text; its task
  labels are the seed detector's (seed rows keep their real labels; pool rows are labelled
  1 for the top share of seed-detector scores equal to the seed's positive rate). Baselines
  see the seed's positives as examples; magpie's queries are labelled by the seed detector.
- anchor: the pool's labels are known to every method: fac's anchor carries them, the
  baselines get all pool positives as examples, magpie is labelled by a detector trained on
  the whole pool.

Equal kept budgets: every synthetic method requests until `budget` rows pass its own
filters (the baselines retry; fac spends at most `request_factor * budget` requests), then
all of a seed's methods are cut to that seed's smallest kept count (a seeded random subset),
so every method adds the same number of rows. Paired differences against the reference
come with a 95% t interval over seeds. FAC (binary and graded) of every training set is
measured against the pool with its real labels (a diagnostic: no method reads it), and so is
the label agreement of each method's added rows with a detector trained on all real pool
rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tools.data import TextDataset, write_text_atomic
from tools.detector import DetectorSettings
from tools.errors import ConfigError
from tools.paired import PairedDiff, paired_diff
from tools.rundir import LoopSettings, RunConfig, RunPaths, read_samples
from tools.settings import Settings
from tools.tasks import ToxicityTask, workspace_features
from tools.tasks.pairs import KEYS
from tools.verify import Sample, gate_pass_rate
from tools.workspace import Workspace

log = logging.getLogger(__name__)

BASELINES = ("random", "self-instruct", "evol-instruct", "magpie")
PAIR_BASELINES = ("random", "self-instruct")
TEXT_ONLY = ("evol-instruct", "magpie")
"""Baselines that write single texts only (pair tasks compare the others)."""
FIXED = ("seed", "full", "fac", *BASELINES)
DEFAULT_METHODS = ("seed", "full", "fac", *BASELINES)
PAIR_METHODS = ("seed", "full", "fac", *PAIR_BASELINES)
Protocol = Literal["seed", "anchor"]
Progress = Callable[[str], None]


class CompareSettings(BaseModel):
    """What `facsynth compare` runs (flags map one to one)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: str = Field("toxicity", description="what the rows are and what is trained on "
                      "them (tools/tasks: toxicity, reward, steering)")
    task_options: dict[str, Any] = Field(default_factory=dict,
                                         description="the task's own options")
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> LoopSettings fields: fac with other "
        "settings, e.g. {'fac-nogate': {'label_gate': {'judge': 'off'}}}")
    labels: Protocol = "seed"
    budget: int = Field(100, ge=1, description="kept rows every synthetic method adds")
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
    synthetic_share: float | None = Field(
        None, ge=0, lt=1, description="every method's added rows get this share of each "
        "class's weight in the detector (None: the same weight as real rows)")
    detector: DetectorSettings = Field(default_factory=DetectorSettings)

    def check(self) -> None:
        from tools.tasks import get_task

        get_task(self.task, **self.task_options)  # an unknown task or option fails now
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
        for name in self.variants:
            self.loop_for(name, 0)  # validates every variant's settings now

    @property
    def reference(self) -> str:
        return "seed" if self.labels == "seed" else "full"

    def synthetic(self) -> list[str]:
        return [m for m in self.methods if m not in ("seed", "full")]

    def loop_for(self, method: str, seed: int) -> LoopSettings:
        requests = math.ceil(self.budget * self.request_factor)
        base = {"max_rounds": self.rounds, "budget": requests,
                "per_round": math.ceil(requests / self.rounds), "top": self.top,
                "epsilon": 0.0, "patience": self.rounds + 1, "seed": seed,
                **self.loop, **self.variants.get(method, {})}
        from agent.runs import validated

        return validated(LoopSettings, f"compare loop settings of {method}", **base)


class LoopStats(BaseModel):
    """What a fac run did before the cut to equal budgets, summed over seeds."""

    requests: int
    hits: int = Field(description="samples whose target feature fired")
    kept: int
    disputed: int = Field(description="hits the label gate dropped")

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def gate_pass_rate(self) -> float:
        return gate_pass_rate(self.kept, self.disputed)


def loop_stats(folder: Path, method: str, seeds: int) -> LoopStats | None:
    """Requests, hits, kept and disputed of a fac method's runs (None: not a fac run)."""
    from tools.rundir import History

    total = LoopStats(requests=0, hits=0, kept=0, disputed=0)
    found = False
    for s in range(seeds):
        run = folder / f"s{s}" / method
        if not RunPaths(run).history.exists():
            continue
        found = True
        for r in History.load(run).rounds[1:]:
            total.requests += r.generated
            total.kept += r.kept
            total.disputed += r.disputed
            total.hits += sum(h.activated for h in r.per_feature.values())
    return total if found else None


class MethodResult(BaseModel):
    n_train: float
    n_added: float
    loop: LoopStats | None = Field(None, description="fac methods: requests, hits, gate")
    fac: float
    fac_graded: float
    metric_mean: float = Field(description="the task's headline metric (CompareResult.metric)")
    metric_std: float
    per_seed_metric: list[float]
    means: dict[str, float] = Field(default_factory=dict,
                                    description="every metric the task measured, averaged")
    label_agreement: float | None = Field(
        None, description="added rows whose label a detector trained on all real pool rows "
        "agrees with (diagnostic)")
    positive_agreement: float | None = Field(None, description="the same, label-1 rows only")
    paired: PairedDiff | None = Field(None, description="the metric minus the reference's, "
                                      "paired by seed")
    also: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per extra eval file: metric mean and paired diff")


class CompareResult(BaseModel):
    task: str = "toxicity"
    metric: str = Field("auprc", description="the headline metric every method is scored by")
    protocol: Protocol
    reference: str
    rule: str = Field(description="how kept budgets were equalised")
    external: list[str] = Field(description="knowledge beyond the protocol's labels")
    settings: CompareSettings
    n_pool: int
    n_eval: int
    kept: list[int] = Field(description="rows every synthetic method added, per seed")
    methods: dict[str, MethodResult]
    spearman_fac_metric: float
    spearman_graded_metric: float
    seconds: float = 0.0


class Row(BaseModel):
    """One (seed, method) measurement; cached in the work folder."""

    method: str
    seed: int
    n_train: int
    n_added: int
    fac: float
    fac_graded: float
    metrics: dict[str, float] = Field(description="the task's metrics on the eval rows")
    also: dict[str, dict[str, float]] = Field(default_factory=dict)
    agreement: float | None = None
    positive_agreement: float | None = None


def work_key(settings: CompareSettings, *parts: Any) -> str:
    """Content hash of everything that shapes generated sets (settings and input texts);
    the seed count, the method list, the variants and the scoring-only `synthetic_share`
    are left out: seed s and method m are
    the same whatever else runs, so adding seeds, methods or variants reuses what is done
    (a variant whose settings changed under the same name is refused: `Comparison.generate`)."""
    left_out = {"seeds", "methods", "variants", "synthetic_share"}
    if settings.task == "toxicity" and not settings.task_options:
        left_out |= {"task", "task_options"}  # as before tasks: their caches stay valid
    shape = settings.model_dump(mode="json", exclude=left_out)
    blob = json.dumps([shape, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def split_pool(task: Any, anchor: Any, eval_set: Any | None,
               eval_frac: float) -> tuple[Any, Any]:
    """(pool, eval): the eval file's rows, else a fixed held-out share of the anchor (the
    task's split: stratified for text rows, whole prompt groups for pairs)."""
    if eval_set is not None:
        return anchor, eval_set
    keep, held = task.split(anchor, eval_frac, 0)
    return anchor.subset(keep), anchor.subset(held)


def rows_key(data: Any) -> list[Any]:
    """A task's rows as plain lists, for `work_key`."""
    if isinstance(data, TextDataset):
        return [data.texts, data.labels]
    return [data.prompts, data.chosen, data.rejected]


class LazyOpen:
    """Stands for an LLM client that `opener()` makes on first attribute access."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = self._opener()
        return getattr(self._client, name)


class Comparison:
    """One compare run: shared model, SAE, activation cache and LLM across seeds; the task
    (tools/tasks) says what a row is, how its model trains and what it scores."""

    def __init__(self, ws: Workspace, llm: Any, task: Any, pool: Any, ev: Any,
                 settings: CompareSettings, work: Path,
                 also: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> None:
        self.ws, self.llm, self.pool, self.ev, self.s = ws, llm, pool, ev, settings
        self.task = task.bind(ws)
        self.features = workspace_features(ws)
        self.work, self.also = work, also or {}
        self.progress = progress or (lambda what: None)

    # -- the task's model -----------------------------------------------------------------
    def fit(self, data: Any, seed: int, n_real: int | None = None) -> Any:
        extra: dict[str, Any] = {}
        if n_real is not None and n_real < len(data) and self.s.synthetic_share is not None:
            mask = np.arange(len(data)) >= n_real
            extra = {"synthetic": mask, "synthetic_share": self.s.synthetic_share}
        return self.task.fit(data, self.features, seed=seed, **extra)

    # -- one seed -------------------------------------------------------------------------
    def run_seed(self, s: int) -> list[Row]:
        pool = self.pool
        rest, seed_idx = self.task.split(pool, self.s.seed_frac, s)
        seed_set = pool.subset(seed_idx)
        full = pool.subset([*seed_idx, *rest])
        models: dict[str, Any] = {}

        def model(name: str) -> Any:
            """The seed set's or the full pool's model, fit on first use (a pair task's
            fit can take minutes; a seed whose methods add nothing needs neither)."""
            if name not in models:
                self.progress(f"seed {s}: the {name} model")
                models[name] = self.fit(seed_set if name == "seed" else full, s)
            return models[name]

        if self.s.labels == "seed":
            task_rows = self.task.pseudo_label(model("seed"), pool, self.features, seed_idx)
            shown = seed_set
        else:
            task_rows, shown = pool, pool
        added = {m: self.generate(m, s, task_rows, seed_set, shown)
                 for m in self.s.synthetic()}
        if "magpie" in added:
            labeler = model("seed" if self.s.labels == "seed" else "full")
            added["magpie"] = self.label(labeler, added["magpie"])
        kept = min([self.s.budget, *(len(v) for v in added.values())])
        rng = np.random.default_rng(s)
        added = {m: [v[i] for i in sorted(rng.permutation(len(v))[:kept])]
                 for m, v in added.items()}
        rows = []
        for method in self.s.methods:
            cache = row_path(self.work / f"s{s}" / "rows", method, kept,
                             self.s.synthetic_share)
            if cache.exists():
                rows.append(Row.model_validate_json(cache.read_text()))
                continue
            self.progress(f"seed {s}: scoring {method}")
            extra = [] if method == "full" else added.get(method, [])
            same = next((r for r in rows if r.method == "seed"), None)
            if method not in ("seed", "full") and not extra and same is not None:
                # nothing added: the same rows as the seed, so the same (seeded) model
                rows.append(same.model_copy(update={"method": method}))
            else:
                data = full if method == "full" else self.task.extend(seed_set, extra)
                n_real = len(data) - len(extra)  # full: every row is real
                rows.append(self.measure(method, s, data, extra, n_real,
                                         lambda: model("full")))
            write_text_atomic(cache, rows[-1].model_dump_json())
        return rows

    def measure(self, method: str, s: int, data: Any, extra: list[Sample], n_real: int,
                oracle: Callable[[], Any]) -> Row:
        model = self.fit(data, s, n_real=n_real)
        metrics = self.task.metric(model, self.ev, self.features)
        also = {name: self.task.metric(model, d, self.features) for name, d in self.also.items()}
        texts = self.task.probe_texts(data).texts
        report = self.ws.coverage(self.task.probe_texts(self.pool).dataset(),
                                  TextDataset(texts, None, method))
        agreement = positive = None
        if extra:
            added = self.task.extend(self.pool.subset([]), extra)
            judged = self.task.agreement(oracle(), added, self.features) >= 0.5
            agreement = float(np.mean(judged))
            claimed = np.array([1 if x.label is None else x.label for x in extra])
            if isinstance(added, TextDataset) and (claimed == 1).any():
                positive = float(np.mean(judged[claimed == 1]))
        return Row(method=method, seed=s, n_train=len(data), n_added=len(extra),
                   fac=report.fac, fac_graded=report.fac_graded, metrics=metrics, also=also,
                   agreement=agreement, positive_agreement=positive)

    def label(self, model: Any, samples: list[Sample]) -> list[Sample]:
        """Magpie's queries labelled by `model` (text tasks only)."""
        texts = TextDataset([x.text for x in samples], None, "magpie")
        y = self.task.scores(model, texts, self.features) >= 0.5
        return [x.model_copy(update={"label": int(v)}) for x, v in zip(samples, y, strict=True)]

    # -- generation -----------------------------------------------------------------------
    def generate(self, method: str, s: int, task_rows: Any, seed_set: Any,
                 shown: Any) -> list[Sample]:
        """`method`'s generated rows for seed `s` (cached); baselines are shown the real rows
        `shown` (the seed set, or the pool under the anchor protocol)."""
        path = self.work / f"s{s}" / f"{method}.jsonl"
        run = RunPaths(self.work / f"s{s}" / method)
        if method not in BASELINES and run.config.exists():
            done = RunConfig.read(run.dir).loop
            if done != self.s.loop_for(method, s):
                raise ConfigError(
                    f"{run.dir}: {method} ran with other loop settings before; give the "
                    "variant a new name, or remove that folder to run it again")
        if path.exists():
            return read_samples(path)
        self.progress(f"seed {s}: generating {method}")
        if method in BASELINES:
            samples = self.baseline(method, s, shown)
        else:
            samples = self.fac(method, s, task_rows, seed_set)
        write_text_atomic(path, "".join(x.model_dump_json() + "\n" for x in samples))
        return samples

    def baseline(self, method: str, s: int, shown: Any) -> list[Sample]:
        from tools.baselines import BaselineSettings, magpie_prefix, synthesize

        prefix = magpie_prefix(self.ws.model.tokenizer) if method == "magpie" else None
        concurrency = self.s.loop_for("fac", s).concurrency  # the same as fac's
        pairs = self.s.task != "toxicity"
        bs = BaselineSettings(seed=s, magpie_prefix=prefix, max_tokens=256 if pairs else 96,
                              max_requests_factor=self.s.request_factor,
                              concurrency=concurrency)
        if not pairs:
            return synthesize(method, seeds=self.task.examples(shown),  # type: ignore[arg-type]
                              budget=self.s.budget, client=self.llm, settings=bs)
        # a pair task's baselines write whole pairs in the task's layout (tools/baselines/pairs)
        from tools.baselines.pairs import synthesize_pairs

        return synthesize_pairs(method, self.task, data=shown, budget=self.s.budget,
                                client=self.llm, settings=bs)

    def fac(self, method: str, s: int, task_rows: Any, seed_set: Any) -> list[Sample]:
        """The real improve loop on (task anchor, seed set); its kept rows of all rounds.
        Its inputs are written into the run folder, so an interrupted compare resumes it.
        The loop's own eval set is the seed set: its metric decides nothing here
        (patience > rounds, epsilon 0), and the held-out rows stay unseen."""
        from agent.runs import run_loop, start_run

        run_dir = self.work / f"s{s}" / method
        inputs = run_dir.parent / "inputs"
        for name, part in (("task", task_rows), ("seed", seed_set)):
            write_text_atomic(inputs / f"{name}.jsonl", rows_jsonl(part))
        fields = {} if self.s.task == "toxicity" else dict(zip(self.task.fields, KEYS,
                                                                strict=True))
        cfg = RunConfig(task=self.s.task, task_options=self.s.task_options, fields=fields,
                        anchor=str(inputs / "task.jsonl"), data=str(inputs / "seed.jsonl"),
                        eval=str(inputs / "seed.jsonl"), relevance=self.s.relevance,
                        loop=self.s.loop_for(method, s), detector=self.s.detector)
        resuming = RunPaths(run_dir).config.exists()
        if not resuming:
            cfg = start_run(run_dir, cfg)
        run_loop(run_dir, cfg, resuming, workspace=self.ws, llm=self.llm)
        paths = RunPaths(run_dir)
        return [x for r in range(1, self.s.rounds + 1) for x in read_samples(paths.data(r))]


def row_path(folder: Path, method: str, kept: int, share: float | None) -> Path:
    """Where a seed's row of `method` is kept in its `folder`. A row depends on its method,
    seed, the kept count and the synthetic share; seed and full hold no generated rows, so
    theirs holds for any kept count (one written under a kept count before is reused)."""
    tail = "" if share is None else f".w{share:g}"
    if method not in ("seed", "full"):
        return folder / f"{method}.k{kept}{tail}.json"
    path = folder / f"{method}{tail}.json"
    named = re.compile(rf"{re.escape(method)}\.k\d+{re.escape(tail)}\.json")
    older = sorted(p for p in folder.glob(f"{method}.k*.json") if named.fullmatch(p.name))
    return path if path.exists() or not older else older[0]


def rows_jsonl(data: Any) -> str:
    """A task's rows as JSONL in its default schema (text/label, or prompt/chosen/rejected
    for pairs; `RunConfig.fields` stays empty for them)."""
    if isinstance(data, TextDataset):
        assert data.labels is not None
        return "".join(json.dumps({"text": t, "label": y}) + "\n"
                       for t, y in zip(data.texts, data.labels, strict=True))
    return "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                   for p, c, r in zip(data.prompts, data.chosen, data.rejected, strict=True))


def summarize(rows: list[Row], settings: CompareSettings, kept: list[int],
              headline: str = "auprc") -> dict[str, MethodResult]:
    by: dict[str, list[Row]] = {}
    for row in rows:
        by.setdefault(row.method, []).append(row)
    ref = {r.seed: r for r in by.get(settings.reference, [])}
    out = {}
    for method, rs in by.items():
        score = [r.metrics[headline] for r in rs]
        paired = None
        if method != settings.reference and ref:
            paired = paired_diff(score, [ref[r.seed].metrics[headline] for r in rs])
        also: dict[str, dict[str, Any]] = {}
        for name in rs[0].also:
            mine = [r.also[name][headline] for r in rs]
            also[name] = {"metric_mean": float(np.mean(mine))}
            if method != settings.reference and ref:
                also[name]["paired"] = paired_diff(
                    mine, [ref[r.seed].also[name][headline] for r in rs]).model_dump()
        agree = [r.agreement for r in rs if r.agreement is not None]
        pos = [r.positive_agreement for r in rs if r.positive_agreement is not None]
        out[method] = MethodResult(
            n_train=float(np.mean([r.n_train for r in rs])),
            n_added=float(np.mean([r.n_added for r in rs])),
            fac=float(np.mean([r.fac for r in rs])),
            fac_graded=float(np.mean([r.fac_graded for r in rs])),
            metric_mean=float(np.mean(score)),
            metric_std=float(np.std(score, ddof=1)) if len(score) > 1 else 0.0,
            means={k: float(np.mean([r.metrics[k] for r in rs])) for k in rs[0].metrics},
            per_seed_metric=score, paired=paired, also=also,
            label_agreement=float(np.mean(agree)) if agree else None,
            positive_agreement=float(np.mean(pos)) if pos else None,
        )
    return out


def spearman(methods: dict[str, MethodResult], field: str) -> float:
    from scipy.stats import spearmanr

    if len(methods) < 3:
        return float("nan")
    xs = [getattr(m, field) for m in methods.values()]
    ys = [m.metric_mean for m in methods.values()]
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


def run_compare(
    anchor_path: str | Path, settings: CompareSettings, *, work: Path,
    eval_path: str | Path | None = None, also: Sequence[str | Path] = (),
    app_settings: Settings | None = None, progress: Progress | None = None,
    on_seed: Callable[[int, list[Row]], None] | None = None,
) -> CompareResult:
    """The whole comparison (see the module doc). Generated sets and per-seed rows are
    cached under `work/<key>`, so an interrupted compare resumes and a rerun only reports."""
    import time

    from agent.llm import open_llm
    from tools.tasks import get_task

    settings.check()
    started = time.monotonic()
    # the toxicity task's detector is compare's --detector
    task = (ToxicityTask(detector=settings.detector) if settings.task == "toxicity"
            else get_task(settings.task, **settings.task_options))
    anchor = task.load(anchor_path, require_labels=True)
    ev = task.load(eval_path, require_labels=True) if eval_path else None
    extra = {Path(p).stem: task.load(p, require_labels=True) for p in also}
    pool, ev = split_pool(task, anchor, ev, settings.eval_frac)
    app = app_settings or Settings()
    folder = work / work_key(settings, app.model_dump(mode="json"), *rows_key(anchor),
                             *rows_key(ev))
    ws = Workspace(app)
    rows: list[Row] = []
    kept: list[int] = []
    with contextlib.ExitStack() as stack:
        # the LLM (a vLLM server takes minutes to start) opens only when something is not
        # cached yet: a rerun that only re-scores never starts it
        llm = LazyOpen(lambda: stack.enter_context(open_llm(app, folder, ws)))
        comp = Comparison(ws, llm, task, pool, ev, settings, folder, extra, progress)
        for s in range(settings.seeds):
            got = comp.run_seed(s)
            kept.append(max((r.n_added for r in got), default=0))
            rows.extend(got)
            if on_seed:
                on_seed(s, got)
    methods = summarize(rows, settings, kept, task.headline)
    for name, m in methods.items():
        m.loop = loop_stats(folder, name, settings.seeds)
    return CompareResult(
        task=settings.task, metric=task.headline, protocol=settings.labels,
        reference=settings.reference,
        rule="every synthetic method requested until budget rows passed its own filters "
             f"(at most budget x {settings.request_factor:g} requests), then all were cut to "
             "the seed's smallest kept count",
        external=external_knowledge(settings), settings=settings, n_pool=len(pool),
        n_eval=len(ev), kept=kept, methods=methods,
        spearman_fac_metric=spearman(methods, "fac"),
        spearman_graded_metric=spearman(methods, "fac_graded"),
        seconds=round(time.monotonic() - started, 1),
    )


def external_knowledge(settings: CompareSettings) -> list[str]:
    """What a method knew beyond the protocol's labels (declared in every report)."""
    out = ["the generator LLM's own knowledge (all synthetic methods)"]
    gates = [settings.loop.get("label_gate", {}), *(v.get("label_gate", {})
                                                    for v in settings.variants.values())]
    for gate in gates:
        if isinstance(gate, dict) and gate.get("reference"):
            out.append(f"label gate reference data {gate['reference']}")
        if isinstance(gate, dict) and gate.get("judge") in ("llm", "both"):
            out.append("the LLM label judge")
    return sorted(set(out))
