"""`facsynth coverage`, `probe` and `train-sae`: measuring a dataset in SAE features."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from agent.cli.common import (
    DeltaOpt,
    FieldsOpt,
    LabelField,
    ModelOpt,
    SaeOpt,
    TaskOpt,
    TextField,
    app,
    err,
    key_values,
    one_line_errors,
    out,
    progress_bar,
    save,
    writable,
)
from agent.runs import build_settings as settings_from
from tools.errors import ConfigError
from tools.ray_cluster import BATCH_SIZE

if TYPE_CHECKING:
    from tools.ray_probe import ProbeRun
    from tools.settings import Settings


class Engine(StrEnum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[Engine, typer.Option(
    help="local: probe in this process through the activation cache; ray: Ray Data actors "
    "probe the data into Parquet shards (pools of 10^5+ rows; see --shards, --ray-address)")]
ShardsOpt = Annotated[Path | None, typer.Option(
    "--shards", help="--engine ray: the shard folder (default FACSYNTH_HOME/shards/"
    "<model+SAE+settings>/<hash of the data's location>); a rerun probes only new texts")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="--engine ray: the Ray cluster to use (default: RAY_ADDRESS, else "
    "a single-node cluster on this machine, stopped afterwards)")]
ConcurrencyOpt = Annotated[int | None, typer.Option(
    min=1, help="--engine ray: probe actors (default: one per GPU; on the cluster facsynth "
    "starts, one single-threaded actor per core, as many as half the free memory holds; "
    "on a given cluster, one per 4 CPUs)")]
BatchSizeOpt = Annotated[int | None, typer.Option(
    min=1, help=f"--engine ray: most texts per actor call (default {BATCH_SIZE}; small "
    "pools get smaller calls, 2 or more per actor)")]


@contextmanager
def _ray_progress() -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(advance, set_total) of a progress bar whose total comes after the first pass."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(TextColumn("[bold]probing (ray)"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
    with bar:
        task = bar.add_task("probing", total=None)
        yield (lambda n: bar.advance(task, n)), (lambda n: bar.update(task, total=n))


def _ray_run(data: str, settings: Settings, text_field: str, shards: Path | None,
             ray_address: str | None, concurrency: int | None,
             batch_size: int | None) -> ProbeRun:
    """Probe DATA's new texts into shards with the ray engine; log rows/s to stderr."""
    from tools.ray_probe import ray_probe

    with _ray_progress() as (advance, set_total):
        run = ray_probe(data, settings=settings, out_dir=shards, text_field=text_field,
                        concurrency=concurrency, batch_size=batch_size or BATCH_SIZE,
                        address=ray_address, progress=advance, on_total=set_total)
    rate = f"{run.probed / run.seconds:.1f} rows/s" if run.probed and run.seconds else "none new"
    err.print(f"ray: {run.probed} texts probed in {run.seconds:.1f}s ({rate}); "
              f"{len(run.keys)} rows in the data; shards in {run.shards.root}")
    return run


def _ray_only(engine: Engine, **given: object) -> None:
    """Refuse ray-engine flags on the local engine (they would be ignored)."""
    if engine is Engine.local:
        for flag, value in given.items():
            if value is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} needs --engine ray")


def ray_pool(engine: Engine, shards: Path | None, address: str | None,
             concurrency: int | None, batch_size: int | None) -> dict[str, Any] | None:
    """The ray engine's pool settings (tools/pool/source.RayPool) from the flags of improve
    and compare (None: the local engine)."""
    from agent.runs import validated
    from tools.pool.source import RayPool

    _ray_only(engine, shards=shards, ray_address=address, concurrency=concurrency,
              batch_size=batch_size)
    if engine is Engine.local:
        return None
    given = {} if batch_size is None else {"batch_size": batch_size}
    return {"engine": "ray", "ray": validated(
        RayPool, "ray options", shards=str(shards.resolve()) if shards else None,
        address=address, concurrency=concurrency, **given)}


