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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tools.data import TextDataset, load_texts, write_text_atomic
from tools.detector import DetectorSettings, Metrics, evaluate, fit_detector
from tools.errors import ConfigError
from tools.paired import PairedDiff, paired_diff
from tools.rundir import LoopSettings, RunConfig, RunPaths, read_samples
from tools.settings import Settings
from tools.splits import stratified_split
from tools.verify import Sample, gate_pass_rate
from tools.workspace import Workspace

log = logging.getLogger(__name__)

BASELINES = ("random", "self-instruct", "evol-instruct", "magpie")
FIXED = ("seed", "full", "fac", *BASELINES)
DEFAULT_METHODS = ("seed", "full", "fac", *BASELINES)
Protocol = Literal["seed", "anchor"]
Progress = Callable[[str], None]


class CompareSettings(BaseModel):
    """What `facsynth compare` runs (flags map one to one)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    auprc_mean: float
    auprc_std: float
    auroc_mean: float
    per_seed_auprc: list[float]
    label_agreement: float | None = Field(
        None, description="added rows whose label a detector trained on all real pool rows "
        "agrees with (diagnostic)")
    positive_agreement: float | None = Field(None, description="the same, label-1 rows only")
    paired: PairedDiff | None = Field(None, description="AUPRC minus the reference's, paired")
    also: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per extra eval file: AUPRC mean and paired diff")


class CompareResult(BaseModel):
    protocol: Protocol
    reference: str
    rule: str = Field(description="how kept budgets were equalised")
    external: list[str] = Field(description="knowledge beyond the protocol's labels")
    settings: CompareSettings
    n_pool: int
    n_eval: int
    kept: list[int] = Field(description="rows every synthetic method added, per seed")
    methods: dict[str, MethodResult]
    spearman_fac_auprc: float
    spearman_graded_auprc: float
    seconds: float = 0.0


class Row(BaseModel):
    """One (seed, method) measurement; cached in the work folder."""

    method: str
    seed: int
    n_train: int
    n_added: int
    fac: float
    fac_graded: float
    metrics: Metrics
    also: dict[str, Metrics] = Field(default_factory=dict)
    agreement: float | None = None
    positive_agreement: float | None = None


def work_key(settings: CompareSettings, *parts: Any) -> str:
    """Content hash of everything that shapes generated sets (settings and input texts);
    the seed count, the method list, the variants and the scoring-only `synthetic_share`
    are left out: seed s and method m are
    the same whatever else runs, so adding seeds, methods or variants reuses what is done
    (a variant whose settings changed under the same name is refused: `Comparison.generate`)."""
    shape = settings.model_dump(mode="json",
                                exclude={"seeds", "methods", "variants", "synthetic_share"})
    blob = json.dumps([shape, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def split_pool(anchor: TextDataset, eval_set: TextDataset | None,
               eval_frac: float) -> tuple[TextDataset, TextDataset]:
    if eval_set is not None:
        return anchor, eval_set
    assert anchor.labels is not None
    keep, held = stratified_split(anchor.labels, eval_frac, seed=0, texts=anchor.texts)
    return anchor.subset(keep), anchor.subset(held)


def pseudo_labels(scores: np.ndarray, seed_rows: Sequence[int] | np.ndarray,
                  seed_labels: Sequence[int]
                  ) -> list[int]:
    """Seed rows keep their labels; the others are 1 for the top share of scores equal to
    the seed's positive rate (the seed detector's view of the pool)."""
    rate = float(np.mean(seed_labels))
    cut = np.quantile(scores, 1 - rate) if 0 < rate < 1 else 0.5
    labels = (scores >= cut).astype(int)
    labels[list(seed_rows)] = list(seed_labels)
    return [int(x) for x in labels]


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
    """One compare run: shared model, SAE, activation cache and LLM across seeds."""

    def __init__(self, ws: Workspace, llm: Any, pool: TextDataset, ev: TextDataset,
                 settings: CompareSettings, work: Path,
                 also: dict[str, TextDataset] | None = None,
                 progress: Progress | None = None) -> None:
        self.ws, self.llm, self.pool, self.ev, self.s = ws, llm, pool, ev, settings
        self.work, self.also = work, also or {}
        self.progress = progress or (lambda what: None)

    # -- detectors ------------------------------------------------------------------------
    def features(self, texts: Sequence[str]) -> np.ndarray | None:
        if not self.s.detector.needs_features:
            return None
        return self.ws.probe(TextDataset(list(texts), None, "compare")).pooled()

    def fit(self, texts: Sequence[str], labels: Sequence[int], seed: int,
            n_real: int | None = None) -> Any:
        folder = None
        if self.s.detector.kind == "lora":
            from tools.models import resolve_model_source

            folder = resolve_model_source(self.ws.settings.model, self.ws.settings.home)[0]
        extra: dict[str, Any] = {}
        if n_real is not None and n_real < len(texts) and self.s.synthetic_share is not None:
            mask = np.arange(len(texts)) >= n_real
            extra = {"synthetic": mask, "synthetic_share": self.s.synthetic_share}
        return fit_detector(self.s.detector, list(texts), labels, features=self.features(texts),
                            model_folder=folder, seed=seed, device=self.ws.settings.device,
                            **extra)

    def scores(self, model: Any, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.score(list(texts), features=self.features(texts)))

    # -- one seed -------------------------------------------------------------------------
    def run_seed(self, s: int) -> list[Row]:
        pool = self.pool
        assert pool.labels is not None
        rest, seed_idx = stratified_split(pool.labels, self.s.seed_frac, seed=s, texts=pool.texts)
        seed_set = pool.subset(seed_idx)
        assert seed_set.labels is not None
        full = pool.subset([*seed_idx, *rest])
        assert full.labels is not None
        self.progress(f"seed {s}: reference detectors")
        seed_model = self.fit(seed_set.texts, seed_set.labels, s)
        oracle = self.fit(full.texts, full.labels, s)
        if self.s.labels == "seed":
            task_labels = pseudo_labels(self.scores(seed_model, pool.texts), seed_idx,
                                        seed_set.labels)
            examples = [t for t, y in zip(seed_set.texts, seed_set.labels, strict=True) if y]
            labeler = seed_model
        else:
            task_labels = list(pool.labels)
            examples = [t for t, y in zip(pool.texts, pool.labels, strict=True) if y]
            labeler = oracle
        task = TextDataset(list(pool.texts), task_labels, "task")
        added = {m: self.generate(m, s, task, seed_set, examples) for m in self.s.synthetic()}
        if "magpie" in added:
            added["magpie"] = self.label(labeler, added["magpie"])
        kept = min([self.s.budget, *(len(v) for v in added.values())])
        rng = np.random.default_rng(s)
        added = {m: [v[i] for i in sorted(rng.permutation(len(v))[:kept])]
                 for m, v in added.items()}
        rows = []
        for method in self.s.methods:
            # a row depends on its method, seed, the kept count and the synthetic share
            share = "" if self.s.synthetic_share is None else f".w{self.s.synthetic_share:g}"
            cache = self.work / f"s{s}" / "rows" / f"{method}.k{kept}{share}.json"
            if cache.exists():
                rows.append(Row.model_validate_json(cache.read_text()))
                continue
            self.progress(f"seed {s}: scoring {method}")
            if method == "full":
                texts, labels, extra = full.texts, full.labels, []
            else:
                extra = added.get(method, [])
                texts = seed_set.texts + [x.text for x in extra]
                labels = seed_set.labels + [1 if x.label is None else x.label for x in extra]
            n_real = len(texts) - len(extra)  # full: every row is real
            rows.append(self.measure(method, s, texts, labels, extra, n_real, oracle))
            write_text_atomic(cache, rows[-1].model_dump_json())
        return rows

    def measure(self, method: str, s: int, texts: list[str], labels: list[int],
                extra: list[Sample], n_real: int, oracle: Any) -> Row:
        model = self.fit(texts, labels, s, n_real=n_real)
        assert self.ev.labels is not None
        metrics = evaluate(self.scores(model, self.ev.texts), self.ev.labels)
        also = {name: evaluate(self.scores(model, d.texts), d.labels or [])
                for name, d in self.also.items()}
        report = self.ws.coverage(self.pool, TextDataset(texts, None, method))
        agreement = positive = None
        if extra:
            claimed = np.array([1 if x.label is None else x.label for x in extra])
            judged = self.scores(oracle, [x.text for x in extra]) >= 0.5
            agreement = float(np.mean(judged == claimed.astype(bool)))
            if (claimed == 1).any():
                positive = float(np.mean(judged[claimed == 1]))
        return Row(method=method, seed=s, n_train=len(texts), n_added=len(extra),
                   fac=report.fac, fac_graded=report.fac_graded, metrics=metrics, also=also,
                   agreement=agreement, positive_agreement=positive)

    def label(self, model: Any, samples: list[Sample]) -> list[Sample]:
        y = self.scores(model, [x.text for x in samples]) >= 0.5
        return [x.model_copy(update={"label": int(v)}) for x, v in zip(samples, y, strict=True)]

    # -- generation -----------------------------------------------------------------------
    def generate(self, method: str, s: int, task: TextDataset, seed_set: TextDataset,
                 examples: list[str]) -> list[Sample]:
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
            samples = self.baseline(method, s, examples)
        else:
            samples = self.fac(method, s, task, seed_set)
        write_text_atomic(path, "".join(x.model_dump_json() + "\n" for x in samples))
        return samples

    def baseline(self, method: str, s: int, examples: list[str]) -> list[Sample]:
        from tools.baselines import BaselineSettings, magpie_prefix, synthesize

        prefix = magpie_prefix(self.ws.model.tokenizer) if method == "magpie" else None
        concurrency = self.s.loop_for("fac", s).concurrency  # the same as fac's
        bs = BaselineSettings(seed=s, magpie_prefix=prefix, max_tokens=96,
                              max_requests_factor=self.s.request_factor,
                              concurrency=concurrency)
        return synthesize(method, seeds=examples, budget=self.s.budget,  # type: ignore[arg-type]
                          client=self.llm, settings=bs)

    def fac(self, method: str, s: int, task: TextDataset, seed_set: TextDataset
            ) -> list[Sample]:
        """The real improve loop on (task anchor, seed set); its kept rows of all rounds.
        Its inputs are written into the run folder, so an interrupted compare resumes it.
        The loop's own eval set is the seed set: its metric decides nothing here
        (patience > rounds, epsilon 0), and the held-out rows stay unseen."""
        from agent.runs import run_loop, start_run

        run_dir = self.work / f"s{s}" / method
        inputs = run_dir.parent / "inputs"
        for name, part in (("task", task), ("seed", seed_set)):
            assert part.labels is not None
            write_text_atomic(inputs / f"{name}.jsonl", "".join(
                json.dumps({"text": t, "label": y}) + "\n"
                for t, y in zip(part.texts, part.labels, strict=True)))
        cfg = RunConfig(anchor=str(inputs / "task.jsonl"), data=str(inputs / "seed.jsonl"),
                        eval=str(inputs / "seed.jsonl"), relevance=self.s.relevance,
                        loop=self.s.loop_for(method, s), detector=self.s.detector)
        resuming = RunPaths(run_dir).config.exists()
        if not resuming:
            cfg = start_run(run_dir, cfg)
        run_loop(run_dir, cfg, resuming, workspace=self.ws, llm=self.llm)
        paths = RunPaths(run_dir)
        return [x for r in range(1, self.s.rounds + 1) for x in read_samples(paths.data(r))]


def summarize(rows: list[Row], settings: CompareSettings, kept: list[int]
              ) -> dict[str, MethodResult]:
    by: dict[str, list[Row]] = {}
    for row in rows:
        by.setdefault(row.method, []).append(row)
    ref = {r.seed: r for r in by.get(settings.reference, [])}
    out = {}
    for method, rs in by.items():
        auprc = [r.metrics.auprc for r in rs]
        paired = None
        if method != settings.reference and ref:
            paired = paired_diff(auprc, [ref[r.seed].metrics.auprc for r in rs])
        also: dict[str, dict[str, Any]] = {}
        for name in rs[0].also:
            mine = [r.also[name].auprc for r in rs]
            also[name] = {"auprc_mean": float(np.mean(mine))}
            if method != settings.reference and ref:
                also[name]["paired"] = paired_diff(
                    mine, [ref[r.seed].also[name].auprc for r in rs]).model_dump()
        agree = [r.agreement for r in rs if r.agreement is not None]
        pos = [r.positive_agreement for r in rs if r.positive_agreement is not None]
        out[method] = MethodResult(
            n_train=float(np.mean([r.n_train for r in rs])),
            n_added=float(np.mean([r.n_added for r in rs])),
            fac=float(np.mean([r.fac for r in rs])),
            fac_graded=float(np.mean([r.fac_graded for r in rs])),
            auprc_mean=float(np.mean(auprc)),
            auprc_std=float(np.std(auprc, ddof=1)) if len(auprc) > 1 else 0.0,
            auroc_mean=float(np.mean([r.metrics.auroc for r in rs])),
            per_seed_auprc=auprc, paired=paired, also=also,
            label_agreement=float(np.mean(agree)) if agree else None,
            positive_agreement=float(np.mean(pos)) if pos else None,
        )
    return out


def spearman(methods: dict[str, MethodResult], field: str) -> float:
    from scipy.stats import spearmanr

    if len(methods) < 3:
        return float("nan")
    xs = [getattr(m, field) for m in methods.values()]
    ys = [m.auprc_mean for m in methods.values()]
    if len(set(xs)) < 2:
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

    settings.check()
    started = time.monotonic()
    anchor = load_texts(anchor_path, require_labels=True)
    ev = load_texts(eval_path, require_labels=True) if eval_path else None
    extra = {Path(p).stem: load_texts(p, require_labels=True) for p in also}
    pool, ev = split_pool(anchor, ev, settings.eval_frac)
    app = app_settings or Settings()
    folder = work / work_key(settings, app.model_dump(mode="json"), anchor.texts, anchor.labels,
                             ev.texts, ev.labels)
    ws = Workspace(app)
    rows: list[Row] = []
    kept: list[int] = []
    with contextlib.ExitStack() as stack:
        # the LLM (a vLLM server takes minutes to start) opens only when something is not
        # cached yet: a rerun that only re-scores never starts it
        llm = LazyOpen(lambda: stack.enter_context(open_llm(app, folder, ws)))
        comp = Comparison(ws, llm, pool, ev, settings, folder, extra, progress)
        for s in range(settings.seeds):
            got = comp.run_seed(s)
            kept.append(max((r.n_added for r in got), default=0))
            rows.extend(got)
            if on_seed:
                on_seed(s, got)
    methods = summarize(rows, settings, kept)
    for name, m in methods.items():
        m.loop = loop_stats(folder, name, settings.seeds)
    return CompareResult(
        protocol=settings.labels, reference=settings.reference,
        rule="every synthetic method requested until budget rows passed its own filters "
             f"(at most budget x {settings.request_factor:g} requests), then all were cut to "
             "the seed's smallest kept count",
        external=external_knowledge(settings), settings=settings, n_pool=len(pool),
        n_eval=len(ev), kept=kept, methods=methods,
        spearman_fac_auprc=spearman(methods, "fac"),
        spearman_graded_auprc=spearman(methods, "fac_graded"),
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
