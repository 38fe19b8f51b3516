"""`kill -9` a `recaption run` at a chosen moment: shared by tests/test_resume.py and bench/."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from openai_server import OpenAIServer


def run_argv(pipeline: str | Path, overrides: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "recaption.cli", "run", "--quiet", "--pipeline", str(pipeline)]
    for item in overrides:
        argv += ["--set", item]
    return argv


def run_here(argv: list[str]) -> int:
    """The command of `argv` in this process, on the test session's Ray: the resume after a
    kill runs the same code and finds the same corpus, without a Ray to start and stop
    (4-5 s of a run this size)."""
    from recaption.cli import main

    return main(argv[3:])  # past [python, -m, recaption.cli]


def kill_when(argv: list[str], ready: Callable[[], bool], timeout_s: float = 120) -> bool:
    """Start the run; SIGKILL its process once `ready()` holds (polled every 20 ms). False if
    the run finished first."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    # the run's local Ray (raylet, GCS, workers, agents): the driver's descendants
    family: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        family = psutil.Process(proc.pid).children(recursive=True)
    if killed:
        proc.send_signal(signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
    proc.wait()
    # Ray's raylet and workers die with their parent (they fate-share), within a second ...
    psutil.wait_procs(family, timeout=1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in family if killed else []:  # ... but not always at once: a worker that
        with contextlib.suppress(psutil.Error):  # outlives it must not answer into the next run
            child.kill()
    return killed


def kill_after(argv: list[str], server: OpenAIServer, requests: int) -> bool:
    """Start the run; SIGKILL its process once the server has seen `requests` more requests.
    False if the run finished first."""
    target = len(server.events) + requests
    return kill_when(argv, lambda: len(server.events) >= target)
