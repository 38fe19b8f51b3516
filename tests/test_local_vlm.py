"""Local VLMs: the `transformers` captioner on a tiny random LLaVA built in the test (loading
from a directory, chat template, batching, generation, parsing, the text fallback, rejection
of degenerate output), and a pool of self-hosted OpenAI-compatible servers."""

import json
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
from openai_server import OpenAIServer
from test_openai import expected_keys
from test_pipeline import assert_invariant
from tiny_vlm import build_tiny_vlm

from recaption.captioners.local import read_reply
from recaption.config import load_config
from recaption.pipeline import RunError, run
from recaption.shard import process_shard
from recaption.sources import list_shards

RELAXED = [  # let noise through validation, to check the records it makes
    "validation.min_words=1",
    "validation.max_words=100000",
    "validation.short_max_words=100000",
    "validation.language=null",
    "validation.max_repeated_ngram_share=1.0",
]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava")


def local_config(model, shards, corpus, *overrides):
    return load_config(
        "pipelines/local-vlm.yaml",
        [
            f"captioner.model_path={model}",
            f"input.path={shards}",
            f"output.path={corpus}",
            "ray.gpus_per_worker=0",
            "ray.cpus_per_worker=1",
            "captioner.max_output_tokens=48",
            *overrides,
        ],
    )


