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
filters and fac's label gate (every baseline's but magpie's, whose rows a detector labels;
every method spends at most `request_factor * budget` requests), then all of a
seed's methods are cut to that seed's smallest kept count (a seeded random subset), so every
method adds the same number of rows. A method with fewer than half the budget on a seed
(`MIN_SHARE`: a 135M writer rarely follows CoT-Self-Instruct's answer marker) has failed
there: no row for that seed, the reason in `failures`, and no cut of the others to its few.
Paired differences against the reference come with a 95% t interval over seeds. FAC (binary
and graded) of every training set is measured against the pool with its real labels (a
diagnostic: no method reads it), and so is the label agreement of each method's added rows
with a detector trained on all real pool rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.compare_parts import CountedGate, CountedLLM, LazyOpen, Remembered
from agent.compare_results import (
    CompareResult,
    LoopStats,
    MethodResult,
    Row,
    failed_methods,
    loop_stats,
    row_path,
    spearman,
    summarize,
)
from agent.compare_settings import (
    BASELINES,
    DEFAULT_METHODS,
    FIXED,
    PAIR_BASELINES,
    PAIR_METHODS,
    PICKS,
    POOL_METHODS,
    CompareSettings,
    Progress,
    external_knowledge,
    work_key,
)
from tools.data import TextDataset, both_labels, write_text_atomic
from tools.errors import ConfigError, UsageError
from tools.rundir import RunConfig, RunPaths, read_samples
from tools.settings import Settings
from tools.tasks import ToxicityTask, workspace_features
from tools.tasks.pairs import KEYS
from tools.verify import Sample
from tools.workspace import Workspace

log = logging.getLogger(__name__)
MIN_SHARE = 0.5
"""A synthetic method (fac, a variant or a baseline) that writes fewer than this share of
--budget usable rows on a seed has failed there: it gets no row for that seed (reported in
`failures`), and the others' kept count is not cut to its few."""

__all__ = [
    "BASELINES", "DEFAULT_METHODS", "FIXED", "PAIR_BASELINES", "PAIR_METHODS", "PICKS",
    "POOL_METHODS", "CompareResult", "CompareSettings", "Comparison", "LoopStats",
    "MethodResult", "Row", "run_compare", "split_pool", "work_key",
]


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


class Comparison:
    """One compare run: shared model, SAE, activation cache and LLM across seeds; the task
    (tools/tasks) says what a row is, how its model trains and what it scores."""

    def __init__(self, ws: Workspace, llm: Any, task: Any, pool: Any, ev: Any,
                 settings: CompareSettings, work: Path,
                 also: dict[str, Any] | None = None,
                 progress: Progress | None = None,
                 external_pool: TextDataset | None = None,
                 external_path: str | Path | None = None) -> None:
        from agent.compare_pool import PoolPicker

        self.ws, self.llm, self.pool, self.ev, self.s = ws, llm, pool, ev, settings
        self.task = task.bind(ws)
        self.features = Remembered(workspace_features(ws))
        self.work, self.also = work, also or {}
        self.progress = progress or (lambda what: None)
        self.picker = PoolPicker(self, external_pool, external_path)

    # -- the task's model -----------------------------------------------------------------
    def fit(self, data: Any, seed: int, n_real: int | None = None,
            row_scale: np.ndarray | None = None) -> Any:
        extra: dict[str, Any] = {}
        if n_real is not None and n_real < len(data) and self.s.synthetic_share is not None:
            mask = np.arange(len(data)) >= n_real
            extra = {"synthetic": mask, "synthetic_share": self.s.synthetic_share}
        if row_scale is not None:  # SynAlign's re-weighting (text rows only)
            extra["row_scale"] = row_scale
        return self.task.fit(data, self.features, seed=seed, **extra)

    def alignment(self, data: Any, n_real: int) -> np.ndarray:
        """SynAlign's MMD weights of the synthetic rows of `data` (after `n_real`) towards
        the real rows of the same label, 1 for real rows (tools/diversity.mmd_weights)."""
        from tools.diversity import mmd_weights

        scale = np.ones(len(data))
        labels = np.asarray(data.labels)
        for label in (0, 1):
            synth = [i for i in range(n_real, len(data)) if labels[i] == label]
            real = [i for i in range(n_real) if labels[i] == label]
            if synth and len(real) >= 2:
                scale[synth] = mmd_weights(self.features([data.texts[i] for i in synth]),
                                           self.features([data.texts[i] for i in real]))
        return scale

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

        if self.s.labels in ("seed", "pool"):  # the pool protocol's synthesis: as seed
            task_rows = self.task.pseudo_label(model("seed"), pool, self.features, seed_idx)
            shown = seed_set
        else:
            task_rows, shown = pool, pool
        gate = self.gate(s, task_rows, seed_set, model)
        made = {m: self.generate(m, s, task_rows, seed_set, shown, gate)
                for m in self.s.synthetic()}
        need = math.ceil(MIN_SHARE * self.s.budget)
        for m, v in made.items():
            if v is not None and len(v) < need:  # too few to compare: it failed here
                calls = json.loads((self.work / f"s{s}" / f"{m}.calls.json").read_text())
                gated = f", {calls['disputed']} more disputed by the label gate" \
                    if calls.get("disputed") else ""
                write_text_atomic(self.work / f"s{s}" / f"{m}.failed.json", json.dumps({
                    "error": f"{m}: {len(v)} of {self.s.budget} usable rows after "
                             f"{calls['calls']} LLM calls{gated} (fewer than {need})",
                    "calls": calls["calls"]}))
                made[m] = None
            elif v is not None:  # enough now (None: generate's BaselineError, kept on file)
                (self.work / f"s{s}" / f"{m}.failed.json").unlink(missing_ok=True)
        added = {m: v for m, v in made.items() if v is not None}
        if "magpie" in added:
            labeler = model("seed" if self.s.labels == "seed" else "full")
            added["magpie"] = self.label(labeler, added["magpie"])
        kept = min([self.s.budget, *(len(v) for v in added.values())])
        rng = np.random.default_rng(s)
        added = {m: [v[i] for i in sorted(rng.permutation(len(v))[:kept])]
                 for m, v in added.items()}
        rows = []
        for method in self.s.methods:
            if method in made and made[method] is None:
                continue  # it failed on this seed: no row (`failures` says why)
            cache = row_path(self.work / f"s{s}" / "rows", self.picker.key(method)
                             if self.s.is_pick(method) else method, kept, self.s.synthetic_share)
            if cache.exists():
                rows.append(Row.model_validate_json(cache.read_text()))
                continue
            self.progress(f"seed {s}: scoring {method}")
            if self.s.is_pick(method):
                rows.append(self.picker.row(method, s, seed_set, rest, kept))
                write_text_atomic(cache, rows[-1].model_dump_json())
                continue
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
        scale = self.alignment(data, n_real) if method == "synalign" and extra else None
        model = self.fit(data, s, n_real=n_real, row_scale=scale)
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
                   agreement=agreement, positive_agreement=positive,
                   g_vendi=self.g_vendi(data), llm_calls=self.calls(method, s))

    def g_vendi(self, data: Any) -> float | None:
        """G-Vendi (Prismatic Synthesis' gradient-space diversity) of a text training set."""
        if not isinstance(data, TextDataset) or data.labels is None:
            return None
        from tools.diversity import g_vendi

        return g_vendi(self.features(data.texts), data.labels, seed=0)

    def calls(self, method: str, s: int) -> tuple[int, int] | None:
        """(LLM calls, rows kept before the cut) of `method`'s generation for seed `s`."""
        path = self.work / f"s{s}" / f"{method}.calls.json"
        if not path.exists():
            return None
        got = json.loads(path.read_text())
        return int(got["calls"]), int(got["kept"])

    def label(self, model: Any, samples: list[Sample]) -> list[Sample]:
        """Magpie's queries labelled by `model` (text tasks only)."""
        texts = TextDataset([x.text for x in samples], None, "magpie")
        y = self.task.scores(model, texts, self.features) >= 0.5
        return [x.model_copy(update={"label": int(v)}) for x, v in zip(samples, y, strict=True)]

    # -- generation -----------------------------------------------------------------------
    def gate(self, s: int, task_rows: Any, seed_set: Any,
             model: Callable[[str], Any]) -> Callable[[Sample], bool] | None:
        """The label gate fac's loop applies to its rows (tools/label_gate.py, the detector
        judge: the seed model's score of a row must look like real rows of its label, the
        task rows being the real ones), as the last filter of every baseline's request loop
        but magpie's (a detector labels those): a disputed row is a spent request, so a
        baseline, like fac, requests until `budget` rows pass it or its requests run out.
        None: `label_gate.judge=off`."""
        settings = self.s.loop_for("fac", s).label_gate
        if settings.judge == "off":
            return None
        empty = seed_set.subset([])

        def check(row: Sample) -> bool:
            ok = self.task.gate(model("seed"), task_rows, self.task.extend(empty, [row]),
                                self.features, settings.quantile)
            return bool(ok[0])

        return check

    def generate(self, method: str, s: int, task_rows: Any, seed_set: Any, shown: Any,
                 gate: Callable[[Sample], bool] | None = None) -> list[Sample] | None:
        """`method`'s generated rows for seed `s` (cached); baselines are shown the real rows
        `shown` (the seed set, or the pool under the anchor protocol). A baseline returns
        what it wrote, however few (`run_seed` decides whether that is a failure); None: it
        raised a BaselineError (the LLM still failing after its retries, no seed text),
        recorded in `<method>.failed.json`. `gate` (see `Comparison.gate`) checks a
        baseline's rows but magpie's; `<method>.calls.json` counts the rows it disputed."""
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
        failed = path.with_name(f"{method}.failed.json")
        if failed.exists():  # remove the file to try again
            return None
        self.progress(f"seed {s}: generating {method}")
        llm = CountedLLM(self.llm)
        counted = CountedGate(gate) if gate is not None and method != "magpie" else None
        if method in BASELINES:
            from tools.baselines import BaselineError

            try:
                samples = self.baseline(method, s, shown, llm, counted)
            except BaselineError as e:  # reported (`failures`); the other methods go on
                log.warning("seed %d: %s", s, e)
                write_text_atomic(failed, json.dumps({"error": str(e), "calls": llm.calls}))
                return None
        else:
            samples = self.fac(method, s, task_rows, seed_set, llm)
        disputed = counted.disputed if counted else 0
        write_text_atomic(path.with_name(f"{method}.calls.json"), json.dumps(
            {"calls": llm.calls, "kept": len(samples), "disputed": disputed}))
        write_text_atomic(path, "".join(x.model_dump_json() + "\n" for x in samples))
        return samples

    def baseline(self, method: str, s: int, shown: Any, llm: Any,
                 gate: Callable[[Sample], bool] | None) -> list[Sample]:
        from tools.baselines import BaselineSettings, magpie_prefix, synthesize

        prefix = magpie_prefix(self.ws.model.tokenizer) if method == "magpie" else None
        concurrency = self.s.loop_for("fac", s).concurrency  # the same as fac's
        pairs = self.s.task != "toxicity"
        bs = BaselineSettings(seed=s, magpie_prefix=prefix, max_tokens=256 if pairs else 96,
                              max_requests_factor=self.s.request_factor,
                              concurrency=concurrency, allow_short=True)
        if not pairs:
            return synthesize(method, seeds=self.task.examples(shown),  # type: ignore[arg-type]
                              budget=self.s.budget, client=llm, settings=bs,
                              features=self.features, gate=gate)
        # a pair task's baselines write whole pairs in the task's layout (tools/baselines/pairs)
        from tools.baselines.pairs import synthesize_pairs

        return synthesize_pairs(method, self.task, data=shown, budget=self.s.budget,
                                client=llm, settings=bs, gate=gate)

    def fac(self, method: str, s: int, task_rows: Any, seed_set: Any,
            llm: Any) -> list[Sample]:
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
        run_loop(run_dir, cfg, resuming, workspace=self.ws, llm=llm)
        paths = RunPaths(run_dir)
        return [x for r in range(1, self.s.rounds + 1) for x in read_samples(paths.data(r))]



