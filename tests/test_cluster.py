"""A real multi-node Ray: a worker node dies mid-run, its shards resume elsewhere."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from openai_server import OpenAIServer, repeated_successes
from test_resume import KEY, assert_complete, overrides


def test_a_dead_worker_node_costs_no_row(shards, tmp_path):
    corpus = tmp_path / "corpus"
    env = os.environ | {"OPENAI_API_KEY": KEY}
    with OpenAIServer(latency_ms=150, api_key=KEY) as server:
        argv = [sys.executable, str(Path(__file__).with_name("multinode_run.py"))]
        argv += ["pipelines/openai.yaml"]
        argv += overrides(server, shards, corpus, "ray.workers=2")
        # its own session: if it hangs, its whole cluster goes with it, not only the driver
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"the run hung; its log ends:\n{stderr[-6000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        events = list(server.events)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["node_killed"] and not result["failed"]
    assert len(result["finished"]) == 3
    assert_complete(corpus, shards)
    # only what was in flight on the dead node was asked again
    assert repeated_successes(events) <= 2 * 4
