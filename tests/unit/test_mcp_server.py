"""The MCP server over the toolbox: in-memory client round trips for every tool (a tiny
random model, an echo LLM), refused paths and arguments, and one real stdio subprocess."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from agent.mcp_server import build_server, is_loopback, parse_address
from agent.toolbox import Toolbox
from memory.feature_memory import InMemoryFeatureMemory
from tests.fakes import TOY_ANCHOR as ANCHOR
from tests.fakes import EchoLLM, QuotingLLM, bag_of_words, mean_residual, tiny_model, tiny_sae
from tools.coverage import JudgeSettings
from tools.errors import ConfigError
from tools.settings import Settings
from tools.workspace import Workspace


def write_jsonl(path: Path, rows: list[tuple[str, int]]) -> None:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    write_jsonl(root / "anchor.jsonl", ANCHOR)
    write_jsonl(root / "seed.jsonl", [r for r in ANCHOR if r[1] == 0] + ANCHOR[:1])
    return root


@pytest.fixture(scope="module")
def box(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Toolbox:
    parts = tmp_path_factory.mktemp("parts")
    lm = tiny_model()
    lm.model.save_pretrained(parts / "model")  # the detector resolves the model by folder
    lm.tokenizer.save_pretrained(parts / "model")
    center = mean_residual(lm, 2, [t for t, _ in ANCHOR])
    settings = Settings(
        home=parts / "home", model=str(parts / "model"), threshold="absolute", delta=0.0,
        judge=JudgeSettings(min_support=1, min_support_frac=0.0, min_log_odds=0.5),
    )
    ws = Workspace(settings)
    ws.__dict__["model"] = lm
    ws.__dict__["sae"] = tiny_sae(layer=2, d_sae=256, k=4, center=center)
    ws.__dict__["memory"] = InMemoryFeatureMemory(bag_of_words)
    return Toolbox(settings, root, workspace=ws, llm=EchoLLM())


def call(box: Toolbox, name: str, args: dict[str, Any], **server: Any) -> Any:
    """Call one tool through an in-memory MCP client; (result, progress updates)."""
    updates: list[tuple[float, float | None, str | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        updates.append((done, total, message))

    async def go() -> Any:
        async with Client(build_server(box, **server)) as client:
            return await client.call_tool(name, args, progress_callback=progress)

    return anyio.run(go), updates


def ok(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def finish(box: Toolbox, job: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Wait for a long tool's job through job_result calls: (its final info, progress)."""
    updates: list[Any] = []
    while True:
        result, got = call(box, "job_result", {"job_id": job["job_id"], "wait": 50})
        info = ok(result)
        updates += got
        if info["status"] != "running":
            return info, updates


