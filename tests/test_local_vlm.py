"""Local VLMs: the `transformers` captioner on tiny random checkpoints of each family people
caption with (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM2, Gemma 3, LLaVA), built in
the test in their hub layouts: loading without torchvision, chat templates that must keep the
system prompt, special tokens once, one image per prompt in a batch, generation, parsing, the
text fallback, rejection of degenerate output; and a pool of self-hosted OpenAI-compatible
servers."""

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
import transformers
from openai_server import OpenAIServer
from PIL import Image
from test_openai import expected_keys
from test_pipeline import assert_invariant
from tiny_vlm import FAMILIES, build_tiny_vlm

from recaption.captioners import make_captioner
from recaption.captioners.local import read_reply
from recaption.captioners.prompt import USER_TEXT, load_prompt, prompt_with_schema
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
# image tokens for one image at image.max_side=112: fixed-size towers exactly, tiling and
# dynamic-resolution ones at least (Qwen: one per 28x28 px, 32x32 on Qwen3-VL, whose
# processor scales small images up to 65,536 px; Idefics3 / SmolVLM: 16 per tile + global)
IMAGE_TOKENS = {
    "llava": (16, 16),
    "gemma3": (16, 16),
    "qwen2_vl": (6, 16),
    "qwen2_5_vl": (6, 16),
    "qwen3_vl": (64, 80),
    "idefics3": (32, 80),
    "smolvlm2": (32, 80),
}
PROCESSORS = {
    "llava": "LlavaProcessor",
    "gemma3": "Gemma3Processor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor",
    "smolvlm2": "SmolVLMProcessor",
}
SYSTEM = prompt_with_schema(load_prompt("dense-v1")[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> its tiny checkpoint's directory, built on first use."""
    root, built = tmp_path_factory.mktemp("vlm"), {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_vlm(root / f"tiny-{family}", family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def tiny_vlm(checkpoint):
    return checkpoint("llava")


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
            "captioner.image.max_side=112",
            *overrides,
        ],
    )


def squeeze(text: str) -> str:
    return " ".join(text.split())


def test_every_family_is_fed_its_prompt_and_image_tokens(checkpoint):
    """What reaches each model: the whole system prompt (as typed parts, which every
    template renders), the image's tokens, its BOS once, one image per prompt."""
    for family in FAMILIES:
        cfg = local_config(checkpoint(family), "unused", "unused")
        captioner = make_captioner(cfg)
        assert isinstance(captioner.processor, getattr(transformers, PROCESSORS[family]))
        images = [Image.new("RGB", (112, 84), (200, 40, 40)), Image.new("RGB", (84, 112), 90)]
        inputs = captioner.encode(images)
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        assert ids.shape[0] == 2, family  # a prompt each
        for row, keep in zip(ids, mask, strict=True):
            text = captioner.tokenizer.decode(row[keep])
            assert squeeze(SYSTEM) in squeeze(text) and USER_TEXT in text, family
            fed = int((row == captioner.image_token_id).sum())
            low, high = IMAGE_TOKENS[family]
            assert low <= fed <= high, (family, fed)
            bos = captioner.tokenizer.bos_token_id
            if bos is not None:
                assert int((row == bos).sum()) == 1, (family, "BOS twice")
        system_tokens = len(captioner.tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
        assert captioner.inputs.text_tokens() > system_tokens > 250, family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_captions_a_shard(family, checkpoint, sample_shards, tmp_path):
    shard = list_shards(str(sample_shards))[0]
    corpus = tmp_path / "c"
    cfg = local_config(checkpoint(family), sample_shards, corpus, *RELAXED)
    captioner = make_captioner(cfg)
    report = process_shard(shard, cfg, captioner)
    assert_invariant(corpus, {"00000": expected_keys(sample_shards)["00000"]})
    # readable images are captioned, or rejected for the noise they are (a reply cut at the
    # budget, or one ending without a full stop), never a caption_error
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert {r["reason"] for r in rejected if r["stage"] == "caption"} <= {"truncated_output"}
    readable = report.samples - report.rejected_by_reason.get("download_failed", 0)
    assert report.captioned >= readable / 2, report.rejected_by_reason
    rows = pq.read_table(corpus / "data").drop(["image"]).to_pylist()
    assert len(rows) == report.captioned
    assert {r["model"] for r in rows} == {f"tiny-{family}"}
    timings = captioner.timings
    assert timings["images"] == readable and timings["batches"] < readable  # batched
    low, high = IMAGE_TOKENS[family]
    assert low * readable <= timings["image_tokens"] <= high * readable
    # the prompt each image was charged: the template's text and its image tokens
    text_tokens = captioner.inputs.text_tokens()
    assert all(r["input_tokens"] >= text_tokens - 1 + low for r in rows)
    assert sum(r["input_tokens"] for r in rows) <= timings["input_tokens"]
    assert all(0 < r["output_tokens"] <= 48 and r["caption"] for r in rows)


def test_a_qwen_vl_run_on_ray(ray_cluster, checkpoint, sample_shards, tmp_path):
    """The README's model family through `run` as a user starts it: two shards on Ray."""
    corpus = tmp_path / "corpus"
    model = checkpoint("qwen2_5_vl")
    summary = run(local_config(model, sample_shards, corpus, *RELAXED), show_progress=False)
    assert len(summary.finished) == 2 and not summary.failed
    assert_invariant(corpus, expected_keys(sample_shards))
    rows = pq.read_table(corpus / "data").drop(["image"]).to_pylist()
    assert rows, "relaxed validation lets the noise through as dense-caption-only records"
    assert {(r["backend"], r["model"], r["prompt_version"]) for r in rows} == {
        ("transformers", "tiny-qwen2_5_vl", "dense-v1")
    }
    asked = [r for r in rows if not r["duplicate_of"]]  # copies reuse a caption, free
    assert all(r["input_tokens"] > 600 for r in asked)  # the schema prompt and the image
    assert all(0 < r["output_tokens"] <= 48 and r["cost_usd"] == 0 for r in asked)
    assert all(r["caption"] and r["objects"] == [] for r in rows)  # the text fallback
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert {(r["stage"], r["reason"]) for r in rejected} <= {
        ("read", "download_failed"),
        ("validate", "truncated_output"),
    }
    manifest = json.loads((corpus / "manifest.json").read_text())
    captioned = manifest["totals"]["samples"] - manifest["totals"]["rejected_by_reason"].get(
        "download_failed", 0
    )
    copies = sum(manifest["totals"]["duplicates"].values())  # reuse a caption, not generated
    assert manifest["totals"]["requests"] == captioned - copies  # one generation per image


def test_cut_and_degenerate_replies_are_rejected(checkpoint, sample_shards, tmp_path):
    shard = list_shards(str(sample_shards))[0]
    gemma3 = checkpoint("gemma3")  # its noise runs to ~40 tokens
    cfg = local_config(
        gemma3, sample_shards, tmp_path / "c", "captioner.max_output_tokens=16", *RELAXED
    )
    captioner = make_captioner(cfg)
    report = process_shard(shard, cfg, captioner)
    # a reply with no end within 16 tokens is cut (stage caption)
    rejected = pq.read_table(tmp_path / "c" / "rejected").to_pylist()
    cut = [r for r in rejected if r["stage"] == "caption"]
    assert cut and all(r["reason"] == "truncated_output" for r in cut)
    assert all("max_output_tokens=16" in r["detail"] for r in cut)
    assert report.captioned + report.rejected == report.samples
    assert captioner.counters["truncated"] == len(cut)
    timings = captioner.timings
    assert timings["images"] > timings["batches"] > 0  # generation ran in batches
    assert timings["images"] / timings["batches"] <= captioner.batch_size
    tiny_vlm = checkpoint("llava")
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
    # PyPI's torchvision beside the CPU torch cannot load: said once, before any work
    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "recaption.cli", "run", "--pipeline"),
            *("pipelines/local-vlm.yaml", "--input", str(sample_shards)),
            *("--output", str(tmp_path / "never"), "--set", f"captioner.model_path={tiny_vlm}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert result.returncode == 2 and "torchvision is installed but does not load" in result.stderr
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


def test_max_in_flight_holds_for_all_workers_together(ray_cluster, tmp_path):
    """Four workers of 8 requests each put at most `max_in_flight` on one server: the cap is
    the endpoint's, held by the run's limiter actor, not each worker's."""
    from recaption.samples import write_samples

    shards = tmp_path / "shards"
    write_samples(shards, shards=4, per_shard=24, seed=2)
    with OpenAIServer(latency_ms=80) as server:  # 32 requests want to go; 3 may
        cfg = load_config(
            "pipelines/vllm.yaml",
            [
                f"input.path={shards}",
                f"output.path={tmp_path / 'c'}",
                f"captioner.endpoints=[{{name: one, base_url: '{server.url}', max_in_flight: 3}}]",
                "captioner.model=gpt-4.1",
                "limits.concurrency=8",
                "ray.workers=4",
                "ray.cpus_per_worker=0.5",
            ],
        )
        summary = run(cfg, show_progress=False)
    assert server.peak_in_flight == 3  # full, never over
    assert len(summary.finished) == 4
    assert_invariant(tmp_path / "c", expected_keys(shards))
