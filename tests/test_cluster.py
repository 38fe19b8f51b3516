"""A real multi-node Ray: a worker node dies mid-run, its shards resume elsewhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

from openai_server import OpenAIServer, repeated_successes
from test_resume import KEY, assert_complete, overrides


def test_a_dead_worker_node_costs_no_row(shards, tmp_path):
    corpus = tmp_path / "corpus"
    env = os.environ | {"OPENAI_API_KEY": KEY}
    with OpenAIServer(latency_ms=150, api_key=KEY) as server:
        argv = [sys.executable, str(Path(__file__).with_name("multinode_run.py"))]
        argv += ["pipelines/openai.yaml"]
        argv += overrides(server, shards, corpus, "ray.workers=2")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        events = list(server.events)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["node_killed"] and not result["failed"]
    assert len(result["finished"]) == 3
    assert_complete(corpus, shards)
    # only what was in flight on the dead node was asked again
    assert repeated_successes(events) <= 2 * 4
