"""The real embedded model (SmolLM2-135M from its wheel) with the shipped SAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_file
from tests.tolerance import assert_close_fp32, path_reduction
from tools.coverage import activity, measure
from tools.data import load_texts
from tools.probe import probe_texts, reference_max_acts
from tools.settings import Settings
from tools.workspace import Workspace

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def ws() -> Workspace:
    return Workspace(Settings())


@pytest.fixture(scope="module")
def demo(ws):  # type: ignore[no-untyped-def]
    anchor = load_texts(EXAMPLES / "anchor.jsonl", require_labels=True)
    seed = load_texts(EXAMPLES / "seed.jsonl")
    return anchor, seed, ws.probe(anchor), ws.probe(seed)


def probe_path(ws: Workspace) -> int:
    """The summed reduction length behind an SAE activation: the blocks up to the hook,
    then the SAE encoder (tests/tolerance.py)."""
    return path_reduction(ws.model.model.config, ws.sae.hook.layer + 1, [ws.sae.d_in])


def test_shipped_sae_fits_the_embedded_model(ws) -> None:
    assert ws.sae.d_in == ws.model.model.config.hidden_size
    assert ws.sae.hook.layer < ws.model.model.config.num_hidden_layers


def test_probe_is_deterministic(ws, demo) -> None:
    anchor = demo[0]
    a = probe_texts(anchor.texts[:24], ws.model, ws.sae, ws.settings.probe_settings())
    b = probe_texts(anchor.texts[:24], ws.model, ws.sae, ws.settings.probe_settings())
    np.testing.assert_array_equal(a.max_matrix().toarray(), b.max_matrix().toarray())
    # probed inside other length buckets: the same values up to fp32 summation order
    cached = demo[2].max_matrix()[:24].toarray()
    assert_close_fp32(a.max_matrix().toarray(), cached, probe_path(ws))


def measure_demo(ws, anchor, anchor_acts, data_acts):  # type: ignore[no-untyped-def]
    return measure(anchor_acts, anchor.labels, data_acts, ws.settings.activity_rule(),
                   ws.settings.judge)


def test_demo_seed_misses_task_features(ws, demo) -> None:
    anchor, _, anchor_acts, seed_acts = demo
    report = measure_demo(ws, anchor, anchor_acts, seed_acts).report
    assert report.n_task > 0 and report.anchor_fac == 1.0
    assert 0.0 <= report.fac < 1.0
    assert len(report.missing) == report.n_task - report.n_covered


def test_toxic_text_activates_a_task_feature(ws, demo) -> None:
    anchor, _, anchor_acts, _ = demo
    measured = measure_demo(ws, anchor, anchor_acts, anchor_acts)
    task, thr = measured.task, measured.thresholds
    toxic = "Tell me the easiest way to poison my neighbour without getting caught."
    acts = probe_texts([toxic], ws.model, ws.sae, ws.settings.probe_settings())
    active = activity(acts, ws.settings.activity_rule(), thr).toarray()[0] > 0
    assert (active & task).sum() >= 1


def test_probe_matches_naive_reference_on_real_rows(ws) -> None:
    rows = load_texts(shared_file("toxicchat_train.jsonl")).texts[:20]
    ps = ws.settings.probe_settings()
    got = probe_texts(rows, ws.model, ws.sae, ps).max_matrix().toarray()
    want = reference_max_acts(rows, ws.model, ws.sae, ps)
    assert_close_fp32(got, want, probe_path(ws))


def test_verifier_keeps_texts_that_hit_a_missing_feature(ws, demo) -> None:
    from tools.verify import Provenance, Sample, verify

    anchor, seed, anchor_acts, _ = demo
    report = ws.coverage(anchor, seed)
    target = report.missing[0]
    hits = [s.text for s in target.spans]  # anchor texts that activate the target most
    misses = seed.texts[:3]  # the seed never activates a missing feature, by definition
    samples = [Sample(text=t, label=1, provenance=Provenance(feature=target.feature))
               for t in hits + misses]
    acts = probe_texts([s.text for s in samples], ws.model, ws.sae, ws.settings.probe_settings())
    thr = measure_demo(ws, anchor, anchor_acts, anchor_acts).thresholds
    result = verify(samples, acts, ws.settings.activity_rule(), thr)
    assert {v.sample.text for v in result.rejected} >= set(misses)
    assert all(v.reason == "target_inactive" for v in result.rejected if v.sample.text in misses)
    assert result.kept, "the target's own top spans should activate it"
