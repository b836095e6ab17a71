"""`facsynth compare`: does synthesis help your data? (agent/compare.py has the protocol)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli.common import (
    FieldsOpt,
    GeneratorOpt,
    ModelOpt,
    SaeOpt,
    TaskOpt,
    TaskOptionsOpt,
    app,
    err,
    key_values,
    one_line_errors,
    out,
    save,
    task_options,
    writable,
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
from tools.errors import ConfigError


def parse_assignments(text: str, flag: str) -> dict[str, Any]:
    """"a.b=1,c=off" -> {"a": {"b": 1}, "c": "off"} (values as JSON when they parse)."""
    result: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {text!r}: expected key=value[,key=value], e.g. "
                              "negatives=0,label_gate.judge=off")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = result
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return result


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"--variant {text!r}: expected NAME:key=value[,key=value], e.g. "
                          "fac-nogate:label_gate.judge=off")
    return name.strip(), parse_assignments(rest, "--variant")


def parse_variants(texts: list[str]) -> dict[str, dict[str, Any]]:
    """Every --variant, by name; a name given twice is refused (one would be lost)."""
    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        name, values = parse_variant(text)
        if name in out:
            raise ConfigError(f"--variant {name!r} is given twice; give each variant its own "
                              "name")
        out[name] = values
    return out


def parse_curve(text: str | None) -> list[int]:
    """--curve "25,50,100" -> [25, 50, 100]."""
    if not text:
        return []
    try:
        points = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--curve {text!r}: write label counts, e.g. 25,50,100,200") from None
    if any(p < 1 for p in points):
        raise ConfigError(f"--curve {text!r}: label counts are at least 1")
    return points


@app.command()
def compare(
    anchor: Annotated[Path, typer.Option(help="labelled rows of the task (JSONL/CSV/Parquet)")],
    task: TaskOpt = "toxicity",
    field: FieldsOpt = None,
    task_option: TaskOptionsOpt = None,
    eval: Annotated[Path | None, typer.Option(
        "--eval", help="held-out labelled rows; default: a fixed, group-aware 25% of --anchor")
    ] = None,
    also_eval: Annotated[list[Path] | None, typer.Option(
        help="another labelled set to score every detector on (a second distribution); "
        "repeatable")] = None,
    methods: Annotated[str | None, typer.Option(
        help="comma list: seed, full, fac, the synthesis baselines random, self-instruct, "
        "evol-instruct, magpie, cot-self-instruct, sao, prismatic, synalign, the pool "
        "strategies pick-fac, pick-random, pick-uncertainty, pick-top-score, pick-coreset "
        "(--labels pool), and --variant names (pair tasks: no evol-instruct, magpie, "
        "prismatic or synalign) [default: seed, full, fac and the first four baselines; "
        "--labels pool: seed and the pick methods]")] = None,
    variant: Annotated[list[str] | None, typer.Option(
        help="NAME:key=value,... fac with other loop settings, e.g. "
        "'fac-nogate:label_gate.judge=off', or a pick method with other selection "
        "settings, e.g. 'pick-fac-s0:strategy=fac,score_power=0' (a name starting with "
        "pick-); add NAME to --methods; repeatable")] = None,
    loop: Annotated[str, typer.Option(
        "--set", help="loop settings for fac and every variant, key=value,... e.g. "
        "'negatives=0.5,hosts=true'")] = "",
    labels: Annotated[str, typer.Option(
        help="seed: only the seed's labels are known (reference: seed); anchor: the anchor's "
        "labels are known to every method (reference: full); pool: the seed's labels, and "
        "each pick method labels --budget pool rows (their labels come from the pool's "
        "label column; reference: seed, and pick-random)")] = "seed",
    pool: Annotated[Path | None, typer.Option(
        help="--labels pool: the rows to pick from, labelled (the label column plays the "
        "annotator) [default: the anchor's own rows outside the seed and eval sets]")] = None,
    curve: Annotated[str | None, typer.Option(
        help="--labels pool: label counts for the learning curve, e.g. 25,50,100,200 "
        "[default: each doubling of --batch up to --budget]")] = None,
    batch: Annotated[int, typer.Option(
        help="--labels pool: rows a pick method labels per round (each round's labels "
        "retrain the model that scores the next)")] = 25,
    select: Annotated[str, typer.Option(
        "--select", help="--labels pool: selection settings for every pick method, "
        "key=value,... e.g. 'relevance=labels,score_power=0.5'")] = "",
    budget: Annotated[int, typer.Option(help="rows every synthetic method adds (kept); with "
                                        "--labels pool also the rows each pick method "
                                        "labels")] = 100,
    seeds: Annotated[int, typer.Option(help="seed sets (>= 5 for a paired 95% interval "
                                       "worth reading)")] = 5,
    seed_frac: Annotated[float, typer.Option(help="share of the pool in each seed set")] = 0.1,
    eval_frac: Annotated[float, typer.Option(
        help="share of --anchor held out for scoring when there is no --eval")] = 0.25,
    rounds: Annotated[int, typer.Option(help="fac: improve rounds")] = 2,
    top: Annotated[int, typer.Option(help="fac: features targeted per round")] = 50,
    request_factor: Annotated[float, typer.Option(
        help="every synthetic method stops after budget x this many requests")] = 3.0,
    synthetic_share: Annotated[float | None, typer.Option(
        help="added rows get this share of each class's detector weight (default: same "
        "weight as real rows)")] = None,
    detector: Annotated[str, typer.Option(help="the toxicity task's detector: probe (fast) "
                                          "or lora")] = "probe",
    engine: EngineOpt = Engine.local,
    shards: ShardsOpt = None,
    ray_address: RayAddressOpt = None,
    concurrency: ConcurrencyOpt = None,
    batch_size: BatchSizeOpt = None,
    model: ModelOpt = None,
    sae: SaeOpt = None,
    generator: GeneratorOpt = None,
    work: Annotated[Path, typer.Option(
        help="cache of generated sets and per-seed results (a rerun resumes)")
    ] = Path("compare-work"),
    json_out: Annotated[Path | None, typer.Option("--json", help="write the result here")] = None,
    report: Annotated[Path | None, typer.Option(help="write an HTML report (table + plot)")
                      ] = None,
) -> None:
    """Train the task's model (--task: a detector, a reward head, a steering vector) on the
    seed set plus each method's rows, over several seeds, and report its held-out metric
    (AUPRC, pairwise accuracy, SCR) with paired differences against the reference, FAC
    (binary and graded) of every training set, and the label agreement of the added rows.
    With --labels pool --pool FILE, --engine ray probes FILE on Ray into shards (a rerun
    probes only what they lack); the picks then run in memory, as on the local engine."""
    from agent.compare import (
        DEFAULT_METHODS,
        PAIR_METHODS,
        POOL_METHODS,
        CompareSettings,
        run_compare,
    )
    from agent.compare_report import curve_table, html_report, table
    from agent.runs import build_settings, validated
    from tools.detector import DetectorSettings

    with one_line_errors():
        writable(json_out, "--json")
        writable(report, "--report")
        variants = parse_variants(variant or [])
        if methods is None:
            methods = ",".join(POOL_METHODS if labels == "pool" else DEFAULT_METHODS
                               if task == "toxicity" else PAIR_METHODS)
        if pool is not None and labels != "pool":
            raise ConfigError("--pool needs --labels pool")
        settings = validated(
            CompareSettings, "compare options", task=task,
            task_options=task_options(task_option), fields=key_values(field, "--field"),
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            variants=variants, loop=parse_assignments(loop, "--set"), labels=labels,
            budget=budget, seeds=seeds, seed_frac=seed_frac, eval_frac=eval_frac,
            rounds=rounds, top=top, select={"batch": batch, **parse_assignments(
                select, "--select")}, curve=parse_curve(curve),
            request_factor=request_factor, synthetic_share=synthetic_share,
            detector=validated(DetectorSettings, "--detector", kind=detector),
            **(ray_pool(engine, shards, ray_address, concurrency, batch_size) or {}))
        settings.check()
        from tools.tasks import get_task

        result_metric = get_task(task).headline
        if seeds < 5:
            err.print(f"[yellow]note:[/] {seeds} seeds: the paired interval is wide; use 5+")
        app_settings = build_settings(model=model, sae=sae, generator=generator)
        status = err.status("starting", spinner="dots")

        def progress(what: str) -> None:
            status.update(what)

        def seed_done(s: int, got: list[Any]) -> None:
            err.print(f"seed {s}: " + ", ".join(
                f"{r.method} {100 * r.metrics[result_metric]:.1f}" for r in got))

        with status:
            result = run_compare(anchor, settings, work=work, eval_path=eval,
                                 also=also_eval or [], app_settings=app_settings,
                                 progress=progress, on_seed=seed_done, pool_path=pool)
        out.print(table(result))
        if result.settings.picks():
            out.print(curve_table(result))
        out.print(f"Spearman(graded FAC, metric) = {result.spearman_graded_metric:.2f}; "
                  f"binary {result.spearman_fac_metric:.2f}; G-Vendi "
                  f"{result.spearman_g_vendi_metric:.2f}. External knowledge: "
                  + "; ".join(result.external))
    if json_out:
        save(json_out, result.model_dump_json(indent=1))
    if report:
        save(report, html_report(result))
