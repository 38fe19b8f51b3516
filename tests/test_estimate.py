"""`recaption estimate` against the loopback test server, then the real run it predicts."""

import json

import pytest
from openai_server import OpenAIServer
from test_openai import KEY, openai_config

from recaption.cli import main
from recaption.estimate import estimate
from recaption.pipeline import run
from recaption.pricing import PRICES


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_the_estimate_matches_what_the_run_then_spends(ray_cluster, shards, tmp_path):
    corpus = tmp_path / "corpus"
    with OpenAIServer(api_key=KEY) as server:
        rpm = 1500  # binds: 5M tokens a minute would take ~3,800 requests of ~1,300 tokens
        cfg = openai_config(server, shards, corpus, f"limits.rpm={rpm}", "limits.tpm=5000000")
        guess = estimate(cfg, sample=20)
        sampled = len(server.requests_seen)
        run(cfg, show_progress=False)
    totals = json.loads((corpus / "manifest.json").read_text())["totals"]
    assert guess["sample"] == sampled == 20 and guess["measured"]
    assert guess["images"] == totals["samples"] - totals["rejected_by_reason"]["download_failed"]
    assert guess["tokens"]["input"] == pytest.approx(totals["input_tokens"], rel=0.1)
    assert guess["tokens"]["output"] == pytest.approx(totals["output_tokens"], rel=0.1)
    assert guess["cost_usd"]["online"] == pytest.approx(totals["cost_usd"], rel=0.1)
    assert guess["cost_usd"]["batch"] == pytest.approx(guess["cost_usd"]["online"] / 2, abs=1e-4)
    # the RPM binds: every image is one request at this fault-free server
    assert guess["binding"] == "rpm"
    assert guess["limits"]["rpm"] == pytest.approx(guess["images"] / rpm, rel=0.01)


def test_dry_estimate_sends_nothing_and_projects_to_any_size(shards, capsys):
    code = main(
        [
            "estimate",
            "--pipeline",
            "pipelines/openai-batch.yaml",
            "--input",
            str(shards),
            "--dry",
            "--images",
            "800000000",
            "--json",
            "--set",
            "captioner.base_url=http://127.0.0.1:9",  # nothing listens: a request would fail
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 800_000_000 and not result["measured"]
    per = result["per_image"]
    assert per["output_tokens"] == 250 and 255 < per["input_tokens"] < 2000  # one 512-px tile
    price = PRICES["gpt-4.1"]
    expected = price.cost(per["input_tokens"], per["output_tokens"]) * 800_000_000
    assert result["cost_usd"]["online"] == pytest.approx(expected, rel=1e-3)
    assert result["cost_usd"]["batch"] == pytest.approx(expected / 2, rel=1e-3)
    assert result["binding"] is None  # no quota configured, no time claimed


def test_one_live_progress_line_across_workers(ray_cluster, sample_shards, tmp_path, capsys):
    with OpenAIServer(api_key=KEY, latency_ms=300) as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c", "ray.workers=2")
        run(cfg, show_progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # images done of the input, rate, shards, rejections, and the quota and the bill
    assert bar.split("|")[-1].strip().startswith("48/48 [")
    for field in ("img/s", "shards=2/2", "rejected=", "req/min=", "tok/min=", "$="):
        assert field in bar, bar
