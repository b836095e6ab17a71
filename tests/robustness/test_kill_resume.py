"""kill -9 of a real improve run at every node, then `--resume` from another working folder,
gives byte for byte the data of an uninterrupted run, with both generator backends the tests
can run: the scripted fake LLM and in-process generation (`--generator local`) on the tiny
model.

The killed run is a subprocess (tests/robustness/improve_driver.py) that SIGKILLs itself as
the node starts (or, for `samples:N`, with N samples journalled); the resume runs here, in a
folder that holds neither the inputs nor the run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import final_data
from tests.robustness.improve_driver import main

REPO = Path(__file__).resolve().parents[2]


def start_killed(ws: Path, tiny: dict[str, Path], backend: str, kill: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.robustness.improve_driver", str(ws / "run"),
         str(tiny["model"]), str(tiny["sae"]), backend, kill],
        cwd=ws, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def resume_elsewhere(ws: Path, tiny: dict[str, Path], backend: str,
                     monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    elsewhere = ws.parent / f"{ws.name}-elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    main(ws / "run", str(tiny["model"]), str(tiny["sae"]), backend)
    return final_data(ws / "run")


_reference: dict[str, dict[str, str]] = {}


def reference(ws: Path, tiny: dict[str, Path], backend: str) -> dict[str, str]:
    """The uninterrupted run's data (made once per backend)."""
    if backend not in _reference:
        main(ws / f"reference-{backend}", str(tiny["model"]), str(tiny["sae"]), backend)
        _reference[backend] = final_data(ws / f"reference-{backend}")
    return _reference[backend]


def test_reference_runs_do_synthesise(ws: Path, tiny_parts: dict[str, Path]) -> None:
    for backend in ("fake", "local"):
        data = reference(ws, tiny_parts, backend)
        assert data["data/round-1.jsonl"] or data["rejected/round-1.jsonl"], backend
    assert _reference["fake"]["data/round-1.jsonl"], "the echoed spans hit their features"
    picked = reference(ws, tiny_parts, "pool")
    assert picked["data/round-1.pool.jsonl"] and picked["data/round-2.pool.jsonl"]


CASES = [("fake", "load:0"), ("fake", "coverage:1"), ("fake", "generate:1"),
         ("fake", "samples:2"), ("fake", "verify:1"), ("fake", "evaluate:1"),
         ("fake", "decide:1"), ("local", "samples:2"), ("pool", "select:1"), ("pool", "label:1"),
         ("pool", "train:2")]
"""Kill points: before any checkpoint, and where each kind of file is written (the coverage
and generation journal, mid-journal, the kept rows, the history, the stop decision), for
the fake LLM, in-process generation and the pool path (picks, labels, both). Each case is a
fresh process (about 10 s of imports on 2 cores), so the other nodes, which write nothing
of their own, are left out."""


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "kill"), CASES)
def test_kill_9_then_resume_elsewhere_is_exact(
    ws: Path, tiny_parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    backend: str, kill: str,
) -> None:
    want = reference(ws, tiny_parts, backend)
    start_killed(ws, tiny_parts, backend, kill)
    assert resume_elsewhere(ws, tiny_parts, backend, monkeypatch) == want
