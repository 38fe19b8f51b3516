"""The `openai` captioner through the real SDK, over HTTP, against the loopback test server."""

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from openai_server import REFUSAL, Faults, OpenAIServer
from test_pipeline import assert_invariant

from recaption.captioners import CaptionerFatal, CaptionFailure, make_captioner
from recaption.config import ConfigError, load_config
from recaption.images import prepare
from recaption.pipeline import RunError, run
from recaption.pricing import PRICES
from recaption.shard import process_shard
from recaption.sources import list_shards

KEY = "fake-test-key-do-not-write-me-anywhere"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    for name in ("OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def openai_config(server: OpenAIServer | None, shards: Path, corpus: Path, *overrides: str):
    base = [f"captioner.base_url={server.url}"] if server else []
    return load_config(
        "pipelines/openai.yaml",
        [f"input.path={shards}", f"output.path={corpus}", *base, *overrides],
    )


def one_image(cfg):
    from conftest import scene_jpeg

    return prepare(scene_jpeg(), cfg.captioner.image)


def caption(cfg, image, limiters=None):
    return asyncio.run(make_captioner(cfg, limiters).caption(image))


def expected_keys(shards: Path) -> dict[str, set[str]]:
    return {
        p.stem: set(pq.read_table(p).column("key").to_pylist())
        for p in sorted(shards.glob("*.parquet"))
    }


def test_faults_on_ray_every_key_once_and_paid_calls_accounted(ray_cluster, tmp_path):
    from recaption.samples import write_samples

    shards = tmp_path / "shards"
    write_samples(shards, shards=3, per_shard=40, seed=5)
    # the mix, tripled so that each fault shows up in a short run
    faults = Faults(
        server_error=0.09,
        rate_limit=0.06,
        drop=0.03,
        broken_json=0.03,
        refusal=0.03,
        truncation=0.03,
        schema_invalid=0.03,
    )
    corpus = tmp_path / "corpus"
    with OpenAIServer(rpm=3000, latency_ms=20, faults=faults, seed=2, api_key=KEY) as server:
        cfg = openai_config(server, shards, corpus, "ray.workers=2", "limits.rpm=3000")
        summary = run(cfg, show_progress=False)
        kinds = server.kinds
    assert not summary.failed and len(summary.finished) == 3
    assert_invariant(corpus, expected_keys(shards))
    assert {"server_error", "rate_limit", "drop", "broken_json", "truncation", "refusal"} <= set(
        kinds
    )

    rows = pq.read_table(corpus / "data").to_pylist()
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert max(r["attempts"] for r in rows) > 1  # retried rows made it
    assert {r["reason"] for r in rejected} <= {"download_failed", "refusal", "truncated_output"}
    row = rows[0]
    assert row["backend"] == "openai" and row["model"] == "gpt-4.1"
    assert row["prompt_version"] == "dense-v1" and row["caption"].endswith(".")
    assert row["cost_usd"] == pytest.approx(
        PRICES["gpt-4.1"].cost(row["input_tokens"], row["output_tokens"])
    )

    manifest = json.loads((corpus / "manifest.json").read_text())
    totals = manifest["totals"]
    # every request the server saw is a request the manifest counted; a connection that failed
    # before the server read the request (a reset under load) is counted by the client alone
    seen, outcomes = sum(kinds.values()), totals["request_outcomes"]
    unseen = outcomes.get("connection_error", 0) - kinds["drop"]
    assert seen <= totals["requests"] <= seen + unseen
    assert totals["request_outcomes"]["rate_limited"] == kinds["rate_limit"]
    paid = sum(r["cost_usd"] for r in rows)
    # rejected rows' paid attempts are in the total too (1e-9: sums in another order)
    assert totals["cost_usd"] >= paid - 1e-9
    assert totals["input_tokens"] >= sum(r["input_tokens"] for r in rows)
    # the key is nowhere in the corpus, the manifest included
    for path in corpus.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_429_pauses_the_endpoint_for_its_retry_after(sample_shards, tmp_path):
    with OpenAIServer(rpm=600, api_key=KEY) as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c")
        image = one_image(cfg)
        server.storm(0.5, retry_after=0.5)
        result = caption(cfg, image)
        stats = server.stats()
    # one 429, then nothing until the pause ended, then success
    assert [e["kind"] for e in stats["events"]] == ["storm", "ok"]
    assert stats["events"][1]["t"] >= stats["storms"][0][1]
    assert result.attempts == 2


def test_refusals_are_retried_then_rejected(sample_shards, tmp_path):
    with OpenAIServer(faults=Faults(refusal=1.0), api_key=KEY) as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c", "captioner.refusal_retries=1")
        with pytest.raises(CaptionFailure) as info:
            caption(cfg, one_image(cfg))
    assert info.value.reason == "refusal" and info.value.attempts == 2
    assert REFUSAL[:20] in info.value.detail
    assert info.value.cost_usd > 0  # refusals are billed


def test_truncation_is_retried_once_with_more_room(sample_shards, tmp_path):
    with OpenAIServer(faults=Faults(truncation=1.0), api_key=KEY) as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c")
        with pytest.raises(CaptionFailure) as info:
            caption(cfg, one_image(cfg))
        sent = [r["max_completion_tokens"] for r in server.requests_seen]
    assert info.value.reason == "truncated_output" and info.value.attempts == 2
    assert sent == [600, 1200]


@pytest.mark.parametrize("json_mode", [True, False])
def test_falls_back_when_the_server_lacks_structured_output(sample_shards, tmp_path, json_mode):
    with OpenAIServer(structured_output=False, json_mode=json_mode, api_key=KEY) as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c")
        result = caption(cfg, one_image(cfg))
        formats = [(r.get("response_format") or {}).get("type") for r in server.requests_seen]
    expected = ["json_schema", "json_object"] if json_mode else ["json_schema", "json_object", None]
    assert formats == expected
    assert len(result.caption.caption.split()) > 60
    # without a schema on the wire, the prompt spells the schema out
    assert '"caption_short"' in server.requests_seen[-1]["text"]


def test_structured_output_sends_the_caption_schema(sample_shards, tmp_path):
    with OpenAIServer(api_key=KEY) as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c", "captioner.image.detail=low")
        result = caption(cfg, one_image(cfg))
        sent = server.requests_seen[0]
    schema = sent["response_format"]["json_schema"]
    assert schema["strict"] is True and schema["schema"]["additionalProperties"] is False
    assert set(schema["schema"]["required"]) == {
        "caption",
        "caption_short",
        "objects",
        "visible_text",
        "style",
    }
    assert result.input_tokens > 85 and result.attempts == 1  # 85: the low-detail image


def test_a_revoked_key_stops_the_shard_and_commits_nothing(sample_shards, tmp_path):
    with OpenAIServer(api_key="fake-another-key") as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c")
        captioner = make_captioner(cfg)
        with pytest.raises(CaptionerFatal, match="OPENAI_API_KEY"):
            process_shard(list_shards(str(sample_shards))[0], cfg, captioner)
    assert not list((tmp_path / "c").rglob("*.parquet"))


def test_an_unknown_model_stops_the_run(sample_shards, tmp_path):
    with OpenAIServer(api_key=KEY, models={"gpt-4.1"}) as server:
        cfg = openai_config(server, sample_shards, tmp_path / "c", "captioner.model=gpt-4.2-typo")
        with pytest.raises(CaptionerFatal, match=r"gpt-4\.2-typo"):
            caption(cfg, one_image(cfg))


def test_azure_deployment_paths_and_key(sample_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY")
    with OpenAIServer(api_key=KEY) as server:
        cfg = load_config(
            "pipelines/azure.yaml",
            [
                f"captioner.endpoints.0.base_url={server.azure_endpoint}",
                f"output.path={tmp_path / 'c'}",
            ],
        )
        result = caption(cfg, one_image(cfg))
        path = server.requests_seen[0]["path"]
    assert path.startswith("/openai/deployments/gpt-4.1/chat/completions?api-version=")
    assert result.cost_usd > 0


def test_endpoint_pool_benches_a_failing_endpoint(sample_shards, tmp_path):
    with (
        OpenAIServer(api_key=KEY) as good,
        OpenAIServer(faults=Faults(server_error=1.0), api_key=KEY) as bad,
    ):
        cfg = openai_config(
            None,
            sample_shards,
            tmp_path / "c",
            # the bad endpoint has more free quota, so it is tried first until benched
            f"captioner.endpoints=[{{name: bad, base_url: '{bad.url}', rpm: 6000}},"
            f" {{name: good, base_url: '{good.url}', rpm: 600}}]",
            "limits.concurrency=4",
        )
        captioner = make_captioner(cfg)
        report = process_shard(list_shards(str(sample_shards))[0], cfg, captioner)
        to_bad, to_good = len(bad.events), len(good.events)
    assert report.captioned + report.rejected_by_reason.get("download_failed", 0) == report.samples
    # benched after 5 straight failures (plus what was already in flight), then left alone
    assert captioner.pool.endpoints[0].benched_until > 0
    assert 5 <= to_bad <= 5 + 4 and to_good >= report.captioned


def test_pool_spreads_requests_over_endpoints_with_quota(sample_shards, tmp_path):
    with OpenAIServer(api_key=KEY) as a, OpenAIServer(api_key=KEY) as b:
        cfg = openai_config(
            None,
            sample_shards,
            tmp_path / "c",
            f"captioner.endpoints=[{{name: a, base_url: '{a.url}', rpm: 600}},"
            f" {{name: b, base_url: '{b.url}', rpm: 600}}]",
        )
        process_shard(list_shards(str(sample_shards))[0], cfg, make_captioner(cfg))
        counts = Counter(a=len(a.events), b=len(b.events))
    # 1 s bursts of 10 each: 20 images cannot all go to one endpoint without waiting
    assert counts["a"] >= 5 and counts["b"] >= 5


def test_missing_credentials_are_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = load_config("pipelines/openai.yaml", [f"output.path={tmp_path}"])
    with pytest.raises(ConfigError, match="set OPENAI_API_KEY"):
        make_captioner(cfg)


def test_cli_server_down_at_start_fails_cleanly(sample_shards, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    corpus = tmp_path / "corpus"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recaption.cli",
            "run",
            "--pipeline",
            "pipelines/openai.yaml",
            "--input",
            str(sample_shards),
            "--output",
            str(corpus),
            "--set",
            f"captioner.base_url=http://127.0.0.1:{port}/v1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unreachable" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not list(corpus.rglob("*.parquet"))
    manifest = corpus / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["shards"]


def test_a_wrong_key_fails_before_any_work(sample_shards, tmp_path):
    with OpenAIServer(api_key="fake-the-right-one") as server:
        with pytest.raises(RunError, match="refused the API key"):
            run(openai_config(server, sample_shards, tmp_path / "c"), show_progress=False)
        assert not server.events  # the preflight costs no completion
