"""Long tools as jobs over a real stdio MCP client: start a job, disconnect, reconnect to a new
server process and poll it to its result; cancel a job mid-round and resume it to the same
data as an uninterrupted run; a record left `running` by a dead server reads interrupted."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.fakes import TOY_ANCHOR, final_data, tiny_model

REPO = Path(__file__).resolve().parents[2]
IMPROVE = {"anchor": "anchor.jsonl", "data": "seed.jsonl", "rounds": 2, "top": 2,
           "per_feature": 3, "relevance": "label"}


pytestmark = pytest.mark.slow  # real stdio servers and clients, minutes


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parts = tmp_path_factory.mktemp("parts")
    lm = tiny_model()
    lm.model.save_pretrained(parts / "model")
    lm.tokenizer.save_pretrained(parts / "model")
    return parts


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    for name, rows in (("anchor", TOY_ANCHOR), ("seed", [r for r in TOY_ANCHOR if r[1] == 0]
                                                + TOY_ANCHOR[:1])):
        (root / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return root


def params(root: Path, parts: Path, delay: float = 0.3) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "tests.robustness.mcp_job_server", "serve", str(root), str(parts),
              str(delay)],
        cwd=str(REPO), env={"PYTHONPATH": str(REPO), "HOME": os.environ.get("HOME", "/tmp"),
                            "FACSYNTH_HOME": str(parts / "home")})


def session(root: Path, parts: Path, calls: Any, delay: float = 0.3) -> Any:
    """Connect, run `calls(call)` with `call(name, args) -> structured result`, disconnect."""

    async def go() -> Any:
        with anyio.fail_after(240):
            async with stdio_client(params(root, parts, delay)) as (read, write), \
                    ClientSession(read, write) as s:
                await s.initialize()

                async def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
                    got = await s.call_tool(name, args)
                    assert not got.is_error, got.content
                    return got.structured_content

                return await calls(call)

    return anyio.run(go)


async def finish(call: Any, job_id: str) -> dict[str, Any]:
    while (info := await call("job_result", {"job_id": job_id, "wait": 20}))["status"] == \
            "running":
        pass
    return info


def test_jobs_outlive_their_client_and_a_cancelled_one_resumes(root: Path,
                                                               parts: Path) -> None:
    """Job a is started and its client disconnects at once: a new server polls it to its
    result. Job b (the same run) is cancelled mid-round 1, then resumed by improve(resume=
    true): its data equals a's, which ran uninterrupted."""

    async def start(call: Any) -> dict[str, Any]:
        return await call("improve", {**IMPROVE, "run_dir": "runs/a"})

    job = session(root, parts, start)  # disconnects at once
    assert job["status"] == "running" and job["run_dir"] == "runs/a"

    async def poll_then_cancel(call: Any) -> tuple[dict[str, Any], ...]:
        info = await finish(call, job["job_id"])
        b = await call("improve", {**IMPROVE, "run_dir": "runs/b"})
        while True:  # wait until round 1 is generating, then cancel
            status = await call("job_status", {"job_id": b["job_id"]})
            if status["last"] == "round 1: generate":
                break
            assert status["status"] == "running", status
            await anyio.sleep(0.2)
        said = await call("cancel_job", {"job_id": b["job_id"]})
        while (status := await call("job_status", {"job_id": b["job_id"]})
               )["status"] == "running":
            await anyio.sleep(0.2)
        return info, said, status

    info, said, status = session(root, parts, poll_then_cancel, delay=2.0)
    assert info["status"] == "done", info
    rounds = [r["round"] for r in info["result"]["rounds"]]
    assert rounds[:2] == [0, 1] and info["result"]["stop_reason"]
    assert (root / "runs" / "a" / "data" / "round-1.jsonl").exists()
    assert "cancelling" in said["last"]
    assert status["status"] == "cancelled" and status["resumable"], status
    assert "resume=true" in status["next"]
    assert not (root / "runs" / "b" / "data" / "round-1.jsonl").exists()

    async def resume(call: Any) -> dict[str, Any]:
        b = await call("improve", {**IMPROVE, "run_dir": "runs/b", "resume": True})
        return await finish(call, b["job_id"])

    done = session(root, parts, resume, delay=0.0)
    assert done["status"] == "done", done
    assert final_data(root / "runs" / "b") == final_data(root / "runs" / "a")


def test_a_job_whose_server_died_is_interrupted_and_resumable(root: Path, parts: Path) -> None:
    jobs = root / ".facsynth" / "jobs"
    jobs.mkdir(parents=True)
    dead = {"job_id": "abc123", "tool": "improve", "status": "running", "run_dir": "runs/x",
            "started": time.time(), "pid": 2**22 + 12345, "resumable": True}
    (jobs / "abc123.json").write_text(json.dumps(dead))

    async def look(call: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return (await call("job_status", {"job_id": "abc123"}),
                await call("list_jobs", {}))

    status, listed = session(root, parts, look)
    assert status["status"] == "interrupted" and status["resumable"]
    assert "improve(run_dir='runs/x', resume=true)" in status["next"]
    assert [j["job_id"] for j in listed["jobs"]] == ["abc123"]
