"""The pool path in the improve graph, on the fake engine: select -> label -> train, with
each labeler; the human round trip (pause, a half-labelled file, resume, the rest, nothing
asked twice, a crash between recording and resuming loses nothing); --source both."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from agent.pool_labels import add_labels, waiting_round
from agent.runs import run_loop, start_run
from tests.fakes import FakeEngine
from tests.unit.test_graph import DATA, LOOP, config
from tools.errors import DataError, UsageError
from tools.pool.labels import LabelJournal
from tools.pool.select import SelectSettings
from tools.pool.source import PoolSource
from tools.rundir import History, RunConfig, RunPaths, read_samples

POOL = [f"bad row <{f}> number {i}" if i % 3 == 0 else f"fine row <{f}> number {i}"
        for i, f in enumerate([3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8])]


def pool_config(run_dir: Path, labeler: str, source: str = "pool", batch: int = 4,
                budget: int = 8) -> RunConfig:
    cfg = config(run_dir, LOOP)
    path = run_dir.parent / f"{run_dir.name}-pool.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": int(t.startswith("bad"))}) + "\n"
                            for t in POOL))
    return cfg.model_copy(update={"pool": PoolSource(
        path=str(path), labeler=labeler, source=source, budget=budget,
        select=SelectSettings(batch=batch))})


def go(run_dir: Path, cfg: RunConfig, engine: FakeEngine, resuming: bool = False) -> dict:
    if not resuming:
        cfg = start_run(run_dir, cfg)
    return run_loop(run_dir, cfg, resuming, engine=engine)


def labels_file(path: Path, values: dict[int, Any], keep_empty: bool = True) -> Path:
    """The newest to-label CSV with `values` filled in (others left empty)."""
    src = sorted((path.parent / "to-label").glob("round-*.csv"))[-1]
    rows = list(csv.DictReader(src.open()))
    for row in rows:
        row["label"] = str(values.get(int(row["row"]), ""))
    out = path.parent / "filled.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if keep_empty or r["label"])
    return out


def test_file_labeler_runs_rounds_of_picks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    engine = FakeEngine(pool=POOL)
    state = go(run, pool_config(run, "file"), engine)
    assert state["stop_reason"] == "label budget (8 pool rows) spent"
    hist = History.load(run).rounds
    assert [r.picked for r in hist] == [0, 4, 4] and [r.labelled for r in hist] == [0, 4, 4]
    assert hist[2].labels_total == 8 and hist[1].labeler == "file"
    rows = [s for r in (1, 2) for s in read_samples(RunPaths(run).pool_data(r))]
    assert len({s.provenance.pool_row for s in rows}) == 8, "no row is picked twice"
    for s in rows:
        assert s.label == int(POOL[s.provenance.pool_row].startswith("bad"))
        assert s.provenance.generator.startswith("pool:") and s.provenance.labeler == "file"
    assert hist[1].positives == sum(s.label == 1 for s in read_samples(
        RunPaths(run).pool_data(1)))
    # pool rows train as real rows, not as synthetic ones
    synthetic, _ = engine.trained[-1]
    assert synthetic is not None and not any(synthetic)
    assert engine.selected[1][1] == {s.provenance.pool_row for s in read_samples(
        RunPaths(run).pool_data(1))}


def test_judge_labeler_drops_what_it_cannot_decide(tmp_path: Path) -> None:
    run = tmp_path / "run"
    go(run, pool_config(run, "judge", budget=4), FakeEngine(pool=POOL))
    known = LabelJournal(RunPaths(run).labels).read()
    assert len(known) == 4 and all(r.source == "judge" for r in known.values())
    kept = read_samples(RunPaths(run).pool_data(1))
    assert all(s.label == int("bad" in s.text) for s in kept)


def test_human_round_trip_half_labelled_then_the_rest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = pool_config(run, "human")
    engine = FakeEngine(pool=POOL)
    state = go(run, cfg, engine)
    pause = state["__interrupt__"][0].value
    assert pause["round"] == 1 and pause["waiting"] == 4
    first = list(csv.DictReader((run / "to-label" / "round-1.csv").open()))
    assert [r["label"] for r in first] == [""] * 4 and "text" in first[0]
    assert (run / "to-label" / "round-1.jsonl").exists()
    ids = [int(r["row"]) for r in first]

    # half of them labelled (one skipped), the other rows left empty
    got = add_labels(run, file=labels_file(run / "x", {ids[0]: 1, ids[1]: "skip"}))
    assert (got.labelled, got.skipped, got.ignored, got.waiting) == (1, 1, 2, 2)
    state = go(run, cfg, engine, resuming=True)
    again = state["__interrupt__"][0].value
    assert again["round"] == 1 and again["waiting"] == 2
    second = [int(r["row"]) for r in csv.DictReader((run / "to-label" / "round-1.csv").open())]
    assert second == ids[2:], "nothing already labelled is asked again"

    # a labelled row cannot be given again; unknown rows and bad labels are refused
    with pytest.raises(DataError, match="row 999 is not waiting"):
        add_labels(run, file=_jsonl(tmp_path / "bad.jsonl", [{"row": 999, "label": 1}]))
    with pytest.raises(DataError, match=r"bad2.jsonl line 1: label 'maybe'"):
        add_labels(run, file=_jsonl(tmp_path / "bad2.jsonl",
                                    [{"row": second[0], "label": "maybe"}]))
    with pytest.raises(DataError, match=f"row {ids[0]} is not waiting"):
        add_labels(run, file=_jsonl(tmp_path / "bad3.jsonl", [{"row": ids[0], "label": 0}]))

    # the rest recorded, then a crash before resuming: the journal keeps them
    add_labels(run, {second[0]: 0, second[1]: 1})
    assert waiting_round(run)[1] == []
    state = go(run, cfg, engine, resuming=True)
    assert state["__interrupt__"][0].value["round"] == 2, "round 1 trained, round 2 picked"
    labelled = read_samples(RunPaths(run).pool_data(1))
    assert sorted(s.provenance.pool_row for s in labelled) == sorted(
        [ids[0], *second]), "the skipped row is not trained on"
    round2 = [int(r["row"]) for r in csv.DictReader((run / "to-label" / "round-2.csv").open())]
    assert not set(round2) & set(ids), "round 2 picks new rows"
    add_labels(run, rest_skip=True)
    state = go(run, cfg, engine, resuming=True)
    assert state["stop_reason"] == "label budget (8 pool rows) spent"
    assert len(History.load(run).rounds) == 3


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_for_a_run_without_a_person_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    go(run, pool_config(run, "file", budget=4), FakeEngine(pool=POOL))
    with pytest.raises(UsageError, match="not a pool run labelled by a person"):
        add_labels(run, {0: 1})


def test_both_synthesises_only_for_what_no_pool_row_fills(tmp_path: Path) -> None:
    run = tmp_path / "run"
    pool = [p for p in POOL if "<8>" not in p]  # feature 8 is in no pool row
    engine = FakeEngine(pool=pool)
    cfg = pool_config(run, "file", source="both", batch=3, budget=3)
    cfg.pool.path  # noqa: B018
    (Path(cfg.pool.path)).write_text("".join(
        json.dumps({"text": t, "label": int(t.startswith("bad"))}) + "\n" for t in pool))
    go(run, cfg, engine)
    unfilled = json.loads((run / "work" / "round-1.unfilled.json").read_text())
    assert 8 in unfilled and not set(unfilled) & {3, 4, 5, 6, 7}
    targets, _ = engine.generated[0]
    assert {t.feature for t in targets} <= set(unfilled)
    assert DATA.texts  # the starting data is untouched