@app.command()
def coverage(
    anchor: Annotated[
        Path, typer.Option(help="labelled rows representing the task: JSONL/CSV/Parquet or hub id")
    ],
    data: Annotated[str, typer.Option(
        help="the dataset to measure: file or hub id (--engine ray: a file, folder or URI)")],
    task: TaskOpt = "toxicity",
    field: FieldsOpt = None,
    text_field: TextField = "text",
    label_field: LabelField = "label",
    model: ModelOpt = None,
    sae: SaeOpt = None,
    delta: DeltaOpt = None,
    threshold: Annotated[
        str | None,
        typer.Option(help="anchor-quantile (default), absolute (--delta), quantile (per feature)"),
    ] = None,
    quantile: Annotated[
        float | None, typer.Option(help="quantile for anchor-quantile / quantile (default 0.9)")
    ] = None,
    pooling: Annotated[
        str | None, typer.Option(help="max (default) or count (tokens above threshold)")
    ] = None,
    min_tokens: Annotated[
        int | None, typer.Option(help="pooling=count: tokens above the threshold (default 2)")
    ] = None,
    min_support: Annotated[
        int | None, typer.Option(help="label judge: positive rows (default: 2, or 3.6%)")
    ] = None,
    min_log_odds: Annotated[float | None, typer.Option(help="label judge: log-odds")] = None,
    min_rows: Annotated[
        int | None, typer.Option(help="graded FAC: data rows a task feature needs (default 3)")
    ] = None,
    rate_frac: Annotated[
        float | None,
        typer.Option(help="graded FAC: ...or this fraction of the anchor's rate (default 0.5)"),
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="missing and deficit features to show")] = 10,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    engine: EngineOpt = Engine.local,
    shards: ShardsOpt = None,
    ray_address: RayAddressOpt = None,
    concurrency: ConcurrencyOpt = None,
    batch_size: BatchSizeOpt = None,
) -> None:
    """Measure FAC of DATA against the task features of ANCHOR and list what is missing;
    graded FAC beside it counts a feature only when enough rows activate it. For a pair task
    (--task reward|steering) the probe reads each pair's two sides, and task features are
    those of the preferred (matching) side against the other. --engine ray probes DATA on
    Ray into shards and streams its side of coverage over them (the anchor stays local)."""
    from tools.data import load_texts
    from tools.tasks import probe_dataset
    from tools.workspace import Workspace

    with one_line_errors():
        writable(json_out, "--json")
        _ray_only(engine, shards=shards, ray_address=ray_address, concurrency=concurrency,
                  batch_size=batch_size)
        if engine is Engine.ray and task != "toxicity":
            raise ConfigError(f"--engine ray reads one text column: it measures toxicity data; "
                              f"measure --task {task} with --engine local")
        if delta is not None and threshold is None:
            threshold = "absolute"  # a delta given on the command line means one delta
        judge: dict[str, Any] = {"min_support": min_support, "min_log_odds": min_log_odds}
        if min_support is not None:
            judge["min_support_frac"] = 0.0  # an explicit support is taken as given
        graded = {"min_rows": min_rows, "rate_frac": rate_frac}
        settings = settings_from(model=model, sae=sae, delta=delta, threshold=threshold,
                             quantile=quantile, pooling=pooling, min_tokens=min_tokens,
                             judge={k: v for k, v in judge.items() if v is not None} or None,
                             graded={k: v for k, v in graded.items() if v is not None} or None)
        if engine is Engine.ray:
            if settings.pooling != "max":
                raise ConfigError("--pooling count needs per-token counts, which ray shards do "
                                  "not keep: use --pooling max with --engine ray")
            a = load_texts(anchor, text_field=text_field, label_field=label_field,
                           require_labels=True)
            ws = Workspace(settings)
            run = _ray_run(data, settings, text_field, shards, ray_address, concurrency,
                           batch_size)
            report = _ray_coverage(ws, a, run)
        elif task == "toxicity":
            a = load_texts(anchor, text_field=text_field, label_field=label_field,
                           require_labels=True)
            d = load_texts(data, text_field=text_field, label_field=label_field)
        else:
            fields = key_values(field, "--field") or None
            a = probe_dataset(task, anchor, fields=fields, require_labels=True)
            d = probe_dataset(task, data, fields=fields)
        if engine is Engine.local:
            ws = Workspace(settings)
            with progress_bar(len(a) + len(d), "probing") as advance:
                report = ws.coverage(a, d, advance)
    _print_coverage(report, top)
    if json_out:
        save(json_out, report.model_dump_json(indent=2))
        err.print(f"report written to {json_out}")


def _ray_coverage(ws: Any, anchor: Any, run: ProbeRun) -> Any:
    """Coverage of the shards' rows (the data) against the locally probed anchor, with the
    anchor's top spans of each missing and deficit feature (as Workspace.measure)."""
    from tools.coverage import attach_spans
    from tools.probe import top_spans
    from tools.shards import measure_shards

    s = ws.settings
    with progress_bar(len(anchor), "probing the anchor") as advance:
        anchor_acts = ws.probe(anchor, advance)
    result = measure_shards(anchor_acts, anchor.labels, run.shards, s.activity_rule(),
                            s.judge, s.graded, keys=run.keys)
    report = result.report
    wanted = dict.fromkeys(m.feature for m in [*report.missing, *report.deficits])
    spans = top_spans(anchor_acts, anchor.texts, ws.model.tokenizer, s.probe_settings(),
                      list(wanted), s.top_spans, s.span_window)
    return attach_spans(report, spans)


