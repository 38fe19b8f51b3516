"""The `openai-batch` captioner through the real SDK against the loopback Batch API
(tests/batch_api.py): whole runs on Ray, stop-and-resume in every batch status, lost
answers, expired, failed and malformed batches, online retries, `recaption batches`."""

import base64
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from openai_server import Faults, OpenAIServer
from test_openai import KEY, expected_keys
from test_pipeline import assert_invariant

from recaption.cli import main
from recaption.config import load_config
from recaption.corpus import BATCHES_DIR
from recaption.pipeline import run
from recaption.pricing import PRICES

ONLINE, BATCH = PRICES["gpt-4.1"], PRICES["gpt-4.1"].batch()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    for name in ("OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def batch_config(server: OpenAIServer, shards: Path, corpus: Path, *overrides: str):
    return load_config(
        "pipelines/openai-batch.yaml",
        [
            f"input.path={shards}",
            f"output.path={corpus}",
            f"captioner.base_url={server.url}",
            "captioner.batch.poll_s=0.02",
            "captioner.batch.poll_max_s=0.1",
            "ray.workers=1",
            *overrides,
        ],
    )


def rows(corpus: Path) -> list[dict]:
    return pq.read_table(corpus / "data", columns=None).drop(["image"]).to_pylist()


def test_a_batch_run_survives_expired_failed_and_malformed_batches(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    faults = Faults(server_error=0.05, drop=0.03, broken_json=0.05, refusal=0.05)
    with OpenAIServer(api_key=KEY, faults=faults, seed=3) as server:
        api = server.batch_api
        api.fates = ["expired", "failed", "malformed"]  # the first three batches
        cfg = batch_config(
            server, shards, corpus, "ray.workers=2", "captioner.batch.max_requests=25"
        )
        summary = run(cfg, show_progress=False)
        assert server.kinds["ok"] > 0 and not [r for r in server.requests_seen if not r["batch"]]
    assert not summary.failed and not summary.pending and len(summary.finished) == 3
    assert_invariant(corpus, expected_keys(shards))
    assert api.live_overlaps == []  # no key was submitted while a batch holding it was live
    assert set(api.statuses()) >= {"completed", "expired", "failed"}
    # 40-image shards in parts of at most 25 requests
    assert all(len(b["_ids"]) <= 25 for b in api.batches.values())

    data = rows(corpus)
    assert {r["backend"] for r in data} == {"openai-batch"}
    retried = [r for r in data if r["attempts"] > 1]
    assert retried, "the expired, failed and malformed batches' keys were tried again"
    for row in data:  # every attempt at the batch price
        assert row["cost_usd"] == pytest.approx(
            BATCH.cost(row["input_tokens"], row["output_tokens"])
        )
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert {r["reason"] for r in rejected} <= {"download_failed", "refusal", "batch_failed"}
    # submissions per key never exceed the attempt budget
    assert max(api.submitted.values()) <= cfg.captioner.max_attempts
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["totals"]["requests"] == sum(api.submitted.values())
    assert manifest["totals"]["cost_usd"] == pytest.approx(
        BATCH.cost(manifest["totals"]["input_tokens"], manifest["totals"]["output_tokens"]),
        abs=1e-5,
    )
    assert not (corpus / BATCHES_DIR).exists() or not list((corpus / BATCHES_DIR).iterdir())


def test_batch_state_holds_ids_and_no_secret(ray_cluster, sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        server.batch_api.hold = "in_progress"
        cfg = batch_config(server, sample_shards, corpus, "captioner.batch.wait=false")
        run(cfg, show_progress=False)
    state = json.loads((corpus / BATCHES_DIR / "00000.json").read_text())
    assert state["parts"][0]["batch_id"].startswith("batch_")
    assert state["parts"][0]["status"] == "in_progress" and len(state["parts"][0]["keys"]) > 0
    for path in corpus.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_stopping_in_every_status_resumes_without_resubmitting(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    held = ["validating", "in_progress", "finalizing"]
    with OpenAIServer(api_key=KEY) as server:
        api = server.batch_api
        api.holds = list(held)  # the three batches stop at a status each
        # one shard at a time: each run claims the shards' copies in the same order, so a
        # copy left out of a batch before is left out again (with shards in batches at
        # once, a resumed run may find another first occurrence and ask such a copy once)
        one = "captioner.batch.shards_per_worker=1"
        cfg = batch_config(server, shards, corpus, "captioner.batch.wait=false", one)
        # each run submits what is due, looks once, and stops: a stop in every status
        for _ in range(4):
            stopped = run(cfg, show_progress=False)
            assert sorted(stopped.pending) == ["00000", "00001", "00002"]
            assert not stopped.finished and api.created == 3
            if api.statuses() == Counter(held):
                break
        assert api.statuses() == Counter(held)
        api.release()
        done = run(batch_config(server, shards, corpus, one), show_progress=False)
    assert len(done.finished) == 3 and not done.pending
    assert api.created == 3 and set(api.submitted.values()) == {1} and not api.live_overlaps
    assert_invariant(corpus, expected_keys(shards))
    # one attempt each; the shards' copies of a picture reuse its caption, with none
    assert {r["attempts"] for r in rows(corpus) if not r["duplicate_of"]} == {1}
    assert {r["attempts"] for r in rows(corpus) if r["duplicate_of"]} <= {0}


def test_a_lost_create_answer_adopts_the_batch_it_made(ray_cluster, sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        api = server.batch_api
        api.drop_create = 2  # the batches exist, the client never hears back
        api.page_max = 1  # the list comes a batch a page: the search must follow the pages
        summary = run(batch_config(server, sample_shards, corpus), show_progress=False)
    assert len(summary.finished) == 2
    assert api.created == 2 and set(api.submitted.values()) == {1}
    assert_invariant(corpus, expected_keys(sample_shards))


def test_retry_online_answers_what_a_batch_missed(ray_cluster, sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        server.batch_api.fates = ["expired", "expired"]
        cfg = batch_config(server, sample_shards, corpus, "captioner.batch.retry=online")
        summary = run(cfg, show_progress=False)
        online = [r for r in server.requests_seen if not r["batch"]]
    assert len(summary.finished) == 2 and server.batch_api.created == 2
    assert_invariant(corpus, expected_keys(sample_shards))
    data = rows(corpus)
    second = [r for r in data if r["attempts"] == 2]
    assert len(online) == len(second) > 0
    for row in data:  # an expired request used nothing: the online retry is all it cost
        price = ONLINE if row["attempts"] == 2 else BATCH
        assert row["cost_usd"] == pytest.approx(
            price.cost(row["input_tokens"], row["output_tokens"])
        )


def test_batches_lists_and_cancels_and_a_run_finishes_after(
    ray_cluster, sample_shards, tmp_path, capsys
):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        api = server.batch_api
        api.hold = "in_progress"
        cfg = batch_config(server, sample_shards, corpus, "captioner.batch.wait=false")
        assert len(run(cfg, show_progress=False).pending) == 2
        capsys.readouterr()
        assert main(["batches", str(corpus)]) == 0
        listing = capsys.readouterr().out
        assert listing.count("in_progress") == 3 and "batch_" in listing  # 2 rows + summary
        assert main(["batches", str(corpus), "--cancel"]) == 0
        assert "2 cancel" in capsys.readouterr().out
        api.hold = None
        done = run(batch_config(server, sample_shards, corpus), show_progress=False)
    assert len(done.finished) == 2 and api.statuses()["cancelled"] == 2
    assert_invariant(corpus, expected_keys(sample_shards))
    # a cancelled batch keeps the lines that ran (half, on this server); the rest go again
    # and the cancelled try counts for them; copies of a picture reuse its caption
    assert {r["attempts"] for r in rows(corpus) if not r["duplicate_of"]} == {1, 2}
    assert not api.live_overlaps


def test_azure_batch_deployment(ray_cluster, sample_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY")
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        cfg = load_config(
            "pipelines/openai-batch.yaml",
            [
                f"input.path={sample_shards}",
                f"output.path={corpus}",
                "captioner.api=azure",
                f"captioner.base_url={server.azure_endpoint}",
                "captioner.api_version=2024-10-21",
                "captioner.model=gpt-4.1",
                "captioner.batch.poll_s=0.02",
            ],
        )
        summary = run(cfg, show_progress=False)
        endpoints = {b["endpoint"] for b in server.batch_api.batches.values()}
        paths = {r["path"] for r in server.requests_seen}
    assert len(summary.finished) == 2
    assert endpoints == {"/chat/completions"} and paths == {"/chat/completions"}
    assert_invariant(corpus, expected_keys(sample_shards))


def line_tokens(cfg, sample_shards: Path, server: OpenAIServer) -> int:
    """One request's input tokens as the server's queue counts them."""
    from recaption.captioners import make_captioner
    from recaption.reading import samples
    from recaption.sources import list_shards

    captioner = make_captioner(cfg)
    _, image = next(samples(list_shards(str(sample_shards))[0], cfg.captioner.image))
    tries = captioner.tries(image)
    tries.image_b64 = base64.b64encode(image.data)
    return server.input_tokens(captioner._request(captioner.endpoint, tries))


@pytest.mark.parametrize("told", [True, False], ids=["quota-set", "quota-learnt"])
def test_a_job_three_times_the_queue_quota_waits_and_loses_no_row(
    ray_cluster, shards, tmp_path, told
):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        api = server.batch_api
        probe = batch_config(server, shards, corpus)
        job = 120 * line_tokens(probe, shards, server)  # 3 shards x 40 images
        api.enqueued_limit = quota = job // 3
        extra = [f"captioner.batch.max_enqueued_tokens={quota}"] if told else []
        cfg = batch_config(
            server, shards, corpus, "ray.workers=2", "captioner.batch.max_requests=10", *extra
        )
        summary = run(cfg, show_progress=False)
        refused = sum(b["_fate"] == "token_limit" for b in api.batches.values())
    assert not summary.failed and len(summary.finished) == 3, summary.lines()
    assert_invariant(corpus, expected_keys(shards))
    assert api.peak_enqueued <= quota and not api.live_overlaps
    assert (refused == 0) if told else (refused >= 1)  # told: never past it; else learnt
    reasons = {r["reason"] for r in pq.read_table(corpus / "rejected").to_pylist()}
    assert not reasons & {"batch_failed", "rate_limited", "server_error"}, reasons
    assert {r["attempts"] for r in rows(corpus) if not r["duplicate_of"]} == {
        1
    }  # a refusal for the quota is no attempt
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["totals"]["cost_usd"] == pytest.approx(
        BATCH.cost(manifest["totals"]["input_tokens"], manifest["totals"]["output_tokens"]),
        abs=1e-5,
    )
    # the batches' files are deleted once their shards are committed
    assert api.deleted and not [f for f in api.files.values() if f["meta"]["purpose"] == "batch"]
    assert not list((corpus / BATCHES_DIR).rglob("*.json"))


def test_a_line_the_api_names_is_rejected_and_the_rest_go_again(
    ray_cluster, sample_shards, tmp_path
):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        server.batch_api.fates = ["bad_line"]
        summary = run(batch_config(server, sample_shards, corpus), show_progress=False)
    assert len(summary.finished) == 2
    assert_invariant(corpus, expected_keys(sample_shards))
    bad = [
        r for r in pq.read_table(corpus / "rejected").to_pylist() if r["reason"] == "bad_request"
    ]
    assert len(bad) == 1 and "line 1" in bad[0]["detail"]
    assert {r["attempts"] for r in rows(corpus) if not r["duplicate_of"]} == {
        1
    }  # the others were not charged


def test_kill_9_while_batches_wait_for_quota_submits_no_line_twice(ray_cluster, shards, tmp_path):
    import subprocess
    import time

    from kill_run import run_argv, run_here

    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        api = server.batch_api
        probe = batch_config(server, shards, corpus)
        api.enqueued_limit = quota = 40 * line_tokens(probe, shards, server)  # one shard
        api.hold = "in_progress"  # the first batches stay live: the rest wait for quota
        argv = run_argv(
            "pipelines/openai-batch.yaml",
            [
                f"input.path={shards}",
                f"output.path={corpus}",
                f"captioner.base_url={server.url}",
                "captioner.batch.poll_s=0.05",
                "captioner.batch.poll_max_s=0.2",
                f"captioner.batch.max_enqueued_tokens={quota}",
                "ray.workers=2",
            ],
        )
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while api.created < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3)  # the other shards are waiting for room in the queue now
        proc.kill()
        proc.wait()
        assert api.created >= 1 and api.statuses().get("in_progress", 0) == api.created
        api.hold = None
        final = run_here(argv)
    assert final == 0
    assert not api.live_overlaps  # nothing submitted again while a batch holding it was live
    assert api.peak_enqueued <= quota
    assert_invariant(corpus, expected_keys(shards))
