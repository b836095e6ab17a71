"""Long tools as jobs: the call starts the work and returns a job id at once.

MCP clients commonly give a tool call 60 s; `improve`, `generate_and_verify` and
`select_rows` take minutes. So those tools start a job and answer with its `JobInfo`;
`job_status`, `job_result` (which may wait, sending progress notifications meanwhile) and
`cancel_job` complete it (agent/toolbox_runs.py).

Every job is a record in the workspace's state folder, `ROOT/.facsynth/jobs/<id>.json`,
rewritten atomically as it progresses (at most once a second, and at every status change),
so any process on the same root can answer for it. Where the work runs:

- `process` (`facsynth serve`): a detached worker process (`facsynth job-worker`, its own
  session, so it is not in the server's process group). An MCP client that disconnects over
  stdio terminates the server's whole process group; the job goes on, and the server the
  client starts next reads its record. Its log is `jobs/<id>.log`.
- `thread` (the chat, tests with injected parts): a thread of this process; the process
  waits for its jobs before it exits (`wait_all`).

A record whose process is gone while it still says `running` is `interrupted` (the worker
was killed). An improve job is resumable from its run folder (the LangGraph checkpoint):
`improve(run_dir=..., resume=true)` starts a new job that continues it. `cancel_job` leaves
a `<id>.cancel` file that the job checks at its next progress point (a node of the improve
graph, a generated sample); a cancelled improve run resumes the same way.

One process per job (or one thread) and the toolbox's lock around model work: nothing here
schedules or queues work.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from tools.data import write_text_atomic
from tools.errors import FacsynthError, UsageError

log = logging.getLogger(__name__)

JobStatus = Literal["running", "done", "failed", "cancelled", "interrupted"]
Runner = Literal["thread", "process"]
ProgressFn = Callable[[str, float, float | None], None]
Work = Callable[[ProgressFn], BaseModel]
"""A job's work: given a progress callback, the tool's result."""
WorkFor = Callable[[str, dict[str, Any]], Work]
"""(tool, arguments) -> its work: how a worker process rebuilds what the server started."""

MAX_RUNNING = 4
"""Jobs running at once per root: more would only wait for the model."""
WRITE_EVERY_S = 1.0


class JobCancelled(Exception):
    """Raised inside a job's work at a progress point after `cancel_job`."""


class JobInfo(BaseModel):
    """A job as the tools report it."""

    job_id: str
    tool: str
    status: JobStatus
    run_dir: str | None = Field(None, description="the run folder, root-relative (improve)")
    round: int | None = Field(None, description="improve: the round in progress (0: the "
                              "starting data), or the last round when it has ended")
    done: float = Field(0.0, description="progress so far, in the tool's own steps")
    total: float | None = Field(None, description="steps in all, when known")
    last: str = Field("", description="the last progress line")
    started: float = Field(description="unix time the job started")
    finished: float | None = None
    error: str | None = None
    resumable: bool = Field(False, description="an improve run that can continue from its "
                            "run folder")
    next: str = Field("", description="what to call next")
    result: dict[str, Any] | None = Field(None, description="job_result: the tool's result "
                                          "once done")


class JobList(BaseModel):
    jobs: list[JobInfo]


class JobRecord(JobInfo):
    """What is stored: the info plus the process running it and the call."""

    pid: int
    arguments: dict[str, Any] = Field(default_factory=dict)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that id: alive
        return True
    return True


