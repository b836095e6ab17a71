"""`facsynth compare`: the statistics, the protocol helpers, and one whole run on the tiny
model (a scripted writer: the bookkeeping must hold whatever it writes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.cli import app
from agent.cli.compare import parse_assignments, parse_variant
from agent.compare import CompareSettings
from tests.unit.test_cli import EXAMPLES, parts, run  # noqa: F401  (fixture)
from tools.errors import ConfigError
from tools.paired import paired_diff
from tools.tasks.toxicity import pseudo_labels


def test_paired_diff_interval_is_the_t_interval_of_the_differences() -> None:
    d = paired_diff([0.6, 0.62, 0.61, 0.65, 0.6], [0.58, 0.6, 0.6, 0.6, 0.59])
    diffs = np.array([0.02, 0.02, 0.01, 0.05, 0.01])
    assert d.mean == pytest.approx(diffs.mean()) and d.n == 5
    half = 2.776 * diffs.std(ddof=1) / np.sqrt(5)  # t(0.975, 4) = 2.776
    assert d.low == pytest.approx(diffs.mean() - half, abs=1e-3) and d.above_zero
    assert d.describe().startswith("+2.2 [")
    one = paired_diff([0.5], [0.4])
    assert one.low == one.high == pytest.approx(0.1) and "n=1" in one.describe()
    with pytest.raises(ValueError):
        paired_diff([0.1, 0.2], [0.1])


def test_pseudo_labels_keep_seed_rows_and_match_the_seed_rate() -> None:
    scores = np.linspace(0, 1, 20)
    labels = pseudo_labels(scores, seed_rows=[0, 19], seed_labels=[1, 0])
    assert labels[0] == 1 and labels[19] == 0  # the seed's real labels win
    assert sum(labels[1:19]) == 9  # top half of the others (seed rate 0.5)
    assert all(labels[i] <= labels[i + 1] for i in range(1, 18))


def test_assignments_and_variants_parse_nested_json_values() -> None:
    assert parse_assignments("negatives=0,label_gate.judge=off,hosts=true", "--set") == {
        "negatives": 0, "label_gate": {"judge": "off"}, "hosts": True}
    assert parse_variant("fac-nogate:label_gate.judge=off") == (
        "fac-nogate", {"label_gate": {"judge": "off"}})
    for bad in ("nonsense", "=3"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_assignments(bad, "--set")
    with pytest.raises(ConfigError, match="NAME:"):
        parse_variant("no-colon")


def test_settings_refuse_unknown_methods_and_bad_variant_settings() -> None:
    with pytest.raises(ConfigError, match="unknown methods bogus"):
        CompareSettings(methods=["seed", "bogus"]).check()
    with pytest.raises(ConfigError, match="clash"):
        CompareSettings(variants={"fac": {}}).check()
    with pytest.raises(ConfigError, match="budget"):
        CompareSettings(methods=["x"], variants={"x": {"budget": 0}}).check()
    assert CompareSettings(labels="anchor").reference == "full"


@pytest.mark.slow
def test_compare_end_to_end_equal_kept_and_paired(parts, tmp_path, monkeypatch) -> None:  # noqa: F811
    import contextlib
    import random

    import agent.llm
    from tests.fakes import WORDS, EchoLLM

    class Writer(EchoLLM):
        """EchoLLM, but a request without spans (the baselines) gets words drawn by seed."""

        async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
            if "\n- " in user:
                return await super().achat(system, user, temperature=temperature, seed=seed)
            return " ".join(random.Random(seed).sample(WORDS, 6))

    @contextlib.contextmanager
    def echo(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        yield Writer()  # the bookkeeping, not the writer (tests/unit/test_local_llm.py)

    monkeypatch.setattr(agent.llm, "open_llm", echo)
    # a lenient label judge, so the random tiny SAE has task features the seed misses
    (tmp_path / "facsynth.toml").write_text(
        "[judge]\nmin_support = 1\nmin_support_frac = 0.0\nmin_log_odds = 0.5\n")
    args = ["compare", "--anchor", str(EXAMPLES / "anchor.jsonl"), "--methods",
            "seed,full,fac,fac-pos,random,cot-self-instruct", "--variant", "fac-pos:negatives=0",
            "--budget", "2", "--seeds", "2", "--seed-frac", "0.3", "--rounds", "1",
            "--generator", "local", "--work", "w", "--json", "out.json", "--report", "r.html"]
    res = run(parts, tmp_path, monkeypatch, *args)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["protocol"] == "seed" and out["reference"] == "seed"
    methods = out["methods"]
    assert {"seed", "full", "fac", "fac-pos"} <= set(methods) <= {
        "seed", "full", "fac", "fac-pos", "random"}
    # the writer never writes CoT-Self-Instruct's answer marker: that baseline fails on every
    # seed, is reported, and neither stops the compare nor cuts the others' kept rows
    assert out["failures"]["cot-self-instruct"].startswith("failed on seeds 0, 1: ")
    assert "usable rows" in out["failures"]["cot-self-instruct"] and min(out["kept"]) >= 1
    assert "cot-self-instruct failed on seeds 0, 1" in " ".join(res.output.split())
    # the baselines' rows pass fac's label gate (the seed model's detector judge) inside
    # their request loop: the writer's random words claimed toxic are disputed, a disputed
    # row is a spent request, and too few left is a failure
    for s in (0, 1):
        calls = json.loads(next((tmp_path / "w").glob(f"*/s{s}/random.calls.json")).read_text())
        assert calls["kept"] + calls["disputed"] <= calls["calls"]
        if calls["kept"] < 1:  # MIN_SHARE of --budget 2
            assert "disputed by the label gate" in out["failures"]["random"]
        else:
            assert out["kept"][s] <= calls["kept"]
    for name in ("fac", "fac-pos"):  # equal kept budgets per seed
        assert methods[name]["n_added"] == np.mean(out["kept"])
        assert methods[name]["paired"]["n"] == 2
    if "random" in methods:  # a row for each seed it did not fail on, cut to that seed's kept
        ok = [s for s in (0, 1) if f"seeds {s}" not in out["failures"].get("random", "")]
        assert methods["random"]["paired"]["n"] == len(ok)
        assert methods["random"]["n_added"] == np.mean([out["kept"][s] for s in ok])
    assert methods["seed"]["paired"] is None and methods["seed"]["n_added"] == 0
    assert methods["fac"]["loop"]["requests"] > 0
    assert "random" not in methods or methods["random"]["loop"] is None
    assert methods["full"]["n_train"] > methods["seed"]["n_train"]
    assert 0 <= methods["seed"]["fac_graded"] <= 1
    assert "toxicity task" in res.output and "seed protocol" in res.output
    assert "data:image/png;base64," in (tmp_path / "r.html").read_text()
    # a rerun reads every seed from the work folder
    again = run(parts, tmp_path, monkeypatch, *args)
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "out.json").read_text())["methods"] == methods


def test_compare_bad_flags_are_one_line_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["compare", "--anchor", "nope.jsonl", "--methods", "seed,zz"])
    assert res.exit_code == 2 and "unknown methods zz" in res.output
    res = CliRunner().invoke(app, ["compare", "--anchor", "nope.jsonl", "--budget", "0"])
    assert res.exit_code == 2 and "budget" in res.output


def test_work_key_ignores_seeds_methods_and_variants() -> None:
    from agent.compare import work_key

    base = CompareSettings()
    same = CompareSettings(seeds=2, methods=["seed", "fac"], variants={"x": {"negatives": 0}})
    assert work_key(base, "a") == work_key(same, "a") != work_key(base, "b")
    assert work_key(base) != work_key(CompareSettings(budget=7))


def test_seed_and_full_rows_hold_for_any_kept_count(tmp_path) -> None:
    from agent.compare import row_path

    assert row_path(tmp_path, "fac", 3, None).name == "fac.k3.json"
    assert row_path(tmp_path, "random", 3, 0.2).name == "random.k3.w0.2.json"
    assert row_path(tmp_path, "seed", 3, None).name == "seed.json"
    (tmp_path / "seed.k0.w0.2.json").write_text("{}")  # another share: not this row
    assert row_path(tmp_path, "seed", 5, None).name == "seed.json"
    (tmp_path / "seed.k0.json").write_text("{}")  # written before, under kept 0
    assert row_path(tmp_path, "seed", 5, None).name == "seed.k0.json"
    assert row_path(tmp_path, "seed", 5, 0.2).name == "seed.k0.w0.2.json"
    assert row_path(tmp_path, "full", 5, None).name == "full.json"