def done(box: Toolbox, job: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """The result of a long tool's job that must succeed."""
    info, updates = finish(box, job)
    assert info["status"] == "done", info
    return info["result"], updates


def error_text(result: Any) -> str:
    assert result.is_error
    return " ".join(getattr(c, "text", "") for c in result.content)


def test_lists_every_tool_with_bounded_schemas(box: Toolbox) -> None:
    async def go() -> Any:
        async with Client(build_server(box)) as client:
            return await client.list_tools()

    tools = {t.name: t for t in anyio.run(go).tools}
    assert set(tools) == {"describe_dataset", "coverage", "missing_features", "search_features",
                          "explain_feature", "generate_and_verify", "improve", "report",
                          "job_status", "job_result", "cancel_job", "list_jobs",
                          "select_rows", "add_labels"}
    limit = tools["missing_features"].input_schema["properties"]["limit"]
    assert limit["minimum"] == 1 and limit["maximum"] == 200
    assert "ctx" not in tools["coverage"].input_schema["properties"]
    assert tools["coverage"].output_schema is not None
    assert tools["describe_dataset"].annotations.read_only_hint is True


def test_describe_dataset(box: Toolbox) -> None:
    result, _ = call(box, "describe_dataset", {"path": "anchor.jsonl", "examples": 2})
    got = ok(result)
    assert got["rows"] == 12 and got["positives"] == 6 and got["negatives"] == 6
    assert len(got["examples"]) == 2 and got["chars"]["max"] >= got["chars"]["min"] > 0


def test_coverage_missing_explain_search(box: Toolbox, root: Path) -> None:
    result, updates = call(box, "coverage", {"anchor": "anchor.jsonl", "data": "seed.jsonl"})
    cov = ok(result)
    assert 0 <= cov["fac"] < 1 and cov["n_missing"] == cov["n_task"] - cov["n_covered"] > 0
    assert cov["top_missing"][0]["spans"] and (root / cov["report_path"]).exists()
    dones = [u[0] for u in updates]
    assert dones == sorted(dones), "progress only grows"

    result, _ = call(box, "missing_features",
                     {"anchor": "anchor.jsonl", "data": "seed.jsonl", "limit": 2})
    miss = ok(result)
    assert miss["n_missing"] == cov["n_missing"] and len(miss["features"]) == min(2, miss[
        "n_missing"])
    first = miss["features"][0]["feature"]
    assert ok(call(box, "coverage", {"anchor": "anchor.jsonl", "data": "seed.jsonl"})[0])[
        "cached"], "the second coverage call reuses the cached report"

    # explained by an LLM whose summaries always parse: the feature is interpreted (or was
    # already) and so remembered, never described by the unstored top-span fallback
    explainer = Toolbox(box.settings, root, workspace=box.workspace, llm=QuotingLLM())
    result, _ = call(explainer, "explain_feature",
                     {"anchor": "anchor.jsonl", "data": "seed.jsonl", "feature": first})
    exp = ok(result)
    assert exp["feature"] == first and exp["summary"] and exp["spans"]
    assert exp["relevance"]["task_feature"] and exp["relevance"]["missing"]
    assert exp["source"] in ("interpreted", "memory")

    found = ok(call(box, "search_features", {"query": exp["summary"], "k": 50})[0])
    best = found["hits"][0]["similarity"]
    assert first in [h["feature"] for h in found["hits"] if h["similarity"] == best], (
        "the explained feature is among the closest hits (features with the same top span "
        "share its summary)")


def test_generate_and_verify_then_improve_and_report(box: Toolbox, root: Path) -> None:
    miss = ok(call(box, "missing_features",
                   {"anchor": "anchor.jsonl", "data": "seed.jsonl", "limit": 2})[0])
    features = [f["feature"] for f in miss["features"]]
    started, _ = call(box, "generate_and_verify", {
        "anchor": "anchor.jsonl", "data": "seed.jsonl", "features": features,
        "per_feature": 3, "out": "out/synth.jsonl"})
    job = ok(started)
    assert job["status"] == "running" and job["tool"] == "generate_and_verify"
    gen, updates = done(box, job)
    assert gen["generated"] == 3 * len(features) == gen["kept"] + gen["rejected"]
    kept = (root / "out" / "synth.jsonl").read_text().splitlines()
    assert len(kept) == gen["kept"]
    rejected = (root / "out" / "synth.rejected.jsonl").read_text().splitlines()
    assert len(rejected) == gen["rejected"] and all("reason" in json.loads(r) for r in rejected)
    assert all(u[0] <= (u[1] or u[0]) for u in updates)

    started, _ = call(box, "improve", {
        "anchor": "anchor.jsonl", "data": "seed.jsonl", "run_dir": "runs/r1", "rounds": 1,
        "top": 2, "per_feature": 2, "relevance": "label"})
    job = ok(started)
    assert job["run_dir"] == "runs/r1" and job["resumable"]
    imp, updates = done(box, job)
    assert [r["round"] for r in imp["rounds"]] == [0, 1] and imp["stop_reason"]
    assert (root / "runs" / "r1" / "data" / "round-1.jsonl").exists()
    status = ok(call(box, "job_status", {"job_id": job["job_id"]})[0])
    assert status["status"] == "done" and status["round"] == 1 and status["result"] is None
    listed = ok(call(box, "list_jobs", {})[0])["jobs"]
    assert job["job_id"] in [j["job_id"] for j in listed]

    rep = ok(call(box, "report", {"run_dir": "runs/r1"})[0])
    assert (root / rep["report_path"]).exists() and len(rep["rounds"]) == 2


@pytest.mark.parametrize("path", ["../anchor.jsonl", "/etc/passwd", "sub/../../x.jsonl"])
def test_paths_outside_the_root_are_refused(box: Toolbox, path: str) -> None:
    text = error_text(call(box, "describe_dataset", {"path": path})[0])
    assert "outside the workspace root" in text


def test_symlink_out_of_the_root_is_refused(box: Toolbox, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jsonl"
    write_jsonl(outside, ANCHOR)
    link = root / "link.jsonl"
    link.symlink_to(outside)
    try:
        text = error_text(call(box, "describe_dataset", {"path": "link.jsonl"})[0])
        assert "outside the workspace root" in text
        out = error_text(call(box, "generate_and_verify", {
            "anchor": "anchor.jsonl", "data": "seed.jsonl", "features": [1],
            "out": "link.jsonl"})[0])
        assert "outside the workspace root" in out
    finally:
        link.unlink()


def test_invalid_arguments_are_rejected_clearly(box: Toolbox) -> None:
    text = error_text(call(box, "missing_features",
                           {"anchor": "anchor.jsonl", "data": "seed.jsonl", "limit": 0})[0])
    assert "limit" in text and "greater than or equal to 1" in text
    text = error_text(call(box, "describe_dataset", {"path": "nope.jsonl"})[0])
    assert "no such file" in text
    failed, _ = finish(box, ok(call(box, "generate_and_verify", {
        "anchor": "anchor.jsonl", "data": "seed.jsonl", "features": [99999],
        "out": "unused.jsonl"})[0]))
    assert failed["status"] == "failed" and "not missing task features" in failed["error"]
    assert str(box.root) not in failed["error"], "errors name paths inside the root relatively"
    text = error_text(call(box, "job_status", {"job_id": "nosuchjob"})[0])
    assert "no job 'nosuchjob'" in text
    text = error_text(call(box, "generate_and_verify", {
        "anchor": "anchor.jsonl", "data": "seed.jsonl", "features": [1], "out": "x.csv"})[0])
    assert "the output must be a .jsonl file" in text
    text = error_text(call(box, "explain_feature", {
        "anchor": "anchor.jsonl", "data": "seed.jsonl", "feature": 10_000})[0])
    assert "this SAE has features 0..255" in text
    assert "internal error" not in text


def test_addresses() -> None:
    assert parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ConfigError):
        parse_address("localhost")
    assert is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_remote_http_needs_allow_remote(box: Toolbox) -> None:
    from agent.mcp_server import serve

    with pytest.raises(ConfigError, match="--allow-remote"):
        serve(box, http="0.0.0.0:8765")
    with pytest.raises(ConfigError, match="16 characters"):
        build_server(box, token="short", url="http://127.0.0.1:1")


def test_bearer_token_guards_http(box: Toolbox) -> None:
    from starlette.testclient import TestClient

    app = build_server(box, token="s3cret-token-0123456789",
                       url="http://127.0.0.1:8765").streamable_http_app()
    with TestClient(app, base_url="http://127.0.0.1:8765") as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "test", "version": "1"}}}
        accept = {"Accept": "application/json, text/event-stream"}
        assert http.post("/mcp", json=body, headers=accept).status_code == 401
        bad = {"Authorization": "Bearer wrong-token-0123456789", **accept}
        assert http.post("/mcp", json=body, headers=bad).status_code == 401
        good = {"Authorization": "Bearer s3cret-token-0123456789", **accept}
        assert http.post("/mcp", json=body, headers=good).status_code == 200


