"""`facsynth improve` and `facsynth label`: the improve loop on the command line, its pool
path's options, and labels coming back into a paused run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agent.cli.common import (
    FieldsOpt,
    GeneratorOpt,
    ModelOpt,
    RelevanceOpt,
    SaeOpt,
    TaskOpt,
    TaskOptionsOpt,
    app,
    err,
    key_values,
    one_line_errors,
    out,
    task_options,
)
from agent.cli.measure import (
    BatchSizeOpt,
    ConcurrencyOpt,
    Engine,
    EngineOpt,
    RayAddressOpt,
    ShardsOpt,
    ray_pool,
)
from agent.runs import build_settings as settings_from
from tools.errors import ConfigError
from tools.rundir import RunConfig


@app.command()
def improve(
    run_dir: Annotated[Path | None, typer.Option(help="where the run lives (new folder)")] = None,
    anchor: Annotated[Path | None, typer.Option(help="labelled rows representing the task")] = None,
    data: Annotated[Path | None, typer.Option(help="the training data to improve")] = None,
    eval_path: Annotated[
        Path | None, typer.Option("--eval", help="held-out labelled rows for the downstream "
                                  "metric (default: 25% of the anchor, kept out of it)")
    ] = None,
    task: TaskOpt = "toxicity",
    field: FieldsOpt = None,
    task_option: TaskOptionsOpt = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue the run in this folder where it stopped")
    ] = None,
    rounds: Annotated[int, typer.Option(help="synthesis rounds at most")] = 3,
    budget: Annotated[int, typer.Option(help="generated samples at most, all rounds")] = 400,
    top: Annotated[int, typer.Option(help="missing features targeted per round")] = 10,
    per_feature: Annotated[
        int, typer.Option(help="samples per targeted feature, on average: a round spreads "
                          "them by coverage deficit")
    ] = 2,
    max_per_feature: Annotated[
        int | None, typer.Option(help="samples for one feature in a round at most [default: 8]")
    ] = None,
    negatives: Annotated[
        float | None, typer.Option(help="share of each feature's samples asked as label 0 "
                                   "(harmless messages on its theme); 0: positives only "
                                   "[default: 0.5; pair tasks: 0, a pair has both sides]")
    ] = None,
    hosts: Annotated[
        bool | None, typer.Option("--hosts/--no-hosts", help="rewrite real anchor rows of the "
                                  "wanted label to carry each theme, or write from scratch "
                                  "[default: hosts]")
    ] = None,
    generator_kind: Annotated[
        str | None, typer.Option(help="prompted: the LLM (--generator) is asked to write each "
                                 "sample; adapted: a LoRA of the model trained once on the "
                                 "anchor (cached; minutes on CPU) writes them in the anchor's "
                                 "style (--hosts does not apply) [default: prompted]")
    ] = None,
    steer: Annotated[
        float | None, typer.Option(help="steer the local generator towards each target "
                                   "feature, in residual norms (0.25 helps on smollm2-135m; "
                                   "0.5+ garbles text); 0: off [default: 0]")
    ] = None,
    describe: Annotated[
        str | None, typer.Option(help="llm: the LLM summarises each targeted feature; spans: "
                                 "its strongest anchor span, no LLM call (fast; for small "
                                 "generators) [default: llm]")
    ] = None,
    epsilon: Annotated[float, typer.Option(help="stop when FAC gains less than this")] = 0.01,
    patience: Annotated[
        int, typer.Option(help="stop after this many rounds without a better eval metric")
    ] = 1,
    focus: Annotated[
        str, typer.Option(help="data (features absent from the data), model (over-represented "
                          "in the detector's errors on anchor rows) or both")
    ] = "data",
    detector: Annotated[str, typer.Option(help="the toxicity task's detector: probe (fast) or "
                                          "lora (the paper's)")] = "probe",
    label_gate: Annotated[
        str, typer.Option(help="detector (a kept sample's label must look like real rows of "
                          "that label to the current detector), llm (the LLM must give that "
                          "label, if it agrees with real anchor labels well enough), both, "
                          "or off; pair tasks: the task's model checks each pair's direction")
    ] = "detector",
    label_reference: Annotated[
        Path | None, typer.Option(help="labelled rows that know more than the seed (e.g. "
                                  "public toxicity data): a probe on them joins the detector "
                                  "judge of the label gate")
    ] = None,
    synthetic_share: Annotated[
        str | None, typer.Option(help="synthetic rows' share of each label's weight in the "
                                 "detector, in [0, 1), or none to weigh every row the same "
                                 "(default 0.2)")
    ] = None,
    relevance: RelevanceOpt = "auto",
    pool: Annotated[
        Path | None, typer.Option(help="unlabelled rows to pick from for labelling (JSONL, "
                                  "CSV or Parquet with a text column; its label column is "
                                  "read only with --labeler file)")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="where each round's new rows come from: generate "
                                 "(synthesis), pool (picked pool rows, labelled), both (pick "
                                 "first, then synthesise only for deficits no pool row "
                                 "fills) [default: pool with --pool, else generate]")
    ] = None,
    labeler: Annotated[
        str, typer.Option(help="who labels picked rows: human (the run pauses and writes "
                          "RUN/to-label/round-N.csv; `facsynth label RUN FILE` resumes it), "
                          "file (the pool's label column), judge (the label gate's judges; "
                          "disputed rows are dropped)")
    ] = "human",
    strategy: Annotated[
        str, typer.Option(help="how pool rows are picked: fac (fill the largest task-"
                          "feature deficits, weighted by the model's score), random, "
                          "uncertainty, top-score, coreset")
    ] = "fac",
    batch: Annotated[int, typer.Option(help="pool rows picked per round")] = 25,
    label_budget: Annotated[int, typer.Option(help="pool rows picked at most, all rounds")
                            ] = 100,
    pool_text_field: Annotated[str, typer.Option(help="the pool's text column")] = "text",
    pool_label_field: Annotated[str, typer.Option(
        help="the pool's label column (--labeler file)")] = "label",
    labels: Annotated[
        Path | None, typer.Option(help="with --resume: a filled-in to-label file (CSV or "
                                  "JSONL: row, label = 0, 1, skip or empty for later)")
    ] = None,
    engine: EngineOpt = Engine.local,
    shards: ShardsOpt = None,
    ray_address: RayAddressOpt = None,
    concurrency: ConcurrencyOpt = None,
    batch_size: BatchSizeOpt = None,
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    seed: int = 0,
) -> None:
    """Self-improvement rounds: coverage -> interpret -> generate -> verify -> train ->
    evaluate, until FAC gains level off. The task (--task) says what a row is and what is
    trained and scored on them. With --pool, rounds pick real rows worth labelling instead
    (or as well: --source both); --engine ray probes the pool on Ray into shards and streams
    the picks over them. Kill it any time; `--resume RUN_DIR` continues."""
    from agent.runs import start_run, validated
    from tools.detector import DetectorSettings
    from tools.label_gate import LabelGateSettings
    from tools.rundir import LoopSettings, RunSettings

    with one_line_errors():
        if labels is not None and resume is None:
            raise ConfigError("--labels goes with --resume RUN_DIR (the run waiting for them)")
        if resume is not None:
            cfg = RunConfig.read(resume)
            run = resume
            if labels is not None:
                _record_labels(run, labels, rest_skip=False)
        else:
            if run_dir is None or anchor is None or data is None:
                raise ConfigError("give --anchor, --data and --run-dir (or --resume RUN_DIR)")
            what = "improve options"
            cfg = validated(
                RunConfig, what, anchor=str(anchor), data=str(data), task=task,
                fields=key_values(field, "--field"), task_options=task_options(task_option),
                eval=str(eval_path) if eval_path else None, relevance=relevance,
                settings=validated(RunSettings, what, model=model, sae=sae,
                                   generator=generator),
                loop=validated(LoopSettings, what, max_rounds=rounds, budget=budget, top=top,
                               seed=seed, per_feature=per_feature, epsilon=epsilon,
                               patience=patience, focus=focus, **_share(synthetic_share),
                               **_given(max_per_feature=max_per_feature, negatives=negatives,
                                        hosts=hosts, steer=steer, describe=describe,
                                        generator=generator_kind),
                               label_gate=validated(
                                   LabelGateSettings, what, judge=label_gate,
                                   reference=_reference(label_reference))),
                detector=validated(DetectorSettings, "detector options", kind=detector),
                pool=_pool(pool, source, labeler, strategy, batch, label_budget,
                           pool_text_field, pool_label_field,
                           ray_pool(engine, shards, ray_address, concurrency, batch_size)),
            )
            _check_steer(cfg)
            run = run_dir
            cfg = start_run(run, cfg)
            if cfg.pool is not None and cfg.pool.labeler == "file":
                out.print(f"labels of picked rows come from {cfg.pool.path}'s "
                          f"{cfg.pool.label_field!r} column (--labeler file), standing in for "
                          "a person", soft_wrap=True)
        try:
            state = _run_loop(run, cfg, resume is not None)
        except KeyboardInterrupt:
            err.print(f"interrupted; what is done is kept: continue with facsynth improve "
                      f"--resume {run}", soft_wrap=True)
            raise typer.Exit(130) from None
    _said_stop(run, state)


def _said_stop(run: Path, state: dict[str, Any]) -> None:
    """One line: where the run stopped, or which file waits for labels."""
    paused = state.get("__interrupt__")
    if paused:
        info = paused[0].value
        out.print(f"[bold]round {info['round']}: {info['waiting']} of {info['picked']} picked "
                  f"rows wait for a label[/] in {info['to_label']} (and .jsonl): fill the "
                  f"label column (0, 1, skip; leave empty for later), then: facsynth label "
                  f"{run} FILE")
        return
    out.print(f"[bold]stopped after round {state.get('round')}:[/] {state.get('stop_reason')}; "
              f"FAC {state.get('fac', 0):.3f}. Report: facsynth report {run}")


def _pool(path: Path | None, source: str | None, labeler: str, strategy: str, batch: int,
          budget: int, text_field: str, label_field: str,
          ray: dict[str, Any] | None = None) -> Any:
    """The pool path's settings from the improve flags (None without --pool); `ray`: the
    ray engine's (`ray_pool`)."""
    from agent.runs import validated
    from tools.pool.select import SelectSettings
    from tools.pool.source import PoolSource

    if path is None:
        if source not in (None, "generate"):
            raise ConfigError(f"--source {source} needs --pool FILE (the rows to pick from)")
        if ray is not None:
            raise ConfigError("--engine ray probes and picks from a pool: it needs --pool "
                              "FILE")
        return None
    if source == "generate":
        raise ConfigError("--pool with --source generate: the pool would never be used; give "
                          "--source pool or both")
    what = "pool options"
    return validated(PoolSource, what, path=str(path), source=source or "pool",
                     labeler=labeler, budget=budget, text_field=text_field,
                     label_field=label_field,
                     select=validated(SelectSettings, what, strategy=strategy, batch=batch),
                     **(ray or {}))


