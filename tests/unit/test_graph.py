"""The improve graph on a fake engine: routing, stop rules, and crash/resume durability."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from agent.graph import LoopSettings, build, checkpointer, decide, thread
from agent.pipeline import Feature, Interpreted
from agent.steps import Steps
from memory.feature_memory import FeatureRecord
from tools.coverage import ActivityRule, CoverageReport, MissingFeature
from tools.data import TextDataset
from tools.detector import Metrics
from tools.generate import GenerateSettings, Target, job_seed
from tools.report import History
from tools.verify import FeatureHits, Sample, Verdict, VerifyReport

TASK = list(range(1, 9))  # eight task features; a text covers feature f if it has "<f>"


class Crash(Exception):
    pass


class FakeEngine:
    def __init__(self, crash_after_samples: int | None = None, delay: float = 0.0) -> None:
        self.interpreted: Counter[int] = Counter()
        self.crash_after = crash_after_samples
        self.delay = delay

    def probe(self, texts: Sequence[str]) -> None:
        pass

    def coverage(self, texts: Sequence[str]) -> CoverageReport:
        have = {int(t) for text in texts for t in re.findall(r"<(\d+)>", text)}
        missing = [MissingFeature(feature=f, pos_support=3, neg_support=0, log_odds=9 - f,
                                  anchor_max=5.0) for f in TASK if f not in have]
        covered = len(TASK) - len(missing)
        return CoverageReport(
            rule=ActivityRule(), judge="label", n_anchor=10, n_data=len(texts),
            n_active_anchor=20, n_task=len(TASK), n_task_in_anchor=len(TASK), n_covered=covered,
            fac=covered / len(TASK), anchor_fac=1.0, missing=missing, saturated=False)

    def error_features(self, texts, labels, model_dir, limit):  # type: ignore[no-untyped-def]
        return []

    def interpret(self, report: CoverageReport, limit: int) -> Interpreted:
        feats = []
        for m in report.missing[:limit]:
            self.interpreted[m.feature] += 1
            rec = FeatureRecord(feature=m.feature, summary=f"theme {m.feature}")
            feats.append(Feature(record=rec, log_odds=m.log_odds, targeted=m.feature != 8))
        return Interpreted(relevance="label", features=feats)

    def generate(self, targets: Sequence[Target], settings: GenerateSettings, skip: set[int],
                 on_sample: Callable[[Sample], None]) -> list[Sample]:
        out = []
        for t in targets:
            for k in range(settings.per_feature):
                seed = job_seed(settings, t.feature, k)
                if seed in skip:
                    continue
                if self.crash_after is not None and len(out) == self.crash_after:
                    self.crash_after = None
                    raise Crash("killed mid-generation")
                hit = (seed + t.feature) % 3 != 0
                text = f"about <{t.feature}> #{seed}" if hit else f"off-topic #{seed}"
                s = Sample.model_validate({"text": text, "label": 1, "provenance": {
                    "feature": t.feature, "round": settings.round, "seed": seed}})
                time.sleep(self.delay)
                on_sample(s)
                out.append(s)
        return out

    def verify(self, samples: Sequence[Sample], existing: Sequence[str]) -> VerifyReport:
        kept, rejected, hits = [], [], {}
        for s in samples:
            f = s.provenance.feature
            on = f"<{f}>" in s.text
            h = hits.setdefault(f, FeatureHits(generated=0, activated=0, kept=0))
            h.generated += 1
            h.activated += on
            h.kept += on
            (kept if on else rejected).append(
                Verdict(sample=s, reason="kept" if on else "target_inactive", activation=1.0))
        return VerifyReport(kept=kept, rejected=rejected, per_feature=hits)

    def train(self, texts: Sequence[str], labels: Sequence[int], model_dir: Path) -> bool:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "n.json").write_text(json.dumps(len(texts)))
        return True

    def evaluate(self, model_dir: Path) -> Metrics | None:
        n = json.loads((model_dir / "n.json").read_text())
        return Metrics(auprc=min(1.0, n / 40), auroc=0.5, best_f1=0.5, n=10, n_positive=5)


DATA = TextDataset(texts=["hello <1>", "harmless", "bad <2>"], labels=[0, 0, 1], source="seed")
LOOP = LoopSettings(max_rounds=2, top=4, per_feature=3, budget=100, epsilon=0.0)


def run(run_dir: Path, engine: FakeEngine, loop: LoopSettings = LOOP,
        crash_at: tuple[str, int] | None = None) -> dict:
    def before(node: str, r: int) -> None:
        if crash_at == (node, r):
            raise Crash(f"killed in {node} of round {r}")

    run_dir.mkdir(parents=True, exist_ok=True)
    graph = build(Steps(run_dir, engine, loop, DATA, before=before), checkpointer(run_dir))
    return graph.invoke({}, thread(run_dir))


def resume(run_dir: Path, engine: FakeEngine, loop: LoopSettings = LOOP) -> dict:
    graph = build(Steps(run_dir, engine, loop, DATA), checkpointer(run_dir))
    return graph.invoke(None, thread(run_dir))


def final_data(run_dir: Path) -> dict[str, str]:
    files = sorted((run_dir / "data").glob("*.jsonl")) + sorted(
        (run_dir / "rejected").glob("*.jsonl"))
    out = {f"{p.parent.name}/{p.name}": p.read_text() for p in files}
    hist = History.load(run_dir)
    out["history"] = json.dumps([r.model_dump(exclude={"seconds"}) for r in hist.rounds])
    return out


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
    assert hist[2]["stop_reason"] and hist[2]["metric"]["auprc"] > hist[0]["metric"]["auprc"]
    kept = [json.loads(x) for x in data["data/round-1.jsonl"].splitlines()]
    assert all(f"<{r['provenance']['feature']}>" in r["text"] for r in kept)
    assert data["rejected/round-1.jsonl"].count("target_inactive") == hist[1]["rejected"]


NODES = ["load", "probe", "coverage", "interpret", "generate", "verify", "train", "evaluate",
         "decide"]


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
            "auprc": [0.4, 0.5]}
    assert decide(base, loop) is None  # type: ignore[arg-type]
    assert "FAC gain" in decide({**base, "fac": 0.52}, loop)  # type: ignore[arg-type]
    assert "missing" in decide({**base, "missing": []}, loop)  # type: ignore[arg-type]
    assert "max rounds" in decide({**base, "round": 5}, loop)  # type: ignore[arg-type]
    assert "budget" in decide({**base, "generated_total": 50}, loop)  # type: ignore[arg-type]
    assert "AUPRC" in decide({**base, "auprc": [0.5, 0.45]}, loop)  # type: ignore[arg-type]
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
              "from tests.unit.test_graph import FakeEngine, run; "
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