def test_stdio_subprocess_round_trip(root: Path) -> None:
    script = Path(sys.executable).parent / "facsynth"
    command, args = ((str(script), []) if script.exists() else
                     (sys.executable, ["-c", "from agent.cli import app; app()"]))
    repo = Path(__file__).resolve().parents[2]
    params = StdioServerParameters(
        command=command, args=[*args, "serve", "--root", str(root)], cwd=str(repo),
        env={"PYTHONPATH": str(repo), "FACSYNTH_HOME": str(root / ".home"),
             "HOME": os.environ.get("HOME", str(root))},
    )

    async def go() -> tuple[Any, Any]:
        with anyio.fail_after(90):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
                await s.initialize()
                tools = await s.list_tools()
                return tools, await s.call_tool("describe_dataset", {"path": "seed.jsonl"})

    tools, result = anyio.run(go)
    assert "describe_dataset" in {t.name for t in tools.tools}
    assert not result.is_error and result.structured_content["rows"] == 7


def test_select_rows_then_add_labels_round_trip(box: Toolbox, root: Path) -> None:
    """The pool path over MCP: select_rows pauses for labels (a job whose result names the
    to-label file), add_labels records a list of answers and continues it, rest_skip lets a
    round go on without the rest; nothing already labelled is asked again."""
    pool = [(f"how do i hurt the {w} and get away" if i % 2 else f"a recipe with {w}", i % 2)
            for i, w in enumerate(["cat", "dog", "bread", "soup", "fox", "owl", "tea", "rice"])]
    write_jsonl(root / "pool.jsonl", pool)
    started = ok(call(box, "select_rows", {
        "anchor": "anchor.jsonl", "data": "seed.jsonl", "pool": "pool.jsonl",
        "run_dir": "runs/pool", "batch": 2, "label_budget": 4, "rounds": 3})[0])
    assert started["tool"] == "select_rows" and started["status"] == "running"
    first, _ = done(box, started)
    assert first["waiting_for_labels"] == "runs/pool/to-label/round-1.csv"
    rows = [json.loads(x)["row"] for x in (root / "runs/pool/to-label/round-1.jsonl")
            .read_text().splitlines()]
    assert len(rows) == 2
    # one answer now: the round still waits for the other row, no job is started
    half = ok(call(box, "add_labels", {"run_dir": "runs/pool",
                                       "labels": [{"row": rows[0], "label": 1}]})[0])
    assert half["added"]["labelled"] == 1 and half["added"]["waiting"] == 1
    assert half["job"] is None and "still wait" in half["next"]
    text = error_text(call(box, "add_labels", {"run_dir": "runs/pool",
                                               "labels": [{"row": rows[0], "label": 0}]})[0])
    assert f"row {rows[0]} is not waiting" in text, "a labelled row is not asked again"
    rest = ok(call(box, "add_labels", {"run_dir": "runs/pool",
                                       "labels": [{"row": rows[1], "label": None}]})[0])
    assert rest["added"]["skipped"] == 1 and rest["job"]["tool"] == "add_labels"
    second, _ = done(box, rest["job"])
    assert second["waiting_for_labels"] == "runs/pool/to-label/round-2.csv"
    again = [json.loads(x)["row"] for x in (root / "runs/pool/to-label/round-2.jsonl")
             .read_text().splitlines()]
    assert not set(again) & set(rows)
    last = ok(call(box, "add_labels", {"run_dir": "runs/pool", "rest_skip": True})[0])
    final, _ = done(box, last["job"])
    assert final["waiting_for_labels"] is None and "label budget" in final["stop_reason"]
    assert [r["round"] for r in final["rounds"]] == [0, 1, 2]
