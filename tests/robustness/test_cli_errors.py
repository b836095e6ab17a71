"""Bad input on the command line: one `error:` line, exit code 2, nothing written.

Each case runs the real console entry point (`agent.cli.run`, what the `facsynth` script
calls) in-process from a scratch folder holding copies of the demo files; the cases that need
a model use the tiny random-weight one from tests/fakes.py, saved as a local folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from agent import cli


def facsynth(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
             *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `facsynth ARGS`."""
    monkeypatch.setattr(sys, "argv", ["facsynth", *args])
    with pytest.raises(SystemExit) as ended:
        cli.run()
    captured = capsys.readouterr()
    return int(ended.value.code or 0), captured.out, captured.err


def one_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, out, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


IMPROVE = ["improve", "--anchor", "anchor.jsonl", "--data", "seed.jsonl", "--run-dir", "runs/r"]


@pytest.mark.parametrize(("flags", "needles"), [
    (["--budget", "0"], ["--budget", "greater than or equal to 1"]),
    (["--epsilon", "-1"], ["--epsilon"]),
    (["--focus", "bogus"], ["--focus", "'data', 'model' or 'both'"]),
    (["--detector", "bogus"], ["--detector", "'probe' or 'lora'"]),
    (["--relevance", "bogus"], ["--relevance", "'bogus' is not one of 'label', 'llm', 'auto'"]),
    (["--rounds", "-1"], ["--rounds"]),
    (["--epsilon", "nan"], ["--epsilon", "finite"]),
])
def test_improve_rejects_bad_options_before_writing(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    flags: list[str], needles: list[str],
) -> None:
    before = files(ws)
    one_error(*facsynth(capsys, monkeypatch, *IMPROVE, *flags), *needles)
    assert files(ws) == before


@pytest.mark.parametrize(("flags", "needles"), [
    (["--top", "-3"], ["--top", "greater than or equal to 1"]),
    (["--min-support", "-5"], ["judge.min_support", "greater than or equal to 1"]),
    (["--min-log-odds", "nan"], ["judge.min_log_odds", "finite"]),
    (["--delta", "inf"], ["delta", "finite"]),
    (["--quantile", "1.5"], ["quantile"]),
    (["--pooling", "mean"], ["pooling"]),
    (["--bogus"], ["No such option: --bogus"]),
])
def test_coverage_rejects_nonsense(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    flags: list[str], needles: list[str],
) -> None:
    before = files(ws)
    one_error(*facsynth(capsys, monkeypatch, "coverage", "--anchor", "anchor.jsonl",
                        "--data", "seed.jsonl", *flags), *needles)
    assert files(ws) == before


@pytest.mark.parametrize(("name", "content", "data", "needles"), [
    ("facsynth.toml", 'model = "smollm2-135m"\nquantile 0.9\n', "seed.jsonl",
     ["facsynth.toml", "not valid TOML", "line 2"]),
    ("facsynth.toml", "[judge]\nmin_suport = 50\n", "seed.jsonl",
     ["judge.min_suport", "Extra inputs"]),
    ("other.jsonl", '{"body": "hello", "label": 0}\n', "other.jsonl",
     ["other.jsonl line 1", "--text-field"]),
])
def test_bad_file_is_one_line(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    name: str, content: str, data: str, needles: list[str],
) -> None:
    (ws / name).write_text(content)
    one_error(*facsynth(capsys, monkeypatch, "coverage", "--anchor", "anchor.jsonl",
                        "--data", data), *needles)


@pytest.mark.parametrize("command", [
    ["coverage", "--anchor", "anchor.jsonl", "--data", "seed.jsonl", "--json", "out"],
    ["probe", "seed.jsonl", "--json", "out"],
    ["verify", "seed.jsonl", "--anchor", "anchor.jsonl", "--data", "seed.jsonl",
     "--out", "out"],
])
def test_output_path_that_is_a_folder_is_refused_up_front(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    (ws / "out").mkdir()
    before = files(ws)
    one_error(*facsynth(capsys, monkeypatch, *command), "out", "is a folder")
    assert files(ws) == before, "no temp file or partial output is left"


def test_mistyped_local_path_is_not_taken_for_a_hub_id(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    one_error(*facsynth(capsys, monkeypatch, "coverage", "--anchor", "anchor.jsonl",
                        "--data", "seed.txt"), "seed.txt", "file not found")
    assert time.monotonic() - started < 10, "no hub look-up with retries"


def test_failed_start_leaves_nothing_and_the_corrected_command_runs(
    ws: Path, tiny_parts: dict[str, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tiny = ["--model", str(tiny_parts["model"]), "--sae", str(tiny_parts["sae"]),
            "--generator", "local", "--rounds", "0"]
    typo = ["improve", "--anchor", "anchr.jsonl", "--data", "seed.jsonl", "--run-dir", "runs/r"]
    one_error(*facsynth(capsys, monkeypatch, *typo, *tiny), "anchr.jsonl", "file not found")
    assert not (ws / "runs").exists()
    code, out, err = facsynth(capsys, monkeypatch, *IMPROVE, *tiny)
    assert code == 0, err
    assert "stopped after round 0" in out
    saved = json.loads((ws / "runs" / "r" / "config.json").read_text())
    assert saved["anchor"] == str(ws / "anchor.jsonl"), "inputs are stored as absolute paths"

    elsewhere = ws.parent / f"{ws.name}-elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = facsynth(capsys, monkeypatch, "improve", "--resume", str(ws / "runs" / "r"))
    assert code == 0, err
    assert "stopped after round 0" in out
    one_error(*facsynth(capsys, monkeypatch, "improve", "--anchor", str(ws / "anchor.jsonl"),
                        "--data", str(ws / "seed.jsonl"), "--run-dir", str(ws / "runs" / "r")),
              "already holds a run", "--resume")
