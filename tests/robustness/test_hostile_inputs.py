"""Each defect a hostile-input probe found in compare, the pair tasks, task options, the run
folder and the small surfaces (issue 19 item 4, a-i): a clean refusal or one line with exit
code 2, and nothing half-written."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.robustness.test_cli_errors import IMPROVE, facsynth, files, one_error
from tools.errors import DataError, UsageError

COMPARE = ["compare", "--anchor", "anchor.jsonl", "--work", "w"]


def rows(path: Path, items: list[tuple[str, int]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in items))
    return path


# -- a. MCP improve(resume=true) reads only what the tool itself could ----------------------------

@pytest.fixture
def box(tmp_path: Path) -> Any:
    from agent.toolbox import Toolbox
    from tests.fakes import EchoLLM
    from tools.settings import Settings

    root = tmp_path / "root"
    root.mkdir()
    rows(root / "anchor.jsonl", [("hurt them", 1), ("bake bread", 0)] * 3)
    rows(root / "seed.jsonl", [("hurt them", 1), ("bake bread", 0)])
    return Toolbox(Settings(home=tmp_path / "home"), root, llm=EchoLLM())


def plant(box: Any, **changes: Any) -> Path:
    """A run folder inside the root whose config.json the improve tool did not write."""
    from tools.rundir import LoopSettings, RunConfig

    cfg = box._tool_config(task="toxicity", anchor="anchor.jsonl", data="seed.jsonl",
                           relevance="auto", rounds=1, budget=40, top=5, per_feature=2, seed=0)
    loop = changes.pop("loop", None)
    cfg = cfg.model_copy(update={**changes, **({"loop": LoopSettings(**loop)} if loop else {})})
    run = box.root / "runs" / "p"
    run.mkdir(parents=True)
    (run / "config.json").write_text(cfg.model_dump_json())
    assert RunConfig.read(run) == cfg
    return run


@pytest.mark.parametrize(("changes", "needle"), [
    ({"anchor": "/etc/hostname"}, "outside the workspace root"),
    ({"data": "/etc/hostname"}, "outside the workspace root"),
    ({"loop": {"budget": 100_000}}, "budget 100000 is outside what the improve tool accepts"),
    ({"loop": {"max_rounds": 50}}, "rounds 50 is outside"),
    ({"eval": "/etc/hostname"}, "it differs in eval"),
    ({"task_options": {"layer": 3}}, "it differs in task_options"),
])
def test_resume_reads_a_planted_run_folder_only_within_the_tools_bounds(
        box: Any, changes: dict[str, Any], needle: str) -> None:
    plant(box, **changes)
    from agent.sandbox import PathRefused

    with pytest.raises((UsageError, PathRefused), match=needle) as got:
        box.improve(anchor="x", data="y", run_dir="runs/p", resume=True)
    assert "hostname" not in str(got.value).replace("/etc/hostname", ""), "no file content"
    assert not list((box.root / ".facsynth").glob("jobs/*.json")), "no job was started"


# -- b, c. compare variants and --set -------------------------------------------------------------

@pytest.mark.parametrize(("flags", "needles"), [
    (["--variant", "../../../esc:negatives=0", "--methods", "seed,../../../esc"],
     ["a variant's name is letters, digits"]),
    (["--variant", "a:negatives=0", "--variant", "a:negatives=1", "--methods", "seed,a"],
     ["--variant 'a' is given twice"]),
    (["--set", "bogus=1"], ["--set", "bogus"]),
    (["--set", "negatives=abc"], ["--set", "negatives"]),
    (["--labels", "pool", "--methods", "seed,full,pick-fac"], ["full knows every pool label"]),
    (["--methods", "seed,pick-fac"], ["pick-fac: pool strategies label pool rows"]),
    (["--pool", "seed.jsonl"], ["--pool needs --labels pool"]),
    (["--labels", "pool", "--curve", "25,x"], ["--curve"]),
])
def test_compare_refuses_bad_settings_before_any_work(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    flags: list[str], needles: list[str],
) -> None:
    before = files(ws)
    one_error(*facsynth(capsys, monkeypatch, *COMPARE, *flags), *needles)
    assert files(ws) == before, "nothing written (no work folder, no s0/inputs)"
    assert not (ws.parent / "esc").exists() and not (ws.parent / "esc.jsonl").exists()


# -- d. a one-class eval file ---------------------------------------------------------------------

def test_compare_refuses_a_one_class_eval_file(
        ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rows(ws / "ev.jsonl", [("hello there", 0), ("good morning", 0)])
    for extra in (["--eval", "ev.jsonl"], ["--also-eval", "ev.jsonl"]):
        before = files(ws)
        one_error(*facsynth(capsys, monkeypatch, *COMPARE, *extra),
                  "ev.jsonl: all 2 rows are labelled 0", "both labels")
        assert files(ws) == before


# -- e. too few rows of a label to split ----------------------------------------------------------

def test_a_tiny_anchor_says_what_a_split_needs(
        ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rows(ws / "tiny.jsonl", [("hurt them", 1), ("hit them", 1), ("bake bread", 0)])
    improve = ["improve", "--anchor", "tiny.jsonl", "--data", "seed.jsonl", "--run-dir", "r"]
    for args in (improve, ["compare", "--anchor", "tiny.jsonl", "--work", "w"]):
        before = files(ws)
        one_error(*facsynth(capsys, monkeypatch, *args), "tiny.jsonl",
                  "each label needs at least 2 rows", "2 rows labelled 1 and 1 labelled 0")
        assert files(ws) == before


# -- f. task options: typed, named ----------------------------------------------------------------

@pytest.mark.parametrize(("task", "option", "needle"), [
    ("steering", "layer=abc", "--task-option layer: input should be a valid integer"),
    ("steering", "layer=1.5", "--task-option layer: input should be a valid integer, got a "
                              "number with a fractional part (got 1.5)"),
    ("reward", "prompt_chars=1.5", "--task-option prompt_chars: input should be a valid"),
    ("reward", "colour=red", "--task-option colour: the reward task has no such option"),
    ("steering", "multiplier=inf", "--task-option multiplier"),
])
def test_task_options_are_validated_by_name(
        ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        task: str, option: str, needle: str) -> None:
    for command in (["compare", "--anchor", "anchor.jsonl"],
                    ["improve", "--anchor", "anchor.jsonl", "--data", "seed.jsonl",
                     "--run-dir", "r"]):
        before = files(ws)
        one_error(*facsynth(capsys, monkeypatch, *command, "--task", task, "--task-option",
                            option), needle)
        assert files(ws) == before


# -- g. storage errors ----------------------------------------------------------------------------

def test_a_full_disk_under_the_checkpoints_is_one_line(
        ws: Path, tiny_parts: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.graph

    def full(run_dir: Path) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(agent.graph, "checkpointer", full)
    # the CLI turns transformers' loading bar off before transformers is imported; in this
    # test process it was imported long before
    monkeypatch.setattr("transformers.utils.logging._tqdm_active", False)
    code, out, err = facsynth(capsys, monkeypatch, *IMPROVE, "--model",
                              str(tiny_parts["model"]), "--sae", str(tiny_parts["sae"]),
                              "--generator", "local")
    one_error(code, out, err, "database or disk is full", "--resume")


# -- h. one-class data, and a run that never finished round 0 -------------------------------------

def test_one_class_data_is_refused_at_start_and_unstarted_runs_do_not_block(
        ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rows(ws / "neg.jsonl", [(f"harmless row {i}", 0) for i in range(20)])
    before = files(ws)
    one_error(*facsynth(capsys, monkeypatch, "improve", "--anchor", "anchor.jsonl", "--data",
                        "neg.jsonl", "--run-dir", "runs/r"),
              "--data", "neg.jsonl: all 20 rows are labelled 0")
    assert files(ws) == before, "no run folder is left behind"

    # a run folder whose round 0 never finished (a config and checkpoints, no history)
    from agent.runs import start_run
    from tools.rundir import RunConfig, RunPaths

    run = ws / "runs" / "old"
    start_run(run, RunConfig(anchor="anchor.jsonl", data="seed.jsonl"))
    (run / "checkpoints.sqlite").write_bytes(b"")
    cfg = start_run(run, RunConfig(anchor="anchor.jsonl", data="seed.jsonl", eval_frac=0.3))
    assert RunConfig.read(run) == cfg and not RunPaths(run).checkpoints.exists()
    (run / "history.json").write_text('{"rounds": []}')
    with pytest.raises(UsageError, match="already holds a run"):
        start_run(run, RunConfig(anchor="anchor.jsonl", data="seed.jsonl"))


# -- i. the small ones ----------------------------------------------------------------------------

def test_mcp_errors_name_paths_relative_to_the_root(box: Any) -> None:
    from agent.mcp_server import build_server
    from tests.unit.test_mcp_server import call, error_text

    build_server(box)
    text = error_text(call(box, "describe_dataset", {"path": "nested/missing.jsonl"})[0])
    assert "nested/missing.jsonl" in text and str(box.root) not in text


def test_an_unwritable_json_target_is_refused_before_the_run(
        ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    locked = ws / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK) and os.geteuid() == 0:
            # root writes anywhere: a read-only place for root is a file where a folder is
            (ws / "afile").write_text("x")
            target = "afile/out.json"
        else:
            target = "locked/out.json"
        before = files(ws)
        one_error(*facsynth(capsys, monkeypatch, *COMPARE, "--json", target), "--json")
        assert files(ws) == before
    finally:
        locked.chmod(0o700)


def test_a_second_compare_on_the_same_work_is_refused(tmp_path: Path) -> None:
    from agent.compare import work_lock

    folder = tmp_path / "w" / "key"
    with work_lock(folder, tmp_path / "w"), pytest.raises(UsageError,
                                                         match="another facsynth compare"):
        with work_lock(folder, tmp_path / "w"):
            pass
    with work_lock(folder, tmp_path / "w"):  # released
        pass


def test_chat_without_an_endpoint_writes_nothing(
        ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.llm.vllm_installed", lambda: False)
    one_error(*facsynth(capsys, monkeypatch, "chat", "--root", ".", "-m", "hi"),
              "needs a chat model that calls tools")
    assert not (ws / ".facsynth").exists()


def test_compare_takes_field_for_pair_tasks(
        ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "pairs.jsonl").write_text(json.dumps({"q": "x", "chosen": "a", "rejected": "b"}) + "\n")
    code, out, err = facsynth(capsys, monkeypatch, "compare", "--task", "reward", "--anchor",
                              "pairs.jsonl", "--field", "prompt=q", "--field", "bogus=z")
    one_error(code, out, err, "the reward task has no field 'bogus'")


def test_pair_row_hints_name_the_flag_and_the_kind() -> None:
    from tools.tasks.pairs import row_text

    with pytest.raises(DataError, match="rename a column with --field, e.g. --field prompt="):
        row_text("f.jsonl line 2", {"q": "x"}, "prompt", ("prompt", "chosen", "rejected"))
    with pytest.raises(DataError, match="field 'chosen' is a number, not text"):
        row_text("f.jsonl line 2", {"chosen": 3}, "chosen", ("prompt", "chosen", "rejected"))


def test_ctrl_c_during_improve_says_how_to_resume(
        ws: Path, tiny_parts: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.cli.improve

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(agent.cli.improve, "_run_loop", interrupted)
    code, out, err = facsynth(capsys, monkeypatch, *IMPROVE, "--model",
                              str(tiny_parts["model"]), "--sae", str(tiny_parts["sae"]),
                              "--generator", "local")
    assert code == 130 and "facsynth improve --resume runs/r" in err, (code, err)
