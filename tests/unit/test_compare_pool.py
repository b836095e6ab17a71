"""`facsynth compare --labels pool` on the tiny model: every pick method labels the same
number of pool rows from the same candidates, in rounds; the learning curve, positives and
pairing against pick-random; cached picks; an external pool's copies of eval rows dropped;
the pool protocol shares the seed protocol's generated sets."""

from __future__ import annotations

import json
from pathlib import Path

from agent.compare_settings import CompareSettings, work_key
from tests.unit.test_cli import EXAMPLES, parts, run  # noqa: F401  (fixture)

PICKS = ["pick-fac", "pick-random", "pick-uncertainty", "pick-top-score", "pick-coreset"]


def test_pool_compare_labels_the_same_k_rows_per_method(parts, tmp_path, monkeypatch) -> None:  # noqa: F811
    args = ["compare", "--anchor", str(EXAMPLES / "anchor.jsonl"), "--labels", "pool",
            "--methods", ",".join(["seed", *PICKS]), "--budget", "6", "--batch", "3",
            "--curve", "3,6", "--seeds", "2", "--seed-frac", "0.2", "--work", "w",
            "--json", "out.json", "--report", "r.html"]
    res = run(parts, tmp_path, monkeypatch, *args)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["protocol"] == "pool" and out["reference"] == "seed"
    assert any("the pool's own labels" in x for x in out["external"])
    methods = out["methods"]
    for name in PICKS:
        m = methods[name]
        assert m["n_added"] == 6 and m["n_train"] == methods["seed"]["n_train"] + 6
        assert sorted(m["curve"]) == ["3", "6"] and m["paired"]["n"] == 2
        assert m["positives"] is not None and 0 <= m["positives"] <= 6
        assert (m["paired_random"] is None) == (name == "pick-random")
        assert m["curve"]["6"]["mean"] == m["metric_mean"]
    assert "learning curve" in res.output
    assert "Learning curve" in (tmp_path / "r.html").read_text()
    picks = json.loads(next((tmp_path / "w").glob("*/s0/picks/pick-fac.json")).read_text())
    assert len(picks["rows"]) == 6 == len(set(picks["rows"]))
    assert picks["rounds"] == [1] * 3 + [2] * 3
    # a rerun only reports, from the cached picks and rows
    again = run(parts, tmp_path, monkeypatch, *args)
    assert again.exit_code == 0 and json.loads((tmp_path / "out.json").read_text())[
        "methods"] == methods


def test_an_external_pool_loses_its_copies_of_eval_rows(parts, tmp_path, monkeypatch) -> None:  # noqa: F811
    anchor = [json.loads(x) for x in (EXAMPLES / "anchor.jsonl").read_text().splitlines()]
    ev = tmp_path / "ev.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in anchor[:30] + anchor[-30:]))
    pool = tmp_path / "pool.jsonl"
    pool.write_text((EXAMPLES / "pool.jsonl").read_text()
                    + "".join(json.dumps(r) + "\n" for r in anchor[:5]))  # 5 eval rows
    res = run(parts, tmp_path, monkeypatch, "compare", "--anchor",
              str(EXAMPLES / "anchor.jsonl"), "--eval", str(ev), "--labels", "pool",
              "--pool", str(pool), "--methods", "seed,pick-random", "--budget", "4",
              "--batch", "4", "--seeds", "2", "--work", "w", "--json", "out.json")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["pool_dropped"] == 5 and out["n_candidates"] == 240


def test_pool_and_seed_protocols_share_their_generated_sets() -> None:
    seed = CompareSettings(labels="seed")
    pool = CompareSettings(labels="pool", methods=["seed", "pick-fac", "fac"],
                           select={"batch": 10}, curve=[10, 20])
    assert work_key(seed, "x") == work_key(pool, "x")
    assert work_key(seed, "x") != work_key(CompareSettings(labels="anchor"), "x")


def test_no_file_of_the_pool_protocol_is_left_when_settings_are_refused(tmp_path: Path) -> None:
    import pytest

    from tools.errors import ConfigError

    with pytest.raises(ConfigError, match="--labels pool: full knows every pool label"):
        CompareSettings(labels="pool", methods=["seed", "full", "pick-fac"]).check()
    with pytest.raises(ConfigError, match="the reward task has no pool path"):
        CompareSettings(task="reward", labels="pool", methods=["seed", "pick-fac"]).check()
    assert not list(tmp_path.iterdir())
