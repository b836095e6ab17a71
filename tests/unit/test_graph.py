"""The improve graph on a fake engine: routing, stop rules, and crash/resume durability."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.graph import decide
from agent.runs import run_loop
from tests.fakes import NODES, Crash, FakeEngine, final_data
from tools.data import TextDataset, write_text_atomic
from tools.label_gate import LabelGateSettings
from tools.rundir import History, LoopSettings, RunConfig

DATA = TextDataset(texts=["hello <1>", "harmless", "bad <2>"], labels=[0, 0, 1], source="seed")
LOOP = LoopSettings(max_rounds=2, top=4, per_feature=3, budget=100, epsilon=0.0)


def config(run_dir: Path, loop: LoopSettings) -> RunConfig:
    """A run of DATA (its rows double as anchor and eval set: the fake engine ignores them)."""
    inputs = run_dir.parent / f"{run_dir.name}-inputs.jsonl"
    assert DATA.labels is not None
    write_text_atomic(inputs, "".join(json.dumps({"text": t, "label": y}) + "\n"
                                      for t, y in zip(DATA.texts, DATA.labels, strict=True)))
    return RunConfig(anchor=str(inputs), data=str(inputs), eval=str(inputs), loop=loop)


def run(run_dir: Path, engine: FakeEngine, loop: LoopSettings = LOOP,
        crash_at: tuple[str, int] | None = None) -> dict:
    def before(node: str, r: int) -> None:
        if crash_at == (node, r):
            raise Crash(f"killed in {node} of round {r}")

    return run_loop(run_dir, config(run_dir, loop), False, engine=engine, before=before)


def resume(run_dir: Path, engine: FakeEngine, loop: LoopSettings = LOOP) -> dict:
    return run_loop(run_dir, config(run_dir, loop), True, engine=engine)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, str]]:
    d = tmp_path_factory.mktemp("ref")
    state = run(d, FakeEngine())
    return state, final_data(d)


def test_two_rounds_to_the_stop_rule(reference: tuple[dict, dict[str, str]]) -> None:
    state, data = reference
    assert state["round"] == 2 and state["stop_reason"] == "max rounds (2) reached"
    hist = json.loads(data["history"])
    assert [r["round"] for r in hist] == [0, 1, 2]
    assert hist[0]["fac"] == pytest.approx(2 / 8) and hist[2]["fac"] > hist[1]["fac"] > 0.25
    assert hist[1]["generated"] == 12 and hist[1]["kept"] + hist[1]["rejected"] == 12
    assert hist[2]["stop_reason"] and hist[2]["metric"]["value"] > hist[0]["metric"]["value"]
    kept = [json.loads(x) for x in data["data/round-1.jsonl"].splitlines()]
    assert all(f"<{r['provenance']['feature']}>" in r["text"] for r in kept)
    assert data["rejected/round-1.jsonl"].count("target_inactive") == hist[1]["rejected"]





@pytest.mark.parametrize("node", NODES)
def test_crash_in_any_node_then_resume_gives_identical_data(
    tmp_path: Path, node: str, reference: tuple[dict, dict[str, str]]
) -> None:
    r = 0 if node == "load" else 1
    engine = FakeEngine()
    with pytest.raises(Crash):
        run(tmp_path, engine, crash_at=(node, r))
    state = resume(tmp_path, engine)
    assert state["stop_reason"] == reference[0]["stop_reason"]
    assert final_data(tmp_path) == reference[1]
    assert max(engine.interpreted.values()) <= 2  # each round's missing features, once


def test_crash_mid_generation_loses_and_duplicates_nothing(
    tmp_path: Path, reference: tuple[dict, dict[str, str]]
) -> None:
    engine = FakeEngine(crash_after_samples=4)
    with pytest.raises(Crash):
        run(tmp_path, engine)
    journal = (tmp_path / "work" / "round-1.generated.jsonl").read_text().splitlines()
    assert len(journal) == 4
    with (tmp_path / "work" / "round-1.generated.jsonl").open("a") as f:
        f.write('{"text": "half a li')  # killed mid-write
    resume(tmp_path, engine)
    seeds = [json.loads(x)["provenance"]["seed"]
             for x in (tmp_path / "work" / "round-1.generated.jsonl").read_text().splitlines()]
    assert len(seeds) == len(set(seeds)) == 12
    assert final_data(tmp_path) == reference[1]


def test_budget_stops_the_run(tmp_path: Path) -> None:
    loop = LOOP.model_copy(update={"budget": 6, "max_rounds": 5})
    state = run(tmp_path, FakeEngine(), loop)
    assert state["stop_reason"] == "sample budget (6) spent"
    assert state["generated_total"] == 6  # the round was cut to fit the budget


def test_decide_rules() -> None:
    loop = LoopSettings(max_rounds=5, budget=50, epsilon=0.05, patience=1)
    base = {"round": 1, "fac_before": 0.5, "fac": 0.7, "missing": [3], "generated_total": 10,
            "metric": [0.4, 0.5]}
    assert decide(base, loop) is None  # type: ignore[arg-type]
    assert "FAC gain" in decide({**base, "fac": 0.52}, loop)  # type: ignore[arg-type]
    assert "missing" in decide({**base, "missing": []}, loop)  # type: ignore[arg-type]
    assert "max rounds" in decide({**base, "round": 5}, loop)  # type: ignore[arg-type]
    assert "budget" in decide({**base, "generated_total": 50}, loop)  # type: ignore[arg-type]
    assert "eval metric" in decide({**base, "metric": [0.5, 0.45]}, loop)  # type: ignore[arg-type]
    assert decide({**base, "round": 0, "fac": 0.5}, loop) is None  # type: ignore[arg-type]


def test_per_round_budget_filled_by_raising_per_feature(tmp_path: Path) -> None:
    loop = LOOP.model_copy(update={"per_round": 20, "fill": True, "max_rounds": 1, "top": 4})
    state = run(tmp_path, FakeEngine(), loop)
    assert state["per_feature"] == 5 and state["generated_total"] == 20


def test_kill_9_mid_generation_then_resume(
    tmp_path: Path, reference: tuple[dict, dict[str, str]]
) -> None:
    root = Path(__file__).resolve().parents[2]
    driver = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); "
              "from tests.fakes import FakeEngine; from tests.unit.test_graph import run; "
              "run(Path(sys.argv[1]), FakeEngine(delay=0.3))")
    proc = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path), str(root)])
    journal = tmp_path / "work" / "round-1.generated.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "driver ended early"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resume(tmp_path, FakeEngine())
    assert final_data(tmp_path) == reference[1]


def test_label_gate_drops_disputed_samples(tmp_path: Path) -> None:
    engine = FakeEngine(dispute=lambda s: s.provenance.seed is not None
                        and s.provenance.seed % 2 == 0)
    run(tmp_path, engine, LOOP.model_copy(update={"max_rounds": 1}))
    hist = History.load(tmp_path).rounds
    rejected = [json.loads(x) for x in (tmp_path / "rejected" / "round-1.jsonl")
                .read_text().splitlines()]
    disputed = [r for r in rejected if r["reason"] == "label_disputed"]
    kept = [json.loads(x) for x in (tmp_path / "data" / "round-1.jsonl").read_text().splitlines()]
    assert disputed and kept
    assert hist[1].disputed == len(disputed) and hist[1].kept == len(kept)
    assert all(r["provenance"]["seed"] % 2 == 0 for r in disputed)
    assert all(k["provenance"]["seed"] % 2 == 1 for k in kept)
    assert engine.checked == [tmp_path / "models" / "round-0"], "the seed's detector judges"
    assert sum(h.kept for h in hist[1].per_feature.values()) == len(kept)


def test_label_gate_off_keeps_every_hit(tmp_path: Path) -> None:
    engine = FakeEngine(dispute=lambda s: True)
    loop = LOOP.model_copy(update={"max_rounds": 1,
                                   "label_gate": LabelGateSettings(judge="off")})
    run(tmp_path, engine, loop)
    assert History.load(tmp_path).rounds[1].disputed == 0 and engine.checked == []


def test_label_gate_counts_disputes_per_feature_and_records_the_judge(tmp_path: Path) -> None:
    class LLMJudged(FakeEngine):
        def label_check(self, samples, model_dir, gate):  # type: ignore[no-untyped-def]
            check = super().label_check(samples, model_dir, gate)
            return check.model_copy(update={"judged_by": "llm", "llm_agreement": 0.85})

    engine = LLMJudged(dispute=lambda s: s.provenance.feature % 2 == 0)
    run(tmp_path, engine, LOOP.model_copy(update={"max_rounds": 1}))
    summary = json.loads((tmp_path / "work").joinpath("round-1.verify.json").read_text())
    assert summary["label_judge"] == "llm" and summary["llm_agreement"] == 0.85
    per = History.load(tmp_path).rounds[1].per_feature
    assert any(h.disputed for h in per.values())
    for f, h in per.items():
        assert (h.kept, h.gate_pass_rate) == ((0, 0.0) if f % 2 == 0 else (h.activated, 1.0))
        assert h.disputed == (h.activated if f % 2 == 0 else 0)


def test_train_marks_kept_samples_synthetic(tmp_path: Path) -> None:
    engine = FakeEngine()
    run(tmp_path, engine, LOOP.model_copy(update={"max_rounds": 1, "synthetic_share": 0.3}))
    kept = len((tmp_path / "data" / "round-1.jsonl").read_text().splitlines())
    assert kept and engine.trained == [
        ([False] * len(DATA.texts), 0.3),  # round 0: the starting data only
        ([False] * len(DATA.texts) + [True] * kept, 0.3)]


def journal(run_dir: Path, r: int = 1) -> list[dict]:
    path = run_dir / "work" / f"round-{r}.generated.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_round_asks_for_both_labels_of_each_feature(tmp_path: Path) -> None:
    engine = FakeEngine()
    run(tmp_path, engine, LOOP.model_copy(update={"max_rounds": 1}))
    rows = journal(tmp_path)
    labels: dict[int, list[int]] = {}
    for x in rows:
        labels.setdefault(x["provenance"]["feature"], []).append(x["label"])
    assert sorted(labels) == [3, 4, 5, 6] and all(len(v) == 3 for v in labels.values())
    assert all(set(v) == {0, 1} for v in labels.values()), "positives and hard negatives"
    assert sum(y == 0 for x in labels.values() for y in x) == 6  # negatives=0.5 of 12
    assert History.load(tmp_path).rounds[1].generated == 12  # verify found every request
    ((targets, gs),) = engine.generated
    assert gs.hosts and gs.steer == 0.0 and len(targets) == 8


def test_negatives_0_asks_what_older_runs_asked(tmp_path: Path) -> None:
    from tools.generate import GenerateSettings, job_seed

    run(tmp_path, FakeEngine(), LOOP.model_copy(update={"max_rounds": 1, "negatives": 0.0}))
    rows = journal(tmp_path)
    gs = GenerateSettings(seed=1)  # the loop's round-1 seed: loop.seed * 1000 + 1
    assert [x["provenance"]["seed"] for x in rows] == [
        job_seed(gs, f, k) for f in (3, 4, 5, 6) for k in range(3)]
    assert {x["label"] for x in rows} == {1}


def test_the_round_is_spread_by_deficit_and_capped(tmp_path: Path) -> None:
    engine = FakeEngine(deficits={3: 2, 4: 40, 5: 10, 6: 3, 7: 1})
    loop = LOOP.model_copy(update={"max_rounds": 1, "max_per_feature": 6, "negatives": 0.0})
    run(tmp_path, engine, loop)
    ((targets, _),) = engine.generated
    # largest deficit first, top 4 of them; 12 requests by deficit 40/10/3/2, at least 1
    # each, at most 6 (the capped share goes to the others)
    assert [(t.feature, t.n) for t in targets] == [(4, 6), (5, 4), (6, 1), (3, 1)]
    assert len(journal(tmp_path)) == 12


def test_steer_and_hosts_reach_the_engine(tmp_path: Path) -> None:
    engine = FakeEngine()
    loop = LOOP.model_copy(update={"max_rounds": 1, "hosts": False, "steer": 0.75})
    run(tmp_path, engine, loop)
    ((_, gs),) = engine.generated
    assert not gs.hosts and gs.steer == 0.75
