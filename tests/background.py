"""Subprocess jobs that run while the in-process tests run, one at a time, on the core those leave idle.

A few tests need their own Python process: eight simulated CPU devices (``XLA_FLAGS`` must be set
before JAX is imported), the bench's ``--quick`` smoke run, and one real ``python train.py`` /
``python fuse.py`` each. Such a process spends its time importing JAX and compiling, on about one
core, and so does the test process (JAX compiles are mostly single-threaded): run one after the
other on 2 cores they took about 90 s of the suite with the second core mostly idle. So each is a
:class:`Job`, registered when its test module is imported::

    EIGHT = background.register("eight_devices", _commands, fixture="eight_device_report", timeout=300)

``conftest.pytest_collection_finish`` queues every job that a selected test uses (through the named
fixture), in the order of the tests, and one worker thread runs them one after another; the fixture
calls ``EIGHT.result()``, which waits for the job, or runs it at once if the queue has not reached it
yet. A job that no selected test uses never runs; under pytest-xdist every job runs at its first
``result()``. Each job gets a fresh temporary folder, removed when the session ends.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Command", "Outcome", "Job", "JOBS", "register", "queue_used", "cleanup"]


@dataclasses.dataclass(frozen=True)
class Command:
    """One process of a job: its command line (after ``python``), working directory and environment."""

    args: Sequence[str]
    cwd: str | os.PathLike | None = None
    env: dict[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a job left: its folder and one ``CompletedProcess`` per command, in order."""

    folder: Path
    procs: list[subprocess.CompletedProcess]


class Job:
    """Commands run one after another (a later one may read what an earlier one wrote).

    Args:
      name: for the folder name and messages.
      make: ``make(folder) -> [Command, ...]``; may prepare files in ``folder`` first.
      fixture: the fixture through which tests use the job (a selected test using it queues the job).
      timeout: seconds per command.
    """

    def __init__(self, name: str, make: Callable[[Path], list[Command]], fixture: str, timeout: float):
        self.name, self.make, self.fixture, self.timeout = name, make, fixture, timeout
        self.folder: Path | None = None
        self._lock = threading.Lock()
        self._claimed = False
        self._cancelled = False
        self._done = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._outcome: Outcome | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        """Runs the job here and now, unless another thread has started it (then returns at once)."""
        with self._lock:
            if self._claimed:
                return
            self._claimed = True
        try:
            if self._cancelled:
                raise RuntimeError("cancelled: the session ended first")
            self.folder = Path(tempfile.mkdtemp(prefix=f"otfusion-test-{self.name}-"))
            procs = []
            for cmd in self.make(self.folder):
                args = [sys.executable, *cmd.args]
                with self._lock:
                    if self._cancelled:
                        raise RuntimeError("cancelled: the session ended first")
                    self._proc = subprocess.Popen(
                        args, cwd=cmd.cwd, env=cmd.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    )
                try:
                    out, err = self._proc.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.communicate()
                    raise
                procs.append(subprocess.CompletedProcess(args, self._proc.returncode, out, err))
            self._outcome = Outcome(self.folder, procs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test that waits for the job
            self._error = e
        finally:
            self._done.set()

    def result(self) -> Outcome:
        """The job's outcome: waits for it, or runs it now if nothing has started it; re-raises its error."""
        self.run()
        self._done.wait()
        if self._error is not None:
            raise RuntimeError(f"background job {self.name!r} failed: {self._error!r}") from self._error
        return self._outcome

    def cancel(self) -> None:
        """Kills the job's process if it is still running (no test waited for it) and stops what is left."""
        with self._lock:
            self._cancelled = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


JOBS: dict[str, Job] = {}
_WORKER: list[threading.Thread] = []


def register(name: str, make: Callable[[Path], list[Command]], *, fixture: str, timeout: float = 300) -> Job:
    """Registers a job (once per name: a module imported twice gets the same job)."""
    if name not in JOBS:
        JOBS[name] = Job(name, make, fixture, timeout)
    return JOBS[name]


def queue_used(items: Sequence[object]) -> list[str]:
    """Starts one thread that runs, one after another, the jobs the (selected) test items use, in their order.

    Returns the names of the queued jobs.
    """
    by_fixture = {job.fixture: job for job in JOBS.values()}
    queued: list[Job] = []
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            job = by_fixture.get(name)
            if job is not None and job not in queued:
                queued.append(job)
    if queued:
        worker = threading.Thread(target=lambda: [job.run() for job in queued], name="background-jobs", daemon=True)
        worker.start()
        _WORKER.append(worker)
    return [job.name for job in queued]


def cleanup() -> None:
    """Cancels what still runs (a session cut short), waits for the worker, removes every job's folder."""
    for job in JOBS.values():
        job.cancel()
    for worker in _WORKER:
        worker.join()
    for job in JOBS.values():
        if job.folder is not None:
            shutil.rmtree(job.folder, ignore_errors=True)
