"""`ray job submit` end to end, as README shows it: a real head node with its job server
(`ray start --head`, ray[default]) on loopback, `recaption run` submitted as a job with the
API key in the job's runtime_env (never in its entrypoint), the corpus verified, and the
cluster stopped, every process of it, whatever the test's outcome."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from openai_server import OpenAIServer

from recaption.samples import write_samples

BIN = Path(sys.executable).parent
KEY = "fake-ray-job-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> list[psutil.Process]:
    """Every process of the session `ray start` was started in: the cluster, found by
    session id (not by name: other Ray instances on this machine are not ours)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _connections(proc: psutil.Process) -> list:
    try:
        return proc.net_connections(kind="inet")
    except psutil.Error:  # it ended meanwhile
        return []


@pytest.fixture()
def ray_head(tmp_path):
    """A head node on 127.0.0.1 with the job server on a free port, token auth on (Ray's
    default where a token exists), its state in a short temp dir of its own (so no other
    `ray.init()` on this machine finds it); stopped with every process it started."""
    temp = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))  # socket paths must be short
    dashboard = free_port()
    # the key must come from the job's runtime_env alone
    gone = ("RAY_ADDRESS", "OPENAI_API_KEY", "OPENAI_BASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in gone}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `recaption` for the entrypoint
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's one-machine mode: every address it binds and dials is 127.0.0.1 (otherwise
        # it takes the address of the machine's network interface)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    argv = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    argv += [f"{flag}={port}" for flag, port in ports.items()]
    argv += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=2"]
    argv += [f"--temp-dir={temp}", "--disable-usage-stats"]
    log = tmp_path / "ray-start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():  # printed once the job server is up
            assert head.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{dashboard}", env, head.pid
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
        deadline = time.monotonic() + 15
        while (left := session_processes(head.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in left:  # stragglers (dashboard modules): by pid, ours only
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
    assert not session_processes(head.pid), "the Ray head left processes behind"


def test_recaption_run_as_a_ray_job(ray_head, tmp_path):
    address, env, sid = ray_head
    shards, corpus = tmp_path / "shards", tmp_path / "corpus"
    write_samples(shards, shards=2, per_shard=8, seed=3)
    runtime_env = json.dumps({"env_vars": {"OPENAI_API_KEY": KEY}})  # not in the entrypoint
    job = f"recaption-test-{secrets.token_hex(4)}"
    with OpenAIServer(api_key=KEY) as server:  # 401 for any other key: it must arrive
        entrypoint = [
            *("recaption", "run", "--pipeline", "openai"),
            *("--input", str(shards), "--output", str(corpus)),
            *("--set", f"captioner.base_url={server.url}", "--set", "ray.workers=1"),
        ]
        submit = [str(BIN / "ray"), "job", "submit", f"--address={address}"]
        submit += [f"--submission-id={job}", f"--runtime-env-json={runtime_env}", "--"]
        done = subprocess.run(
            submit + entrypoint, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        answered = len(server.events)
        talked = {  # every address the cluster's processes bind or dial
            conn.ip
            for proc in session_processes(sid)
            for c in _connections(proc)
            for conn in (c.laddr, c.raddr)
            if conn
        }
    assert talked and all(ip.startswith(("127.", "::ffff:127.")) for ip in talked), talked
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", f"--address={address}", job],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"Job '{job}' succeeded" in status.stdout, status.stdout + status.stderr
    # the job's log: the summary, plain progress lines (no bar in a log), no key
    assert "recaption: samples: 16 -> " in done.stdout, done.stdout[-3000:]
    assert "recaption: progress " in done.stdout and "\r" not in done.stdout
    assert KEY not in done.stdout + done.stderr and KEY not in " ".join(entrypoint)
    assert answered > 0  # the captions came from the server, with the key it expects
    verified = subprocess.run(
        [str(BIN / "recaption"), "verify", str(corpus), "--input", str(shards)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout
    inputs = sorted(p.stem for p in shards.glob("*.parquet"))
    assert sorted(p.stem for p in (corpus / "commits").glob("*.json")) == inputs