def _print_coverage(report: Any, top: int) -> None:
    out.print(
        f"[bold]FAC = {report.fac:.3f}[/]  ({report.n_covered} of {report.n_task} task features "
        f"covered; active = {report.rule.describe(report.delta_used)}; judge = {report.judge})"
    )
    out.print(
        f"[bold]graded FAC = {report.fac_graded:.3f}[/]  ({len(report.deficits)} task "
        f"features short of {report.graded.describe()}; "
        f"{sum(m.deficit for m in report.deficits)} rows short in all)"
    )
    out.print(
        f"anchor: {report.n_anchor} rows, {report.n_active_anchor} active features, "
        f"covers {report.n_task_in_anchor}/{report.n_task} task features "
        f"(FAC {report.anchor_fac:.3f});  data: {report.n_data} rows, "
        f"{len(report.missing)} task features missing"
    )
    if report.saturated:
        out.print(
            "[yellow]warning: FAC is saturated (>= 0.99): raise the threshold (--delta or "
            "--quantile) or use a wider SAE"
        )
    _print_missing(report.missing, top)
    _print_deficits(report.deficits, top)


def _print_missing(missing: list[Any], top: int) -> None:
    if not missing:
        return
    table = Table(title=f"top {min(top, len(missing))} missing features")
    for col in ("feature", "pos", "neg", "log-odds", "anchor max", "top anchor span"):
        table.add_column(col, overflow="fold")
    for m in missing[:top]:
        span = m.spans[0].text.strip() if m.spans else ""
        table.add_row(str(m.feature), str(m.pos_support), str(m.neg_support),
                      f"{m.log_odds:.2f}", f"{m.anchor_max:.2f}", span)
    out.print(table)


def _print_deficits(deficits: list[Any], top: int) -> None:
    """The largest deficits: what the improve loop targets first."""
    if not deficits:
        return
    table = Table(title=f"top {min(top, len(deficits))} deficits (rows short of graded coverage)")
    for col in ("feature", "data rows", "needed", "deficit", "log-odds", "top anchor span"):
        table.add_column(col, overflow="fold")
    for m in deficits[:top]:
        span = m.spans[0].text.strip() if m.spans else ""
        table.add_row(str(m.feature), str(m.data_rows), str(m.needed), str(m.deficit),
                      f"{m.log_odds:.2f}", span)
    out.print(table)


@app.command()
def probe(
    data: Annotated[str, typer.Argument(
        help="dataset file (JSONL/CSV/Parquet) or hub id (--engine ray: a file, folder or URI)")],
    text_field: TextField = "text",
    model: ModelOpt = None,
    sae: SaeOpt = None,
    delta: Annotated[float | None, typer.Option(help="report features with max > delta")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write per-text active features here "
                                  "(--engine local)")
    ] = None,
    engine: EngineOpt = Engine.local,
    shards: ShardsOpt = None,
    ray_address: RayAddressOpt = None,
    concurrency: ConcurrencyOpt = None,
    batch_size: BatchSizeOpt = None,
) -> None:
    """Probe a dataset's SAE features (filling the activation cache, or with --engine ray
    the shards) and summarise them."""
    from tools.coverage import active_features
    from tools.data import load_texts
    from tools.workspace import Workspace

    with one_line_errors():
        writable(json_out, "--json")
        _ray_only(engine, shards=shards, ray_address=ray_address, concurrency=concurrency,
                  batch_size=batch_size)
        settings = settings_from(model=model, sae=sae, delta=delta)
        if engine is Engine.ray:
            if json_out:
                raise ConfigError("--json lists every row, too much for a ray-sized pool: read "
                                  "the shards with tools.shards.ShardSet instead")
            _probe_summary_ray(_ray_run(data, settings, text_field, shards, ray_address,
                                        concurrency, batch_size), settings.delta)
            return
        d = load_texts(str(data), text_field=text_field, label_field=None)
        ws = Workspace(settings)
        _ = ws.sae
        start = time.perf_counter()
        with progress_bar(len(d), "probing") as advance:
            result = ws.probe(d, advance)
        secs = time.perf_counter() - start
    maxes = result.max_matrix()
    per_text = (maxes > settings.delta).sum(axis=1)
    out.print(
        f"{len(d)} texts, {sum(a.n_tokens for a in result.acts)} tokens in {secs:.1f}s; "
        f"{int(active_features(maxes > settings.delta).sum())} of {result.d_sae} features active "
        f"(delta = {settings.delta:g}); {float(per_text.mean()):.1f} active per text"
    )
    if json_out:
        rows = []
        for i in range(maxes.shape[0]):
            row = maxes.getrow(i)
            keep = row.data > settings.delta
            rows.append({"row": i, "features": row.indices[keep].tolist(),
                         "max": [round(float(v), 4) for v in row.data[keep]]})
        save(json_out, json.dumps({"delta": settings.delta, "rows": rows}))
        err.print(f"written to {json_out}")