def rows_jsonl(data: Any) -> str:
    """A task's rows as JSONL in its default schema (text/label, or prompt/chosen/rejected
    for pairs; `RunConfig.fields` stays empty for them)."""
    if isinstance(data, TextDataset):
        assert data.labels is not None
        return "".join(json.dumps({"text": t, "label": y}) + "\n"
                       for t, y in zip(data.texts, data.labels, strict=True))
    return "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                   for p, c, r in zip(data.prompts, data.chosen, data.rejected, strict=True))



@contextlib.contextmanager
def work_lock(folder: Path, work: Path) -> Iterator[None]:
    """Hold `folder`'s lock for the block: a second compare on the same work (same settings
    and data) is refused at once instead of doing the whole work again beside it."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(f"another facsynth compare is running on --work {work} with the same "
                         "settings and data; wait for it to finish (its results are then "
                         "reused), or give this one another --work") from None
    try:
        yield
    finally:
        lock.release()


def run_compare(
    anchor_path: str | Path, settings: CompareSettings, *, work: Path,
    eval_path: str | Path | None = None, also: Sequence[str | Path] = (),
    app_settings: Settings | None = None, progress: Progress | None = None,
    on_seed: Callable[[int, list[Row]], None] | None = None,
    pool_path: str | Path | None = None,
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
    fields = settings.fields or None
    anchor = task.load(anchor_path, fields=fields, require_labels=True)
    ev = task.load(eval_path, fields=fields, require_labels=True) if eval_path else None
    extra = {Path(p).stem: task.load(p, fields=fields, require_labels=True) for p in also}
    for flag, scored in (("--eval", ev), *(("--also-eval", d) for d in extra.values())):
        if isinstance(scored, TextDataset):  # pairs carry their own contrast
            both_labels(scored, flag, f"{task.headline} needs both")
    pool, ev = split_pool(task, anchor, ev, settings.eval_frac)
    external, dropped = None, 0
    if settings.engine == "ray" and pool_path is None:
        raise ConfigError("--engine ray probes the --pool file on Ray: give --pool FILE (the "
                          "anchor's own rows are probed in this process)")
    if pool_path is not None:
        from agent.compare_pool import drop_eval_copies

        external = task.load(pool_path, require_labels=True)
        external, dropped = drop_eval_copies(external, [ev, *extra.values()],
                                             settings.select.near_threshold)
        if dropped:
            log.warning("--pool %s: %d rows copy an eval row and were dropped", pool_path,
                        dropped)
    app = app_settings or Settings()
    folder = work / work_key(settings, app.model_dump(mode="json"), *rows_key(anchor),
                             *rows_key(ev), *([] if external is None else rows_key(external)))
    ws = Workspace(app)
    rows: list[Row] = []
    kept: list[int] = []
    with work_lock(folder, work), contextlib.ExitStack() as stack:
        # the LLM (a vLLM server takes minutes to start) opens only when something is not
        # cached yet: a rerun that only re-scores never starts it
        llm = LazyOpen(lambda: stack.enter_context(open_llm(app, folder, ws)))
        comp = Comparison(ws, llm, task, pool, ev, settings, folder, extra, progress,
                          external, pool_path)
        for s in range(settings.seeds):
            got = comp.run_seed(s)
            kept.append(max((r.n_added for r in got), default=0))
            rows.extend(got)
            if on_seed:
                on_seed(s, got)
    methods = summarize(rows, settings, kept, task.headline)
    failures = failed_methods(folder, settings)
    for name, m in methods.items():
        m.loop = loop_stats(folder, name, settings.seeds)
    return CompareResult(
        task=settings.task, metric=task.headline, protocol=settings.labels,
        reference=settings.reference,
        rule=("every synthetic method requested until budget rows passed its own filters "
              f"(at most budget x {settings.request_factor:g} requests), then all were cut to "
              "the seed's smallest kept count; a method with fewer than "
              f"{math.ceil(MIN_SHARE * settings.budget)} failed on that seed (no row)") + (
            f"; every pick method labelled that many pool rows, {settings.select.batch} a "
            "round, each round's model scoring the next round's pool" if settings.picks()
            else ""),
        external=external_knowledge(settings), settings=settings, n_pool=len(pool),
        n_candidates=(len(external) if external is not None
                      else len(pool) - round(settings.seed_frac * len(pool)))
        if settings.picks() else None, pool_dropped=dropped,
        n_eval=len(ev), kept=kept, methods=methods,
        spearman_fac_metric=spearman(methods, "fac"),
        spearman_graded_metric=spearman(methods, "fac_graded"),
        spearman_g_vendi_metric=spearman(methods, "g_vendi"),
        seconds=round(time.monotonic() - started, 1), failures=failures,
    )