class Jobs:
    """The jobs of one workspace root (see the module doc). `folder()` is where records
    live; `work(tool, args)` builds a job's work; `worker` is the command that runs a job in
    its own process (the job id is appended), None for threads; `rounds(run_dir)` says which
    round an improve run is in; `relative(text)` makes error texts root-relative."""

    def __init__(self, folder: Callable[[], Path], work: WorkFor, *,
                 worker: list[str] | None = None,
                 rounds: Callable[[str], int | None] = lambda run: None,
                 relative: Callable[[str], str] = lambda text: text) -> None:
        self._folder = folder
        self._work = work
        self.worker = worker
        self._rounds = rounds
        self._relative = relative
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._written: dict[str, float] = {}

    @property
    def runner(self) -> Runner:
        return "thread" if self.worker is None else "process"

    # -- records ---------------------------------------------------------------------------
    def _path(self, job_id: str, suffix: str = ".json") -> Path:
        if not job_id.isalnum() or len(job_id) > 64:
            raise UsageError(f"job_id {job_id!r}: not a job id (ids are letters and digits, "
                             "as start-of-job results give them)")
        return self._folder() / f"{job_id}{suffix}"

    def _read(self, job_id: str) -> JobRecord:
        path = self._path(job_id)
        if not path.is_file():
            raise UsageError(f"no job {job_id!r} in this workspace (list_jobs shows them)")
        try:
            return JobRecord.model_validate_json(path.read_bytes())
        except ValidationError as e:
            raise UsageError(f"job {job_id}: its record is unreadable ({e.error_count()} "
                             "problems); start the tool again") from None

    def _write(self, rec: JobRecord, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._written.get(rec.job_id, 0.0) < WRITE_EVERY_S:
            return
        self._written[rec.job_id] = now
        write_text_atomic(self._path(rec.job_id), rec.model_dump_json(indent=1))

    def _running_here(self, job_id: str) -> bool:
        thread = self._threads.get(job_id)
        if thread is not None and thread.is_alive():
            return True
        child = self._children.get(job_id)
        return child is not None and child.poll() is None  # poll() also reaps it

    def _view(self, rec: JobRecord, with_result: bool = False) -> JobInfo:
        """The record as reported: an orphaned `running` one becomes `interrupted` (and is
        stored so), the round is read from the run folder."""
        if rec.status == "running" and not self._running_here(rec.job_id):
            child = self._children.get(rec.job_id)
            gone = child is not None or not _alive(rec.pid)
            fresh = self._read(rec.job_id)  # the worker may have just finished
            if fresh.status != "running":
                rec = fresh
            elif gone:
                rec.status, rec.finished = "interrupted", rec.finished or time.time()
                rec.error = "the process running it ended before the job did"
                rec.next = self._resume_hint(rec)
                self._write(rec)
        info = JobInfo.model_validate(rec.model_dump(exclude={"pid", "arguments"}))
        if rec.run_dir is not None:
            info.round = self._rounds(rec.run_dir)
        if not with_result:
            info.result = None
        return info

    def _resume_hint(self, rec: JobRecord) -> str:
        if rec.resumable and rec.run_dir is not None:
            return (f"improve(run_dir={rec.run_dir!r}, resume=true) continues the run where "
                    "it stopped")
        return f"run {rec.tool} again (it cannot continue a stopped job)"

    # -- starting and running --------------------------------------------------------------
    def start(self, tool: str, arguments: dict[str, Any], *, run_dir: str | None = None,
              resumable: bool = False) -> JobInfo:
        """Start `tool`'s work on `arguments` (in a worker process or a thread); its record
        says `running` until it ends."""
        with self._lock:
            live = [j for j in self.list() if j.status == "running"]
            if len(live) >= MAX_RUNNING:
                raise UsageError(f"{len(live)} jobs are running in this workspace; wait for "
                                 "one (job_result) or cancel one (cancel_job)")
            busy = [j for j in live if run_dir is not None and j.run_dir == run_dir]
            if busy:
                raise UsageError(f"{run_dir} is in use by job {busy[0].job_id}; wait for it "
                                 "or cancel it first")
            job_id = uuid.uuid4().hex[:12]
            rec = JobRecord(job_id=job_id, tool=tool, status="running", run_dir=run_dir,
                            started=time.time(), pid=os.getpid(), arguments=arguments,
                            resumable=resumable, last="started",
                            next=f"job_status(job_id={job_id!r}) or job_result(job_id="
                                 f"{job_id!r}, wait=50)")
            self._write(rec)
            if self.worker is None:
                thread = threading.Thread(target=self.execute, args=(job_id,),
                                          name=f"facsynth-job-{job_id}", daemon=True)
                self._threads[job_id] = thread
                thread.start()
            else:
                with self._path(job_id, ".log").open("ab") as logfile:
                    child = subprocess.Popen(  # noqa: S603 (our own command)
                        [*self.worker, job_id], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=logfile, start_new_session=True)
                self._children[job_id] = child
                rec.pid = child.pid
                self._write(rec)
        return self._view(rec)

    def execute(self, job_id: str) -> JobRecord:
        """Run the job `job_id` here, to its end (a worker process or a job thread)."""
        rec = self._read(job_id)
        rec.pid = os.getpid()
        self._write(rec)
        cancel_file = self._path(job_id, ".cancel")

        def progress(message: str, done: float, total: float | None) -> None:
            if cancel_file.exists():
                raise JobCancelled(job_id)
            step = done != rec.done  # a new step is written at once, ticks within one not
            rec.last, rec.done, rec.total = message, done, total
            self._write(rec, force=step)

        try:
            result = self._work(rec.tool, rec.arguments)(progress)
        except JobCancelled:
            rec.status, rec.last = "cancelled", "cancelled"
            rec.next = self._resume_hint(rec)
        except FacsynthError as e:
            rec.status, rec.error = "failed", self._relative(str(e))
            rec.next = f"fix what the error says and run {rec.tool} again"
        except Exception as e:
            log.exception("internal error in job %s (%s)", job_id, rec.tool)
            rec.status = "failed"
            rec.error = (f"internal error in {rec.tool}: {type(e).__name__}: "
                         f"{self._relative(str(e))}; this is a facsynth bug, see the log")
            rec.next = "report the bug; the log has the traceback"
        else:
            rec.status, rec.last = "done", "done"
            rec.result = result.model_dump(mode="json")
            rec.resumable = False
            rec.next = f"job_result(job_id={job_id!r}) gives the result"
        rec.finished = time.time()
        self._write(rec)
        cancel_file.unlink(missing_ok=True)
        return rec

    # -- the tools' side -------------------------------------------------------------------
    def status(self, job_id: str) -> JobInfo:
        return self._view(self._read(job_id))

    def result(self, job_id: str, wait: float = 0.0,
               progress: ProgressFn | None = None) -> JobInfo:
        """The job, with its result once done; waits up to `wait` seconds for it to end,
        passing its progress on meanwhile."""
        deadline = time.monotonic() + wait
        last_done = -1.0
        while True:
            info = self._view(self._read(job_id), with_result=True)
            if info.status != "running" or time.monotonic() >= deadline:
                return info
            if progress is not None and info.done > last_done:
                last_done = info.done
                progress(info.last, info.done, info.total)
            step = min(0.5, max(0.0, deadline - time.monotonic()))
            thread = self._threads.get(job_id)
            if thread is not None:
                thread.join(step)
            else:
                time.sleep(step)

    def cancel(self, job_id: str) -> JobInfo:
        info = self._view(self._read(job_id))
        if info.status != "running":
            return info
        write_text_atomic(self._path(job_id, ".cancel"), "cancel\n")
        info.last = "cancelling: it stops at its next step"
        info.next = f"job_status(job_id={job_id!r}) shows when it has stopped"
        return info

    def list(self) -> list[JobInfo]:
        """Every job of the root, newest first."""
        out = []
        for path in self._folder().glob("*.json"):
            try:
                out.append(self._view(self._read(path.stem)))
            except UsageError:
                continue
        return sorted(out, key=lambda j: -j.started)

    def wait_all(self, timeout: float | None = None) -> int:
        """Wait for this process's job threads to end (before it exits); how many were
        still running. Worker processes are detached and need no waiting."""
        live = [t for t in self._threads.values() if t.is_alive()]
        if live:
            log.warning("%d job(s) still running: waiting for them before exiting "
                        "(cancel_job stops one)", len(live))
        end = None if timeout is None else time.monotonic() + timeout
        for t in live:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return len(live)
