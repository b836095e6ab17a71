"""`facsynth serve --http` checks Host and Origin (DNS-rebinding protection) on every loopback
address, not only the ones the SDK protects by itself (127.0.0.1, localhost, ::1), and the
tools refuse arguments they do not know. Real server subprocesses on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from agent.mcp_server import build_server, transport_security
from agent.toolbox import Toolbox

TOKEN = "robustness-token-0123456789"
INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "test", "version": "1"}},
}
REPO = Path(__file__).resolve().parents[2]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            pytest.skip(f"cannot bind {host}: {e}")
        return int(s.getsockname()[1])


def start(root: Path, host: str, port: int, token: str | None) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).parent / "facsynth"
    command = ([str(script)] if script.exists() else
               [sys.executable, "-c", "from agent.cli import app; app()"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "FACSYNTH_HOME": str(root / ".home")}
    env.pop("FACSYNTH_MCP_TOKEN", None)
    if token:
        env["FACSYNTH_MCP_TOKEN"] = token
    proc = subprocess.Popen([*command, "serve", "--root", str(root), "--http", f"{host}:{port}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"the server exited ({proc.returncode}): {err[-2000:]}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    pytest.fail(f"the server did not listen on {host}:{port} within 45 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stderr:
        proc.stderr.close()


@pytest.fixture(scope="module", params=[("127.0.0.1", None), ("127.0.0.2", TOKEN)],
                ids=["127.0.0.1", "127.0.0.2-token"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, int, str | None]]:
    host, token = request.param
    port = free_port(host)
    proc = start(tmp_path_factory.mktemp("root"), host, port, token)
    try:
        yield host, port, token
    finally:
        stop(proc)


def post(server: tuple[str, int, str | None], **headers: str) -> httpx.Response:
    host, port, token = server
    sent = {"Accept": "application/json, text/event-stream", **headers}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    with httpx.Client(timeout=10) as client:
        return client.post(f"http://{host}:{port}/mcp", json=INITIALIZE, headers=sent)


def test_foreign_host_is_refused(server: tuple[str, int, str | None]) -> None:
    _, port, _ = server
    got = post(server, Host=f"evil.example:{port}", Origin=f"http://evil.example:{port}")
    assert got.status_code == 421 and got.text == "Invalid Host header"


def test_foreign_origin_is_refused(server: tuple[str, int, str | None]) -> None:
    host, port, _ = server
    got = post(server, Host=f"{host}:{port}", Origin=f"http://evil.example:{port}")
    assert got.status_code == 403 and got.text == "Invalid Origin header"


@pytest.mark.parametrize("name", ["served", "localhost"])
def test_own_host_and_origin_are_served(server: tuple[str, int, str | None], name: str) -> None:
    host, port, _ = server
    shown = f"{host if name == 'served' else name}:{port}"
    assert post(server, Host=shown).status_code == 200
    assert post(server, Host=shown, Origin=f"http://{shown}").status_code == 200


def test_token_still_checked_first(server: tuple[str, int, str | None]) -> None:
    host, port, token = server
    if not token:
        pytest.skip("this server runs without a token")
    with httpx.Client(timeout=10) as client:
        got = client.post(f"http://{host}:{port}/mcp", json=INITIALIZE,
                          headers={"Accept": "application/json, text/event-stream",
                                   "Host": f"{host}:{port}"})
    assert got.status_code == 401


def test_allowed_hosts() -> None:
    sec = transport_security("127.0.0.2", 18772)
    assert sec.enable_dns_rebinding_protection
    assert set(sec.allowed_hosts) == {"127.0.0.2:18772", "127.0.0.1:18772", "localhost:18772",
                                      "[::1]:18772"}
    assert "http://127.0.0.2:18772" in sec.allowed_origins
    remote = transport_security("192.168.1.4", 8765)  # --allow-remote: only the given host
    assert remote.allowed_hosts == ["192.168.1.4:8765"]
    assert remote.allowed_origins == ["http://192.168.1.4:8765"]
    assert "[::1]:8765" in transport_security("::1", 8765).allowed_hosts
    assert "http://[fd00::4]:8765" in transport_security("fd00::4", 8765).allowed_origins


def test_unknown_arguments_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "seed.jsonl").write_text('{"text": "hello", "label": 0}\n')
    box = Toolbox(root=tmp_path, workspace=object())  # type: ignore[arg-type]

    async def go() -> tuple[Any, Any, Any]:
        async with Client(build_server(box)) as client:
            tools = await client.list_tools()
            bad = await client.call_tool("describe_dataset",
                                         {"path": "seed.jsonl", "exampels": 2, "zz": 1})
            good = await client.call_tool("describe_dataset", {"path": "seed.jsonl"})
            return tools, bad, good

    tools, bad, good = anyio.run(go)
    assert all(t.input_schema.get("additionalProperties") is False for t in tools.tools)
    assert bad.is_error
    text = " ".join(getattr(c, "text", "") for c in bad.content)
    assert "unknown arguments exampels, zz" in text and "takes path, examples" in text
    assert not good.is_error and good.structured_content["rows"] == 1
