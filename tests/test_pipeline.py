"""The Ray job end to end: a real local Ray, real shards, real Parquet read back."""

import json
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from recaption.config import load_config
from recaption.pipeline import run
from recaption.records import SCHEMA_VERSION


def corpus_keys(corpus: Path, shard: str) -> tuple[list[str], list[dict]]:
    data = (
        pq.read_table(corpus / "data" / f"{shard}.parquet", columns=["key"])
        .column("key")
        .to_pylist()
    )
    rejected = pq.read_table(corpus / "rejected" / f"{shard}.parquet").to_pylist()
    return data, rejected


def assert_invariant(corpus: Path, expected: dict[str, set[str]]) -> None:
    """Each input key once, in data/ or rejected/; only duplicate_key rows may repeat a key."""
    for shard, keys in expected.items():
        data, rejected = corpus_keys(corpus, shard)
        first_time = data + [r["key"] for r in rejected if r["reason"] != "duplicate_key"]
        assert Counter(first_time) == Counter(keys), shard
        assert all(r["reason"] and r["stage"] and r["detail"] for r in rejected)


def config(shards: Path, corpus: Path, *overrides: str):
    return load_config(
        "pipelines/default.yaml", [f"input.path={shards}", f"output.path={corpus}", *overrides]
    )


def test_sample_run_writes_the_corpus_contract(ray_cluster, sample_shards, tmp_path):
    corpus = tmp_path / "corpus"
    summary = run(config(sample_shards, corpus), show_progress=False)
    assert not summary.failed and len(summary.finished) == 2

    expected = {}
    for sid in ("00000", "00001"):
        expected[sid] = set(
            pq.read_table(sample_shards / f"{sid}.parquet").column("key").to_pylist()
        )
    assert_invariant(corpus, expected)

    table = pq.read_table(corpus / "data" / "00000.parquet")
    assert table.schema.metadata[b"recaption.schema_version"].decode() == SCHEMA_VERSION
    row = table.slice(0, 1).to_pylist()[0]
    assert (
        row["image"]
        and row["backend"] == "analyzer"
        and row["prompt_version"].startswith("analyzer")
    )
    assert row["width"] <= 512 and row["height"] <= 512
    captions = duckdb.sql(f"select caption from read_parquet('{corpus}/data/*.parquet')").fetchall()
    assert all(60 <= len(c.split()) <= 150 for (c,) in captions)

    manifest = json.loads((corpus / "manifest.json").read_text())
    records = {p.stem: json.loads(p.read_text()) for p in (corpus / "commits").glob("*.json")}
    assert set(records) == {"00000", "00001"}  # a commit record per shard
    assert manifest["totals"]["samples"] == sum(len(k) for k in expected.values())
    assert manifest["totals"]["rejected_by_reason"]["download_failed"] > 0
    assert manifest["config"]["captioner"]["backend"] == "analyzer"
    assert records["00000"]["timings"]["caption_s"] > 0

    # Readable by other engines, not only pyarrow.
    glob = str(corpus / "data" / "*.parquet")
    n_duck = duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0]
    n_polars = pl.scan_parquet(glob).select(pl.len()).collect().item()
    assert n_duck == n_polars == manifest["totals"]["captioned"]
    rejected = duckdb.sql(
        f"select reason, count(*) from read_parquet('{corpus}/rejected/*.parquet') group by 1"
    ).fetchall()
    assert (
        dict(rejected)["download_failed"]
        == manifest["totals"]["rejected_by_reason"]["download_failed"]
    )

    # A re-run skips committed shards and leaves them untouched.
    before = (corpus / "data" / "00000.parquet").stat().st_mtime_ns
    again = run(config(sample_shards, corpus), show_progress=False)
    assert again.skipped == 2 and not again.finished
    assert (corpus / "data" / "00000.parquet").stat().st_mtime_ns == before


def test_hostile_input_every_key_accounted_for(ray_cluster, hostile_shards, tmp_path):
    root, expected = hostile_shards
    corpus = tmp_path / "out" / "corpus"
    summary = run(config(root, corpus, "ray.workers=2"), show_progress=False)
    assert not summary.failed
    assert_invariant(corpus, expected)

    reasons = {
        r["key"]: r["reason"]
        for r in corpus_keys(corpus, "00000")[1]
        if r["reason"] != "duplicate_key"
    }
    assert reasons == {
        "000000001": "empty_file",
        "000000002": "truncated_image",
        "000000003": "not_an_image",
        "000000004": "too_many_pixels",
        "000000005": "missing_image",
    }
    data, rejected = corpus_keys(corpus, "00000")
    assert [r["key"] for r in rejected if r["reason"] == "duplicate_key"] == ["000000000"]
    assert {"000000006", "000000007", "000000008", "../../escape"} <= set(
        data
    )  # CMYK, 16-bit, alpha, odd name
    # The member named ../../escape.jpg wrote nothing outside the corpus.
    assert not list(tmp_path.rglob("escape*"))

    manifest = json.loads((corpus / "manifest.json").read_text())
    assert json.loads((corpus / "commits" / "00001.json").read_text())["truncated"] is True
    assert json.loads((corpus / "commits" / "00000.json").read_text())["truncated"] is False
    assert manifest["totals"]["truncated_shards"] == ["00001"]
    reasons1 = Counter(r["reason"] for r in corpus_keys(corpus, "00001")[1])
    assert reasons1 == {"truncated_member": 1, "missing_from_tar": 2, "download_failed": 1}


def test_images_can_be_left_out_of_the_corpus(ray_cluster, hostile_shards, tmp_path):
    root, _ = hostile_shards
    corpus = tmp_path / "corpus"
    run(config(root, corpus, "output.store_images=false"), show_progress=False)
    images = pq.read_table(
        corpus / "data" / "00000.parquet", columns=["image", "image_sha256"]
    ).to_pylist()
    assert images and all(r["image"] is None and len(r["image_sha256"]) == 64 for r in images)


@pytest.mark.parametrize("bad", ["corrupt"])
def test_a_corrupt_shard_fails_alone(ray_cluster, sample_shards, tmp_path, bad):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("00000.tar", "00000.parquet"):
        (shards / name).write_bytes((sample_shards / name).read_bytes())
    (shards / "00001.parquet").write_bytes(b"PAR1 this is not parquet")  # a parquet-format shard
    summary = run(config(shards, tmp_path / "corpus"), show_progress=False)
    assert [r.shard for r in summary.finished] == ["00000"]
    assert list(summary.failed) == ["00001"] and "\n" not in summary.failed["00001"]
    assert not (tmp_path / "corpus" / "data" / "00001.parquet").exists()
