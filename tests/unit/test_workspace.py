"""Workspace.measure (one coverage per anchor, data and settings), the verifier reusing its
thresholds, and model-centric focus on the detector's errors; a tiny random model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memory.feature_memory import InMemoryFeatureMemory
from tests.fakes import TOY_ANCHOR as ANCHOR
from tests.fakes import bag_of_words, mean_residual, tiny_model, tiny_sae
from tools import focus, workspace
from tools.coverage import GradedRule, JudgeSettings
from tools.data import TextDataset
from tools.settings import Settings
from tools.synthesis import verify_samples
from tools.verify import Provenance, Sample
from tools.workspace import Workspace

TEXTS = [t for t, _ in ANCHOR]
LABELS = [y for _, y in ANCHOR]


def anchor() -> TextDataset:
    return TextDataset(texts=list(TEXTS), labels=list(LABELS), source="anchor")


def seed() -> TextDataset:
    return TextDataset(texts=TEXTS[6:], labels=None, source="seed")


@pytest.fixture(scope="module")
def parts() -> tuple[Any, Any]:
    lm = tiny_model()
    center = mean_residual(lm, 2, TEXTS)
    return lm, tiny_sae(layer=2, d_sae=256, k=4, center=center)


@pytest.fixture
def ws(parts: tuple[Any, Any], tmp_path: Path) -> Workspace:
    settings = Settings(
        home=tmp_path, threshold="absolute", delta=0.0,
        judge=JudgeSettings(min_support=1, min_support_frac=0.0, min_log_odds=0.5),
    )
    ws = Workspace(settings)
    ws.__dict__["model"], ws.__dict__["sae"] = parts
    ws.__dict__["memory"] = InMemoryFeatureMemory(bag_of_words)
    return ws


@pytest.fixture
def measured(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many coverages `tools.workspace` actually computes."""
    calls: list[int] = []
    real = workspace.measure

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(workspace, "measure", counting)
    return calls


def test_measure_carries_task_thresholds_activity_and_spans(ws: Workspace) -> None:
    cov = ws.measure(anchor(), seed())
    assert cov.report.n_task == int(cov.task.sum()) > 0
    assert cov.report.missing and all(m.spans for m in cov.report.missing)
    assert cov.thresholds.shape == cov.task.shape == (ws.sae.d_sae,)
    assert np.all(cov.thresholds == 0.0)  # threshold=absolute, delta=0
    active = ws.probe(anchor()).max_matrix() > 0
    assert (cov.anchor_active != active).nnz == 0
    assert cov.anchor_active.shape == (len(TEXTS), ws.sae.d_sae)
    with pytest.raises(ValueError):
        cov.task[0] = not cov.task[0]  # shared: read-only


def test_deficit_features_get_spans_from_the_same_top_spans_call(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[list[int]] = []
    real = workspace.top_spans

    def recording(*args: Any) -> Any:
        asked.append(list(args[4]))
        return real(*args)

    monkeypatch.setattr(workspace, "top_spans", recording)
    report = ws.measure(anchor(), seed()).report
    missing = {m.feature for m in report.missing}
    assert report.deficits and missing < {m.feature for m in report.deficits}
    assert len(asked) == 1 and sorted(asked[0]) == sorted({m.feature for m in report.deficits})
    assert all(m.spans for m in report.deficits)
    assert 0 < report.fac_graded < report.fac
    ws.settings.graded.min_rows = 1
    assert ws.measure(anchor(), seed()).report.fac_graded > report.fac_graded, (
        "the graded rule is part of the key")


def test_settings_read_graded_from_toml_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "facsynth.toml").write_text("[graded]\nmin_rows = 5\nrate_frac = 0.75\n")
    assert Settings().graded == GradedRule(min_rows=5, rate_frac=0.75)
    monkeypatch.setenv("FACSYNTH_GRADED__RATE_FRAC", "0.25")
    assert Settings().graded == GradedRule(min_rows=5, rate_frac=0.25)
    assert Settings(graded=GradedRule(min_rows=2)).graded.min_rows == 2