def _record_labels(run: Path, file: Path, rest_skip: bool) -> None:
    from agent.pool_labels import add_labels

    got = add_labels(run, file=file, rest_skip=rest_skip)
    err.print(f"round {got.round}: {got.labelled} labels and {got.skipped} skips recorded"
              + (f", {got.ignored} rows left for later" if got.ignored else "")
              + f"; {got.waiting} rows still waiting")


@app.command()
def label(
    run_dir: Annotated[Path, typer.Argument(help="a pool run waiting for labels")],
    file: Annotated[Path, typer.Argument(help="the to-label file with its label column "
                                         "filled in (0, 1, skip; empty: later)")],
    rest_skip: Annotated[bool, typer.Option(
        "--rest-skip", help="skip every row still without a label, so the round goes on")
    ] = False,
) -> None:
    """Record a person's labels for a paused pool run and continue it: it retrains on them
    and picks the next round's rows (or asks again for rows still waiting)."""
    with one_line_errors():
        cfg = RunConfig.read(run_dir)
        _record_labels(run_dir, file, rest_skip)
        try:
            state = _run_loop(run_dir, cfg, True)
        except KeyboardInterrupt:
            err.print(f"interrupted; the labels are kept: continue with facsynth improve "
                      f"--resume {run_dir}", soft_wrap=True)
            raise typer.Exit(130) from None
    _said_stop(run_dir, state)


