"""Never pay twice for the same picture: a corpus with 20% exact copies (under other keys,
in other shards) and 10% near copies (resized, re-encoded, cropped a few pixels), run
through the real pipeline on Ray against the loopback OpenAI server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kill_run import kill_after, run_argv, run_here
from openai_server import OpenAIServer
from PIL import Image
from test_pipeline import assert_invariant
from test_resume import expected_keys

from recaption.config import ImageConfig, load_config
from recaption.corpus import CorpusStore
from recaption.dedup import SharedIndex, fingerprint
from recaption.dedup.corpus import data_files, reusable, seed_from_files
from recaption.errors import ConfigError
from recaption.images import prepare
from recaption.pipeline import run
from recaption.report import write_report
from recaption.samples import WebImage, _load_photos, write_shard
from recaption.scenes import random_scene, render
from recaption.verify import verify

KEY = "fake-test-dedup-secret-0123456789"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _fit(im: Image.Image, side: int = 512) -> Image.Image:
    im = im.copy()
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def _near(im: Image.Image, rng: random.Random) -> tuple[Image.Image, int]:
    """Resized, cropped 1-4 px a side, and saved at another quality."""
    w, h = im.size
    c = [rng.randint(1, 4) for _ in range(4)]
    im = im.crop((c[0], c[1], w - c[2], h - c[3]))
    s = rng.uniform(0.6, 0.9)
    return im.resize((round(im.width * s), round(im.height * s))), rng.randint(60, 80)


def _detailed(im: Image.Image) -> bool:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return fingerprint(prepare(buf.getvalue(), ImageConfig())).near_ok


@pytest.fixture(scope="module")
def dup_shards(tmp_path_factory) -> tuple[Path, dict]:
    """3 shards: 60 distinct pictures (15 photos, their mirror images, 30 scenes), then 20%
    exact copies and 10% near copies of them, shuffled across the shards."""
    rng = random.Random(11)
    photos = [_fit(p) for p in _load_photos().values()]
    photos += [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos]
    distinct = [(im, 90) for im in photos] + [(render(random_scene(rng)), 90) for _ in range(30)]
    items = [("original", i, im, q) for i, (im, q) in enumerate(distinct)]
    exact = rng.sample(range(len(distinct)), 18)  # 18 of 90 images: 20%
    items += [("exact", i, *distinct[i]) for i in exact]
    detailed = [i for i, (im, _) in enumerate(distinct) if _detailed(im)]
    for i in rng.sample(detailed, 9):  # 9 of 90: 10%
        items.append(("near", i, *_near(distinct[i][0], rng)))
    rng.shuffle(items)
    out = tmp_path_factory.mktemp("dup-shards")
    for shard in range(3):
        part = items[shard * 30 : (shard + 1) * 30]
        web = [
            WebImage(f"https://x.example/{k}/{i}", "photo", im, quality=q) for k, i, im, q in part
        ]
        write_shard(out, shard, web)
    return out, {"distinct": len(distinct), "exact": 18, "near": 9, "items": len(items)}


def _config(server: OpenAIServer, shards: Path, corpus: Path, *extra: str):
    return load_config(
        "pipelines/openai.yaml",
        [
            f"input.path={shards}",
            f"output.path={corpus}",
            f"captioner.base_url={server.url}",
            "limits.concurrency=4",
            "ray.workers=2",
            *extra,
        ],
    )


def _paid(server: OpenAIServer) -> tuple[int, int]:
    """(successful requests, distinct images among them)."""
    ok = [e for e in server.events if e.status == 200]
    return len(ok), len({e.image for e in ok})


def test_each_picture_is_paid_once_and_its_copies_reuse_its_caption(
    ray_cluster, dup_shards, tmp_path
):
    shards, made = dup_shards
    with OpenAIServer(latency_ms=50, api_key=KEY) as server:
        # the index in two partitions (and their Recent arbiter), as on a cluster
        cfg = _config(server, shards, tmp_path / "c", "dedup.partitions=2")
        summary = run(cfg, show_progress=False)
        paid, pictures = _paid(server)
    assert paid == pictures == made["distinct"]  # exact copies exactly, near copies too
    assert_invariant(tmp_path / "c", expected_keys(shards))
    assert verify(tmp_path / "c", str(shards)).ok
    rows = pq.read_table(tmp_path / "c" / "data").to_pylist()
    by_key = {r["key"]: r for r in rows}
    copies = [r for r in rows if r["duplicate_of"]]
    kinds = Counter(r["duplicate_kind"] for r in copies)
    # an exact copy of a near copy that came first is near to the caption it reuses
    assert kinds["exact"] + kinds["near"] == 27 and kinds["near"] >= 9
    for row in copies:  # the first occurrence's caption, at no cost
        first = by_key[row["duplicate_of"]]
        assert first["duplicate_of"] is None and row["caption"] == first["caption"]
        assert row["cost_usd"] == 0 and row["attempts"] == 0 and row["input_tokens"] == 0
        if row["duplicate_kind"] == "exact":
            assert row["image_sha256"] == first["image_sha256"]
    totals = json.loads((tmp_path / "c" / "manifest.json").read_text())["totals"]
    assert totals["duplicates"] == dict(kinds) and totals["saved_usd"] > 0
    assert sum(r.saved_usd for r in summary.finished) == pytest.approx(totals["saved_usd"])
    page = write_report(tmp_path / "c", sample=10)
    report = json.loads((page.parent / "report.json").read_text())
    assert report["duplicates"] == dict(kinds) and report["saved_usd"] == totals["saved_usd"]
    assert "Duplicates not sent: 27" in page.read_text()

    # what a resumed run (or dedup.against) holds, read by Ray tasks (two, for three files)
    store = CorpusStore(tmp_path / "c")
    index = SharedIndex.start(2, name_prefix="test-seed")
    try:
        count = seed_from_files(index, store, data_files(store), per_task=1)
        assert count == asyncio.run(index.state())["seeded"] == made["distinct"]
        first = next(r for r in rows if not r["duplicate_of"])
        caption = asyncio.run(index.caption(f"{first['shard']}/{first['key']}", 1))
        assert caption == reusable(first)
    finally:
        index.shutdown()


def test_reject_mode_and_dedup_against_an_earlier_corpus(ray_cluster, dup_shards, tmp_path):
    shards, made = dup_shards
    with OpenAIServer(latency_ms=20, api_key=KEY) as server:
        run(_config(server, shards, tmp_path / "r", "dedup.mode=reject"), show_progress=False)
        assert _paid(server)[0] == made["distinct"]
        rejected = pq.read_table(tmp_path / "r" / "rejected").to_pylist()
        dups = [r for r in rejected if r["reason"] == "duplicate_image"]
        assert len(dups) == made["exact"] + made["near"]
        assert all(r["stage"] == "caption" and "duplicate of" in r["detail"] for r in dups)
        assert_invariant(tmp_path / "r", expected_keys(shards))

        # a second crawl of the same pages, into a new corpus: nothing is paid again
        before = _paid(server)[0]
        again = [f"dedup.against=['{tmp_path / 'r'}']"]
        run(_config(server, shards, tmp_path / "second", *again), show_progress=False)
        assert _paid(server)[0] == before
        rows = pq.read_table(tmp_path / "second" / "data").to_pylist()
        assert len(rows) == made["items"] and all(r["duplicate_of"] for r in rows)
        # captions of another model are not what this run would write
        other = [*again, "captioner.model=gpt-4.1-mini"]
        with pytest.raises(ConfigError, match=r"captioner\.model"):
            run(_config(server, shards, tmp_path / "third", *other), show_progress=False)
        off = _config(server, shards, tmp_path / "off", "dedup.mode=off")
        run(off, show_progress=False)
        assert _paid(server)[0] == before + made["items"]


def test_kill_9_mid_run_then_resume_pays_each_picture_once(ray_cluster, dup_shards, tmp_path):
    shards, made = dup_shards
    corpus = tmp_path / "corpus"
    with OpenAIServer(latency_ms=100, api_key=KEY) as server:
        argv = run_argv(
            "pipelines/openai.yaml",
            [f"input.path={shards}", f"output.path={corpus}", f"captioner.base_url={server.url}",
             "limits.concurrency=4", "ray.workers=2", "dedup.partitions=2"],
        )  # fmt: skip
        killed = kill_after(argv, server, 25)
        final = run_here(argv)
        paid, _ = _paid(server)
        ok = [e.image for e in server.events if e.status == 200]
    assert killed and final == 0
    # which picture each paid request showed: a request in flight at the kill is asked again
    # on resume, as itself or as a near copy claimed first then (claim order is a race)
    picture_of = {}
    for row in pq.read_table(corpus / "data", columns=["url", "image"]).to_pylist():
        url = "data:image/jpeg;base64," + base64.b64encode(row["image"]).decode()
        picture_of[hashlib.sha1(url.encode()).hexdigest()[:16]] = row["url"].rsplit("/", 1)[1]
    paid_pictures = Counter(picture_of[image] for image in ok)
    assert len(paid_pictures) == made["distinct"]
    # no copy paid but for those in flight at the kill (2 workers x 4 requests)
    assert paid - made["distinct"] <= 2 * 4
    assert_invariant(corpus, expected_keys(shards))
    assert verify(corpus, str(shards)).ok


def test_the_batch_api_leaves_copies_out_of_its_batches(ray_cluster, dup_shards, tmp_path):
    from test_batch import batch_config

    shards, made = dup_shards
    corpus = tmp_path / "batch"
    with OpenAIServer(api_key=KEY) as server:
        # one shard at a time: each shard's batch is answered before the next is planned,
        # so every copy finds its first occurrence answered or in its own shard's batch (a
        # copy of one pending in another shard's live batch is asked: batches take hours)
        one = "captioner.batch.shards_per_worker=1"
        run(batch_config(server, shards, corpus, one), show_progress=False)
        submitted = server.batch_api.submitted
    assert len(submitted) == sum(submitted.values()) == made["distinct"]
    assert_invariant(corpus, expected_keys(shards))
    rows = pq.read_table(corpus / "data").to_pylist()
    copies = [r for r in rows if r["duplicate_of"]]
    assert len(copies) == made["exact"] + made["near"]
    assert all(r["cost_usd"] == 0 and r["attempts"] == 0 for r in copies)
    by_key = {r["key"]: r for r in rows}
    assert all(r["caption"] == by_key[r["duplicate_of"]]["caption"] for r in copies)
    totals = json.loads((corpus / "manifest.json").read_text())["totals"]
    assert totals["requests"] == made["distinct"] and totals["saved_usd"] > 0


def test_estimate_counts_exact_copies_from_the_download_hashes(dup_shards):
    from recaption.estimate import estimate, lines

    shards, made = dup_shards
    cfg = load_config("pipelines/openai.yaml", [f"input.path={shards}"])
    result = estimate(cfg, sample=20, dry=True)
    assert result["duplicates"]["exact"] == made["exact"]
    assert result["images"] == made["items"] - made["exact"]
    assert result["duplicates"]["saved_usd"] > 0
    assert any(line.startswith("duplicates: ~18 exact copies") for line in lines(result))
    off = load_config("pipelines/openai.yaml", [f"input.path={shards}", "dedup.mode=off"])
    assert estimate(off, sample=20, dry=True)["images"] == made["items"]