def test_measure_is_computed_once_per_content(ws: Workspace, measured: list[int]) -> None:
    first = ws.measure(anchor(), seed())
    assert ws.measure(anchor(), seed()) is first, "equal content: remembered"
    assert len(measured) == 1
    flipped = TextDataset(texts=list(TEXTS), labels=[1 - y for y in LABELS], source="anchor")
    other = ws.measure(flipped, seed())
    assert other is not first and len(measured) == 2, "labels are part of the key"
    ws.settings.judge.min_log_odds = 3.0
    assert ws.measure(anchor(), seed()) is not first, "settings are part of the key"
    assert len(measured) == 3


def test_coverage_is_the_measured_report_as_a_copy(ws: Workspace, measured: list[int]) -> None:
    report = ws.coverage(anchor(), seed())
    assert report == ws.measure(anchor(), seed()).report and len(measured) == 1
    report.missing.clear()
    assert ws.coverage(anchor(), seed()).missing, "changing a copy leaves the memo whole"


def test_verify_reuses_the_coverage_thresholds(ws: Workspace, measured: list[int]) -> None:
    cov = ws.measure(anchor(), seed())
    f = cov.report.missing[0]
    prov = Provenance(feature=f.feature, round=1, generator="t", prompt_version="v",
                      temperature=0.0, seed=0)
    samples = [Sample(text=f.spans[0].text + " now", label=1, provenance=prov),
               Sample(text=TEXTS[6], label=1, provenance=prov)]
    got = verify_samples(ws, anchor(), seed(), samples)
    assert len(measured) == 1, "no second coverage for the thresholds"
    assert [v.reason for v in got.rejected] == ["duplicate"]  # a row of the data
    passed = verify_samples(ws, anchor(), seed(), samples, coverage=cov)
    assert passed == got


class ScriptedDetector:
    """Scores the anchor rows with fixed probabilities."""

    kind = "probe"

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores

    def score(self, texts: Any = None, *, features: Any = None) -> np.ndarray:
        assert texts == TEXTS and features is not None and len(features) == len(TEXTS)
        return self.scores


def use_detector(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> None:
    det = ScriptedDetector(np.asarray(scores))
    monkeypatch.setattr(focus, "load_detector", lambda folder, model_folder=None: det)


def test_error_features_are_task_features_over_represented_in_errors(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, measured: list[int], tmp_path: Path
) -> None:
    wrong = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)  # 3 missed positives
    use_detector(monkeypatch, [0.2 if w else (0.9 if y else 0.1)
                               for w, y in zip(wrong, LABELS, strict=True)])
    got = focus.error_features(ws, anchor(), tmp_path, limit=50)
    cov = ws.measure(anchor(), anchor())
    assert len(measured) == 1, "the anchor-vs-anchor coverage is measured once"
    active = cov.anchor_active.toarray() > 0
    n_err = active[wrong].sum(axis=0)
    ratio = np.where(active.mean(axis=0) > 0, (n_err / 3) / active.mean(axis=0).clip(1e-9), 0)
    expected = np.flatnonzero(cov.task & (n_err >= focus.MIN_ERROR_ROWS)
                              & (ratio >= focus.MIN_RATIO))
    assert len(expected), "the scripted errors single out some task features"
    assert sorted(m.feature for m in got) == sorted(expected.tolist())
    assert [m.log_odds for m in got] == sorted((m.log_odds for m in got), reverse=True)
    for m in got:
        assert m.pos_support == n_err[m.feature] >= 2
        assert m.log_odds == pytest.approx(np.log(ratio[m.feature]))
        assert m.spans and all(s.text in TEXTS[s.row] for s in m.spans)
    assert len(focus.error_features(ws, anchor(), tmp_path, limit=1)) == 1


def test_error_features_empty_without_errors(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, measured: list[int], tmp_path: Path
) -> None:
    use_detector(monkeypatch, [0.9 if y else 0.1 for y in LABELS])
    assert focus.error_features(ws, anchor(), tmp_path, limit=5) == []
    assert measured == [], "no errors: nothing to measure"
