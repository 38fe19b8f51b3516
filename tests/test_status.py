"""`recaption status`: a real run watched while it runs, after a `kill -9`, and once a second
run has finished it; a corpus in object storage (moto's S3 server on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kill_run import run_argv, run_here
from openai_server import OpenAIServer
from test_batch import batch_config
from test_object_storage import s3  # noqa: F401 - the module's S3 server fixture
from test_openai import KEY as BATCH_KEY
from test_resume import KEY, overrides

from recaption.config import load_config
from recaption.pipeline import run
from recaption.samples import write_samples
from recaption.status import corpus_status, lines

RECAPTION = str(Path(sys.executable).parent / "recaption")


def status_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RECAPTION, "status", *args], capture_output=True, text=True, timeout=60)


def wait_for(what, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_status_of_a_run_running_killed_and_finished(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    shards, corpus = tmp_path / "shards", tmp_path / "corpus"
    write_samples(shards, shards=3, per_shard=16, seed=5)
    # ~10 images/s: a shard takes seconds, time to look while one is committed and the next
    # is half answered; the runs join the session's Ray (the kill leaves it to clean up)
    with OpenAIServer(latency_ms=200, api_key=KEY) as server:
        extra = ("ray.workers=1", "limits.concurrency=2", f"ray.address={ray_cluster}")
        argv = run_argv("openai", overrides(server, shards, corpus, *extra))
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:

            def one_committed_one_journaled() -> bool:
                assert proc.poll() is None, "the run ended before it could be watched"
                done = {p.stem for p in (corpus / "commits").glob("*.json")}
                journals = (corpus / ".journal").glob("*.jsonl")
                return bool(done) and any(p.stem not in done and p.stat().st_size for p in journals)

            wait_for(one_committed_one_journaled)
            live = corpus_status(corpus)
            assert (
                live["state"] == "running"
                and live["lock"] == f"pid {proc.pid} on {socket.gethostname()}"
            )
            assert live["shards"]["input"] == 3 and live["shards"]["committed"] >= 1
            assert live["shards"]["in_progress"] >= 1 and live["rows"]["in_progress"] > 0
            assert live["cost_usd"]["in_progress"] > 0 and live["cost_usd"]["committed"] > 0
            assert live["rate"]["images_per_s"] > 0 and live["eta_s"] > 0
        finally:
            proc.send_signal(signal.SIGKILL)  # kill -9 the driver mid-run
            proc.wait()
            time.sleep(1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its Ray agents: no process left behind

        stopped = status_cli(str(corpus), "--json")
        assert stopped.returncode == 0, stopped.stderr
        after = json.loads(stopped.stdout)
        assert after["state"] == "stopped" and after["shards"]["in_progress"] >= 1
        unfinished = after["in_progress_shards"][0]
        assert unfinished["answered"] == unfinished["captioned"] + unfinished["rejected"] > 0
        assert after["cost_usd"]["total"] == pytest.approx(
            after["cost_usd"]["committed"] + after["cost_usd"]["in_progress"]
        )
        text = status_cli(str(corpus)).stdout
        assert f"{corpus}: stopped (pid {proc.pid}" in text
        assert f"in progress: {unfinished['shard']}: {unfinished['answered']} answered" in text

        assert run_here(argv) == 0  # the resume, in this process: on the same Ray
    done = corpus_status(corpus)
    records = [json.loads(p.read_text()) for p in (corpus / "commits").glob("*.json")]
    assert done["state"] == "finished" and done["eta_s"] == 0
    assert done["shards"] == {
        "input": 3,
        "committed": 3,
        "in_progress": 0,
        "not_started": 0,
        "truncated": 0,
    }
    assert done["rows"]["captioned"] + done["rows"]["rejected"] == 48
    assert done["rows"]["captioned"] == sum(r["captioned"] for r in records)
    assert done["cost_usd"]["committed"] == pytest.approx(sum(r["cost_usd"] for r in records))
    assert done["cost_usd"]["in_progress"] == 0 and done["in_progress_shards"] == []
    assert done["requests"] == sum(r["requests"] for r in records) > 0


def test_status_of_a_corpus_in_object_storage(ray_cluster, s3, sample_shards, tmp_path):  # noqa: F811
    uri, _ = s3
    corpus, staging = uri("status-corpus"), tmp_path / "staging"
    cfg = load_config(
        "default",
        [f"input.path={sample_shards}", f"output.path={corpus}", f"output.staging={staging}"],
    )
    summary = run(cfg, show_progress=False)
    result = status_cli(corpus, "--staging", str(staging), "--json")  # the store's credentials
    assert result.returncode == 0, result.stderr  # come from the environment, as for a run
    found = json.loads(result.stdout)
    assert found["state"] == "finished" and found["resume_state_in"] == str(staging)
    assert found["shards"]["committed"] == 2 == found["shards"]["input"]
    assert found["rows"]["captioned"] == summary.totals.captioned
    reasons = {k: n for k, n in summary.totals.rejected_by_reason.items() if n}
    assert found["rejected_by_reason"] == reasons and reasons
    assert not (tmp_path / "corpus").exists()  # nothing of it on local disk but the staging


def test_status_of_shards_waiting_on_their_batches(
    ray_cluster, sample_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", BATCH_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=BATCH_KEY) as server:
        server.batch_api.hold = "in_progress"  # submitted, not answered yet
        cfg = batch_config(server, sample_shards, corpus, "captioner.batch.wait=false")
        assert len(run(cfg, show_progress=False).pending) == 2
    found = corpus_status(corpus)
    assert found["state"] == "stopped" and found["shards"]["committed"] == 0
    waiting = found["in_progress_shards"]
    assert [s["shard"] for s in waiting] == ["00000", "00001"]
    assert all(s["batches"] == {"in_progress": 1} and s["batch_keys_live"] > 0 for s in waiting)
    assert "in progress: 00000: 0 answered, batches 1 in_progress" in lines(found)


def test_status_of_no_corpus_is_one_line(tmp_path):
    result = status_cli(str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"recaption: error: no recaption corpus at {tmp_path / 'nothing'}: "
        "no manifest.json, commits/ or journals"
    )