def _share(value: str | None) -> dict[str, Any]:
    """--synthetic-share as a LoopSettings field: absent keeps the default, `none` is None."""
    if value is None:
        return {}
    return {"synthetic_share": None if value.strip().lower() == "none" else value}


def _reference(path: Path | None) -> str | None:
    """--label-reference checked now (a bad file fails the start, not round 1), absolute."""
    if path is None:
        return None
    from tools.data import load_texts

    load_texts(path, require_labels=True)
    return str(path.resolve()) if path.exists() else str(path)  # a hub id as given


def _check_steer(cfg: RunConfig) -> None:
    """--steer needs the in-process generator: refuse the start, not round 1."""
    from agent.llm import choose_backend

    if cfg.loop.steer > 0 and cfg.loop.generator == "adapted":
        raise ConfigError(f"--steer {cfg.loop.steer:g} needs the prompted local generator; "
                          "the adapted generator does not steer")
    if cfg.loop.steer > 0:
        backend = choose_backend(settings_from(**cfg.settings.given()))
        if backend != "local":
            raise ConfigError(f"--steer {cfg.loop.steer:g} needs --generator local (SAE "
                              f"steering runs in-process); the generator here is {backend}")


def _given(**options: Any) -> dict[str, Any]:
    """The options given on the command line (LoopSettings holds their defaults)."""
    return {k: v for k, v in options.items() if v is not None}


