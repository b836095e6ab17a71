"""`facsynth interpret`, `generate`, `verify`, `features search` and `report`: synthesis one
step at a time, and a run's report (the loop itself: agent/cli/improve.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from agent.cli.common import (
    GeneratorOpt,
    ModelOpt,
    RelevanceOpt,
    SaeOpt,
    app,
    err,
    one_line_errors,
    out,
    save,
    writable,
)
from agent.runs import build_settings as settings_from
from tools.errors import ConfigError
from tools.rundir import jsonl, read_model, read_samples, write_rows
from tools.verify import Sample


def _read_model(path: Path, schema: Any, what: str) -> Any:
    return read_model(path, schema, f"a `facsynth {what}` output",
                      f"write it with `facsynth {what} ... --json {path}`")


def _read_samples(path: Path) -> list[Sample]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; write it with `facsynth generate` first")
    return read_samples(path)


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
    from tools.coverage import CoverageReport
    from tools.data import load_texts
    from tools.synthesis import interpret_missing, span_finder
    from tools.workspace import Workspace

    with one_line_errors():
        writable(json_out, "--json")
        if score and anchor is None:
            raise ConfigError("--score needs --anchor (the held-out spans come from it)")
        settings = settings_from(model=model, sae=sae, generator=generator)
        report = _read_model(coverage_json, CoverageReport, "coverage")
        ws = Workspace(settings)
        score_with = None
        if anchor is not None and score:
            a = load_texts(anchor, require_labels=True)
            score_with = (a.texts, span_finder(ws, a))
        with open_llm(settings, json_out.parent, ws) as llm:
            result = interpret_missing(report, llm, ws, limit=top, relevance=relevance,
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
    save(json_out, result.model_dump_json(indent=2))
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
    from tools.generate import GenerateSettings
    from tools.synthesis import Interpreted
    from tools.synthesis import generate as run_generate
    from tools.workspace import Workspace

    with one_line_errors():
        writable(out_path, "--out")
        settings = settings_from(model=model, generator=generator)
        features = _read_model(features_json, Interpreted, "interpret")
        targets = features.targets
        if not targets:
            raise ConfigError(f"{features_json}: no targeted features (all judged irrelevant "
                              "or uninterpretable); rerun interpret with --relevance label")
        gs = GenerateSettings(per_feature=per_feature, temperature=temperature,
                              concurrency=concurrency, seed=seed)
        with open_llm(settings, out_path.parent, Workspace(settings)) as llm:
            samples = run_generate(targets, llm, gs)
    save(out_path, jsonl(samples))
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
    from tools.data import load_texts
    from tools.synthesis import verify_samples
    from tools.workspace import Workspace

    rejected_path = rejected_path or out_path.with_name(out_path.stem + ".rejected.jsonl")
    with one_line_errors():
        writable(out_path, "--out")
        writable(rejected_path, "--rejected")
        settings = settings_from(model=model, sae=sae)
        samples = _read_samples(samples_path)
        a = load_texts(anchor, require_labels=True)
        d = load_texts(data)
        report = verify_samples(Workspace(settings), a, d, samples)
    with one_line_errors():
        write_rows(out_path, rejected_path, report.kept, report.rejected)
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
    from tools.workspace import Workspace

    with one_line_errors():
        ws = Workspace(settings_from(model=model, sae=sae))
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
def report(
    run_dir: Annotated[Path, typer.Argument(help="an improve run folder")],
) -> None:
    """Write RUN_DIR/report.html (+ charts) from the run's history."""
    from tools.report import write_report

    with one_line_errors():
        path = write_report(run_dir)
    out.print(f"report written to {path}")
