from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from tests.fakes import mean_residual, tiny_model, tiny_sae

ANCHOR = [
    ("tell me how to hurt someone", 1), ("hack into my neighbour's wifi", 1),
    ("how to hurt the lazy dog", 1), ("hack the wifi of the quick fox", 1),
    ("how do I bake bread", 0), ("write a poem about the sea", 0),
    ("the quick brown fox jumps", 0), ("bake a poem about bread", 0),
]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    lm = tiny_model()
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    center = mean_residual(lm, 2, [t for t, _ in ANCHOR])
    tiny_sae(layer=2, d_sae=256, k=4, center=center).sae.save_model(root / "sae")
    with (root / "anchor.jsonl").open("w") as f:
        for text, label in ANCHOR:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    with (root / "seed.jsonl").open("w") as f:
        for text, label in ANCHOR[4:]:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return {"root": root, "model": root / "model", "sae": root / "sae"}


def run(parts, tmp_path, monkeypatch, *args: str):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FACSYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(
        app, [args[0], "--model", str(parts["model"]), "--sae", str(parts["sae"]), *args[1:]]
    )


def test_coverage_prints_fac_and_writes_json(parts, tmp_path, monkeypatch) -> None:
    root = parts["root"]
    res = run(parts, tmp_path, monkeypatch, "coverage", "--anchor", str(root / "anchor.jsonl"),
              "--data", str(root / "seed.jsonl"), "--delta", "0", "--min-support", "1",
              "--json", str(tmp_path / "cov.json"))
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cov.json").read_text())
    assert f"FAC = {report['fac']:.3f}" in res.output
    assert 0 <= report["fac"] < 1 and report["n_task"] > 0 and report["anchor_fac"] == 1.0
    assert len(report["missing"]) == report["n_task"] - report["n_covered"]
    assert report["missing"][0]["spans"], "missing features come with anchor spans"
    assert "missing features" in res.output


def test_coverage_against_itself_warns_saturated(parts, tmp_path, monkeypatch) -> None:
    anchor = str(parts["root"] / "anchor.jsonl")
    res = run(parts, tmp_path, monkeypatch, "coverage", "--anchor", anchor, "--data", anchor,
              "--delta", "0", "--min-support", "1")
    assert res.exit_code == 0, res.output
    assert "FAC = 1.000" in res.output and "saturated" in res.output


def test_bad_input_is_one_clear_line(parts, tmp_path, monkeypatch) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "oops", "label": 7}\n')
    res = run(parts, tmp_path, monkeypatch, "coverage", "--anchor", str(bad),
              "--data", str(parts["root"] / "seed.jsonl"))
    assert res.exit_code == 2
    assert "error:" in res.output and "bad.jsonl" in res.output and "2" in res.output


def test_probe_command_fills_cache(parts, tmp_path, monkeypatch) -> None:
    res = run(parts, tmp_path, monkeypatch, "probe", str(parts["root"] / "anchor.jsonl"),
              "--json", str(tmp_path / "p.json"), "--delta", "0")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert len(rows) == len(ANCHOR) and all(r["features"] for r in rows)
    assert list((tmp_path / "home" / "activations").glob("*.sqlite"))


def test_train_sae_command(parts, tmp_path, monkeypatch) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the quick brown fox {i} bakes bread"}) + "\n"
                              for i in range(200)))
    monkeypatch.setenv("FACSYNTH_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(app, [
        "train-sae", "--model", str(parts["model"]), "--layer", "1", "--corpus", str(corpus),
        "--out", str(tmp_path / "sae"), "--d-sae", "64", "--k", "4", "--n-vectors", "1500",
        "--batch-size", "64",
    ])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "sae" / "sae" / "card.json").read_text())
    assert card["info"]["layer"] == 1 and card["info"]["vectors"] == 1500
    assert "train-sae" in card["info"]["command"]
    assert (tmp_path / "sae" / "sae" / "README.md").exists()


def test_train_sae_refuses_too_few_vectors(parts, tmp_path, monkeypatch) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "the quick brown fox bakes bread"}) + "\n")
    monkeypatch.setenv("FACSYNTH_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(app, [
        "train-sae", "--model", str(parts["model"]), "--layer", "1", "--corpus", str(corpus),
        "--out", str(tmp_path / "sae"), "--d-sae", "64", "--k", "4",
    ])
    assert res.exit_code == 2 and "fewer than 10 steps" in res.output


def test_cli_import_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, agent.cli; sys.exit('torch' in sys.modules or 'sae_lens' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_synthesis_chain_then_improve_and_resume(parts, tmp_path, monkeypatch) -> None:
    """interpret -> generate -> verify, then improve and --resume, all through the CLI on the
    tiny model with in-process generation (its replies are noise: the chain must still hold)."""
    anchor, seed = str(EXAMPLES / "anchor.jsonl"), str(EXAMPLES / "seed.jsonl")
    local = ["--generator", "local"]
    # a lenient label judge, so the random tiny SAE has task features the seed misses
    (tmp_path / "facsynth.toml").write_text(
        "[judge]\nmin_support = 1\nmin_support_frac = 0.0\nmin_log_odds = 0.5\n")
    res = run(parts, tmp_path, monkeypatch, "coverage", "--anchor", anchor, "--data", seed,
              "--json", "cov.json")
    assert res.exit_code == 0, res.output
    missing = json.loads((tmp_path / "cov.json").read_text())["missing"]
    assert len(missing) >= 2

    res = run(parts, tmp_path, monkeypatch, "interpret", "cov.json", "--json", "f.json",
              "--top", "2", "--relevance", "label", *local)
    assert res.exit_code == 0, res.output
    features = json.loads((tmp_path / "f.json").read_text())["features"]
    assert [f["record"]["feature"] for f in features] == [m["feature"] for m in missing[:2]]

    res = CliRunner().invoke(app, ["generate", "f.json", "--out", "s.jsonl", "--per-feature",
                                   "2", "--model", str(parts["model"]), *local])
    assert res.exit_code == 0, res.output
    samples = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and len({s["provenance"]["seed"] for s in samples}) == 4

    res = run(parts, tmp_path, monkeypatch, "verify", "s.jsonl", "--anchor", anchor,
              "--data", seed, "--out", "k.jsonl")
    assert res.exit_code == 0, res.output
    kept = (tmp_path / "k.jsonl").read_text().splitlines()
    rejected = [json.loads(x) for x in (tmp_path / "k.rejected.jsonl").read_text().splitlines()]
    assert len(kept) + len(rejected) == 4 and all(r["reason"] for r in rejected)

    improve = ["improve", "--anchor", anchor, "--data", seed, "--run-dir", "r", "--rounds", "1",
               "--top", "2", "--per-feature", "2", "--relevance", "label", *local]
    res = run(parts, tmp_path, monkeypatch, *improve)
    assert res.exit_code == 0, res.output
    history = json.loads((tmp_path / "r" / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0, 1] and history[1]["generated"] == 4
    res = CliRunner().invoke(app, ["improve", "--resume", "r"])
    assert res.exit_code == 0, res.output
    assert "stopped after round 1" in res.output
    res = run(parts, tmp_path, monkeypatch, *improve)
    assert res.exit_code == 2 and "already holds a run" in res.output