def _probe_summary_ray(run: ProbeRun, delta: float) -> None:
    """The local probe's summary line, streamed over the shards."""
    import numpy as np

    from tools.coverage import ActivityRule
    from tools.shards import active_row_counts

    d_sae = run.shards.manifest.d_sae
    counts = active_row_counts(run.shards, np.full(d_sae, delta, dtype=np.float32),
                               ActivityRule(threshold="absolute", delta=delta), keys=run.keys)
    out.print(f"{len(run.keys)} texts; {int((counts.rows > 0).sum())} of {d_sae} features "
              f"active (delta = {delta:g}); {counts.rows.sum() / max(counts.n_rows, 1):.1f} "
              "active per text")


@app.command("train-sae")
def train_sae(
    corpus: Annotated[list[Path], typer.Option(help="text files to train on (repeatable)")],
    layer: Annotated[int, typer.Option(min=0, help="decoder layer whose output the SAE reads")],
    out_dir: Annotated[Path, typer.Option("--out", help="work and output folder (resumable)")],
    model: ModelOpt = None,
    text_field: TextField = "text",
    d_sae: Annotated[int, typer.Option(min=1, help="latents")] = 4096,
    k: Annotated[int, typer.Option(min=1, help="active latents per token (TopK)")] = 32,
    n_vectors: Annotated[int, typer.Option(min=1, help="residual vectors to collect")] = 500_000,
    epochs: Annotated[float, typer.Option(min=0.001, help="passes over the vectors")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="vectors per training step")] = 512,
    max_per_file: Annotated[int, typer.Option(min=1, help="texts sampled per corpus file")] = 4000,
    max_tokens: Annotated[int, typer.Option(min=2, help="tokens per text")] = 128,
    seed: int = 0,
) -> None:
    """Train a TopK SAE with sae-lens on one layer; rerun the same command to resume."""
    import numpy as np

    from tools.data import load_texts
    from tools.probe import ProbeSettings
    from tools.sae import HookPoint
    from tools.sae_train import TrainSettings, collect, sae_card, train
    from tools.workspace import Workspace

    with one_line_errors():
        settings = settings_from(model=model)
        rng = np.random.default_rng(seed)
        texts: list[str] = []
        for path in corpus:
            rows = load_texts(path, text_field=text_field, label_field=None).texts
            texts += [rows[i] for i in rng.permutation(len(rows))[:max_per_file]]
        ts = TrainSettings(d_sae=d_sae, k=k, n_vectors=n_vectors, epochs=epochs, seed=seed,
                           batch_size=batch_size,
                           probe=ProbeSettings(max_tokens=max_tokens))
        lm = Workspace(settings).model
        hook = HookPoint(f"model.layers.{layer}")
        with progress_bar(n_vectors, "collecting residuals") as advance:
            done = [0]

            def step(_phase: str, n: int, _total: int) -> None:
                advance(n - done[0])
                done[0] = n

            n = collect(lm, [hook], texts, out_dir, ts, step)
        err.print(f"{n} vectors from {len(texts)} texts; training (sae-lens progress below)")
        metrics = train(hook, n, lm.model.config.hidden_size, out_dir, ts, lm.identity)
    info = {
        "model": lm.identity, "hook": hook.module, "layer": layer, "d_sae": d_sae, "k": k,
        "corpus": ", ".join(p.name for p in corpus), "texts": len(texts), "vectors": n,
        "command": " ".join([
            "facsynth train-sae", f"--model {settings.model}", f"--layer {layer}",
            *(f"--corpus {p}" for p in corpus), f"--out {out_dir}", f"--d-sae {d_sae}",
            f"--k {k}", f"--n-vectors {n_vectors}", f"--epochs {epochs}",
            f"--batch-size {batch_size}", f"--max-per-file {max_per_file}",
            f"--max-tokens {max_tokens}", f"--seed {seed}",
        ]),
    }
    card = {"info": info, "metrics": metrics}
    save(out_dir / "sae" / "card.json", json.dumps(card, indent=2))
    save(out_dir / "sae" / "README.md", sae_card(metrics, info))