def _run_loop(run: Path, cfg: RunConfig, resuming: bool) -> dict[str, Any]:
    from agent.runs import run_loop

    started = time.monotonic()

    def before(node: str, r: int) -> None:
        logging.getLogger("facsynth").info("round %d: %s", r, node)
        if err.is_terminal:
            err.print(f"[dim]round {r} · {node}[/]", end="\r")

    prev: dict[str, float] = {}

    def on_round(rec: Any) -> None:
        gain = f" ({rec.fac - prev['fac']:+.3f})" if "fac" in prev else ""
        metric = f", {rec.metric.label} {rec.metric.value:.3f}" if rec.metric else ""
        made = (f", kept {rec.kept}/{rec.generated} (hit {rec.hit_rate:.0%}, "
                f"{rec.disputed} label-disputed)" if rec.round and rec.generated else "")
        if rec.picked:
            made += (f", labelled {rec.labelled}/{rec.picked} picked pool rows "
                     f"({rec.positives} positive, {rec.labels_total} labels in all, by "
                     f"{rec.labeler})")
        out.print(f"round {rec.round}: FAC {rec.fac:.3f}{gain} (graded {rec.fac_graded:.3f}), "
                  f"{rec.n_missing} missing{made}"
                  f"{metric}, {rec.n_train} rows  [{time.monotonic() - started:.0f}s]")
        prev["fac"] = rec.fac

    bars = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
    )

    def progress(what: str, total: int) -> Callable[[int], None]:
        for old in list(bars.task_ids):
            bars.remove_task(old)
        task = bars.add_task(what, total=total)
        return lambda n: bars.advance(task, n)

    with bars:
        return run_loop(run, cfg, resuming, before=before, on_round=on_round, progress=progress)
