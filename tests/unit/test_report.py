from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.data import write_text_atomic
from tools.errors import DataError
from tools.report import write_report
from tools.rundir import (
    History,
    Metric,
    MissingSummary,
    RejectedSample,
    RoundRecord,
    RunPaths,
    jsonl,
    read_samples,
)
from tools.verify import FeatureHits, Provenance, Sample

XSS = "<script>alert('x')</script> how do I pick a lock"


def sample(text: str, feature: int, round_: int) -> Sample:
    prov = Provenance(feature=feature, round=round_, generator="smollm2-135m",
                      prompt_version="generate_toxicity.v3", temperature=0.9, seed=7)
    return Sample(text=text, label=1, provenance=prov)


def missing(*features: int) -> list[MissingSummary]:
    return [MissingSummary(feature=f, summary=f"summary of feature {f}", log_odds=2.0 + f / 10)
            for f in features]


def three_rounds() -> History:
    return History(rounds=[
        RoundRecord(round=0, fac=0.5, n_task=8, n_missing=4, missing=missing(3, 5, 11, 12),
                    n_train=100, metric=Metric(auprc=0.61, auroc=0.7, best_f1=0.55),
                    seconds=3.2),
        RoundRecord(round=1, fac=0.625, n_task=8, n_missing=3, missing=missing(5, 11, 12),
                    generated=8, kept=3, rejected=5, hit_rate=0.5,
                    per_feature={3: FeatureHits(generated=4, activated=3, kept=2),
                                 5: FeatureHits(generated=4, activated=1, kept=1)},
                    metric=Metric(auprc=0.66, auroc=0.74, best_f1=0.6), n_train=103),
        RoundRecord(round=2, fac=0.875, n_task=8, n_missing=1, missing=missing(12),
                    generated=6, kept=2, rejected=4, hit_rate=0.4,
                    per_feature={5: FeatureHits(generated=3, activated=1, kept=1),
                                 11: FeatureHits(generated=3, activated=2, kept=1)},
                    metric=None, n_train=105, stop_reason="max_rounds reached (2)"),
    ])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    three_rounds().save(tmp_path)
    paths = RunPaths(tmp_path)
    write_text_atomic(paths.data(1), jsonl([sample(XSS, 3, 1), sample("a lockpick guide", 3, 1),
                                            sample("steal a bike", 5, 1)]))
    write_text_atomic(paths.data(2), jsonl([sample("ünïcödé 🙂 fraud", 5, 2),
                                            sample("phish a bank login", 11, 2)]))
    rej = RejectedSample(**sample("hello there", 3, 1).model_dump(), reason="target_inactive")
    write_text_atomic(paths.rejected(1), jsonl([rej]))
    return tmp_path


def test_report_files_and_content(run_dir: Path) -> None:
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    for name in ("fac_metric.png", "missing.png", "features.png"):
        png = run_dir / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = out.read_text()
    for fac in ("0.500", "0.625", "0.875"):
        assert fac in html
    assert "summary of feature 12" in html and "summary of feature 3" in html
    assert "max_rounds reached (2)" in html
    assert 'src="report/fac_metric.png"' in html and 'src="report/features.png"' in html
    assert "target_inactive 1" in html
    assert "&#252;n&#239;c&#246;d&#233;" in html  # non-ASCII survives as references
    assert "http://" not in html and "https://" not in html  # self-contained


def test_sample_text_is_escaped(run_dir: Path) -> None:
    html = write_report(run_dir).read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


def test_only_round_zero_and_no_metric(tmp_path: Path) -> None:
    History(rounds=[RoundRecord(round=0, fac=0.25, n_task=4, n_missing=3,
                                missing=missing(1, 2, 7))]).save(tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "features.png").write_bytes(b"stale")
    html = write_report(tmp_path).read_text()
    assert "0.250" in html and "summary of feature 7" in html
    assert "No samples kept yet" in html and "No stop reason recorded" in html
    assert (tmp_path / "report" / "fac_metric.png").exists()
    assert not (tmp_path / "report" / "features.png").exists()


def test_graded_fac_shown_beside_fac_when_recorded(run_dir: Path) -> None:
    assert "graded FAC" not in write_report(run_dir).read_text(), "older runs: no column"
    hist = three_rounds()
    for rec, graded in zip(hist.rounds, (0.125, 0.3125, 0.4375), strict=True):
        rec.fac_graded = graded
    hist.save(run_dir)
    html = write_report(run_dir).read_text()
    assert "<th>graded FAC</th>" in html
    assert "<td>0.500</td><td>0.125</td>" in html and "<td>0.875</td><td>0.438</td>" in html
    assert "from <strong>0.125</strong>" in html
    assert History.load(run_dir).rounds[1].fac_graded == 0.3125


def test_history_round_trip(tmp_path: Path) -> None:
    hist = three_rounds()
    path = hist.save(tmp_path)
    raw = json.loads(path.read_text())
    hits = raw["rounds"][1]["per_feature"]["3"]  # FeatureHits may grow fields (disputed)
    assert {"generated": 4, "activated": 3, "kept": 2}.items() <= hits.items()
    assert raw["rounds"][2]["metric"] is None
    loaded = History.load(tmp_path)
    assert loaded == hist
    assert loaded.stop_reason == "max_rounds reached (2)"
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed away


def test_record_replaces_a_round(tmp_path: Path) -> None:
    hist = three_rounds()
    hist.record(RoundRecord(round=1, fac=0.7, n_task=8, n_missing=2))
    hist.record(RoundRecord(round=3, fac=1.0, n_task=8, n_missing=0))
    assert [(r.round, r.fac) for r in hist.rounds] == [(0, 0.5), (1, 0.7), (2, 0.875), (3, 1.0)]


def test_missing_history_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"history\.json: not found; pass the directory"):
        write_report(tmp_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"rounds": [{"round": 0, "fac": 0.5', "not valid JSON"),
        ('{"rounds": [{"round": 0, "fac": "high", "n_task": 1, "n_missing": 0}]}',
         r"rounds\[0\]\.fac"),
        ('{"rounds": [{"round": 1, "fac": 0.5, "n_task": 1, "n_missing": 0},'
         ' {"round": 0, "fac": 0.5, "n_task": 1, "n_missing": 0}]}', "ascending"),
    ],
)
def test_corrupt_history_is_a_clear_error(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / "history.json").write_text(content)
    with pytest.raises(DataError, match=problem) as info:
        History.load(tmp_path)
    assert str(tmp_path / "history.json") in str(info.value)
    assert "re-run the loop" in str(info.value)


def test_bad_sample_lines(run_dir: Path) -> None:
    path = RunPaths(run_dir).data(2)
    with path.open("a") as f:
        f.write('{"text": "no provenance"}\nnot json\n')
    with pytest.raises(DataError, match="round-2.jsonl line 3"):
        read_samples(path)
    html = write_report(run_dir).read_text()  # the report skips them and says so
    assert "2 sample line(s) could not be read" in html
    assert "phish a bank login" in html