def test_tiny_vlm_through_the_pipeline_on_ray(ray_cluster, tiny_vlm, sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    summary = run(local_config(tiny_vlm, sample_shards, corpus, *RELAXED), show_progress=False)
    assert len(summary.finished) == 2 and not summary.failed
    assert_invariant(corpus, expected_keys(sample_shards))
    rows = pq.read_table(corpus / "data").drop(["image"]).to_pylist()
    assert rows, "relaxed validation lets the noise through as dense-caption-only records"
    assert {(r["backend"], r["model"], r["prompt_version"]) for r in rows} == {
        ("transformers", "tiny-llava", "dense-v1")
    }
    # the prompt is the same for every image: chat template + 16 image tokens (4x4 patches)
    assert len({r["input_tokens"] for r in rows}) == 1 and rows[0]["input_tokens"] > 16
    assert all(0 < r["output_tokens"] <= 48 and r["cost_usd"] == 0 for r in rows)
    assert all(r["caption"] and r["objects"] == [] for r in rows)  # the text fallback
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert {r["reason"] for r in rejected} <= {"download_failed", "truncated_output", "empty"}
    manifest = json.loads((corpus / "manifest.json").read_text())
    captioned = manifest["totals"]["samples"] - manifest["totals"]["rejected_by_reason"].get(
        "download_failed", 0
    )
    assert manifest["totals"]["requests"] == captioned  # one generation per image


def test_cut_and_degenerate_replies_are_rejected(tiny_vlm, sample_shards, tmp_path):
    from recaption.captioners import make_captioner

    shard = list_shards(str(sample_shards))[0]
    cfg = local_config(
        tiny_vlm, sample_shards, tmp_path / "c", "captioner.max_output_tokens=16", *RELAXED
    )
    captioner = make_captioner(cfg)
    report = process_shard(shard, cfg, captioner)
    # a reply with no end within 16 tokens is cut (stage caption); one that ends mid-sentence
    # is turned away by validation, under the same reason
    rejected = pq.read_table(tmp_path / "c" / "rejected").to_pylist()
    cut = [r for r in rejected if r["stage"] == "caption"]
    assert cut and all(r["reason"] == "truncated_output" for r in cut)
    assert all("max_output_tokens=16" in r["detail"] for r in cut)
    rows = pq.read_table(tmp_path / "c" / "data", columns=["output_tokens"]).to_pylist()
    assert all(r["output_tokens"] <= 16 for r in rows)
    assert report.captioned + report.rejected == report.samples
    timings = captioner.timings
    assert timings["images"] > timings["batches"] > 0  # generation ran in batches
    assert timings["images"] / timings["batches"] <= captioner.batch_size
    # the default rules turn the noise away: too short, not English, repeating itself
    cfg = local_config(tiny_vlm, sample_shards, tmp_path / "d")
    report = process_shard(shard, cfg, make_captioner(cfg))
    assert report.captioned == 0 and report.rejected == report.samples
    assert set(report.rejected_by_reason) <= {
        "download_failed",
        "truncated_output",
        "too_short",
        "wrong_language",
        "repetition",
        "empty",
    }


def test_json_replies_fill_every_field_and_prose_falls_back():
    record = {
        "caption": "A dog runs on a beach.",
        "caption_short": "A dog.",
        "objects": ["dog", "beach"],
        "visible_text": [],
        "style": "photograph",
    }
    caption, as_json = read_reply(f"Sure:\n```json\n{json.dumps(record)}\n```")
    assert as_json and caption.objects == ["dog", "beach"] and caption.style == "photograph"
    caption, as_json = read_reply("A brown dog runs along the shore.  Waves break behind it.")
    assert not as_json
    assert caption.caption == "A brown dog runs along the shore. Waves break behind it."
    assert caption.caption_short == "A brown dog runs along the shore."
    assert caption.objects == [] and caption.visible_text == []


def test_a_missing_model_or_gpu_is_one_clear_error(ray_cluster, tiny_vlm, sample_shards, tmp_path):
    result = subprocess.run(
        [
            *(sys.executable, "-m", "recaption.cli", "run", "--pipeline"),
            *("pipelines/local-vlm.yaml", "--input", str(sample_shards)),
            *("--output", str(tmp_path / "never")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "captioner.model_path" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "never").exists()
    cfg = local_config(tiny_vlm, sample_shards, tmp_path / "c", "ray.gpus_per_worker=1")
    with pytest.raises(RunError, match="0 GPUs"):
        run(cfg, show_progress=False)


def test_a_pool_of_servers_keeps_each_full_and_survives_one_dying(sample_shards, tmp_path):
    with OpenAIServer(latency_ms=300) as one, OpenAIServer(latency_ms=300) as two:
        cfg = load_config(
            "pipelines/vllm.yaml",
            [
                f"input.path={sample_shards}",
                f"output.path={tmp_path / 'c'}",
                f"captioner.endpoints=[{{name: one, base_url: '{one.url}', max_in_flight: 3}},"
                f" {{name: two, base_url: '{two.url}', max_in_flight: 3}}]",
                "captioner.model=gpt-4.1",
                "limits.concurrency=16",
            ],
        )
        from recaption.captioners import make_captioner

        captioner = make_captioner(cfg)
        shards = list_shards(str(sample_shards))
        process_shard(shards[0], cfg, captioner)
        assert one.peak_in_flight == 3 and two.peak_in_flight == 3  # full, never over
        served = len(one.requests_seen)

        def crash_after_five_more() -> None:
            while len(one.requests_seen) < served + 5:
                time.sleep(0.01)
            one.kill()

        killer = threading.Thread(target=crash_after_five_more)
        killer.start()
        report = process_shard(shards[1], cfg, captioner)
        killer.join()
    assert report.captioned + report.rejected_by_reason.get("download_failed", 0) == report.samples
    assert len(one.requests_seen) > served  # it took work before it died
    assert report.request_outcomes.get("connection_error", 0) > 0  # and its requests moved
    assert_invariant(tmp_path / "c", expected_keys(sample_shards))


def test_a_benched_server_returns_only_when_it_answers(sample_shards, tmp_path):
    import asyncio
    import socket

    from recaption.captioners import make_captioner

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with OpenAIServer() as live:
        cfg = load_config(
            "pipelines/vllm.yaml",
            [
                f"output.path={tmp_path / 'c'}",
                f"captioner.endpoints=[{{name: dead, base_url: '{dead_url}'}},"
                f" {{name: live, base_url: '{live.url}'}}]",
            ],
        )
        pool = make_captioner(cfg).pool
        dead, alive = pool.endpoints

        async def acquire_after_bench():
            for endpoint in pool.endpoints:  # both benched, and the bench just ran out
                endpoint.benched_until = 1.0
            got, _ = await pool.acquire(100)
            await dead.aclose()
            await alive.aclose()
            return got

        got = asyncio.run(acquire_after_bench())
    assert got is alive and alive.benched_until == 0.0  # answered GET /models
    assert dead.benched_until > 1.0  # refused the probe: benched again


def test_estimate_reports_image_tokens_and_speed(tiny_vlm, sample_shards, capsys):
    from recaption.cli import main

    code = main(
        [
            *("estimate", "--pipeline", "pipelines/local-vlm.yaml", "--input", str(sample_shards)),
            *("--sample", "8", "--json", "--set", f"captioner.model_path={tiny_vlm}"),
            *("--set", "captioner.image.max_side=64"),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_tokens"] == 16 and result["image_max_side"] == 64  # 4x4 patches
    assert result["vlm"] == {
        "model": "tiny-llava",
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 4,
    }
    assert result["images_per_s"] > 0 and result["cost_usd"] == {"online": 0.0, "batch": 0.0}
