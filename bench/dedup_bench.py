"""Dedup index figures: CPU per image of fingerprint + lookup beside the cost of preparing it,
index memory per million images (with and without captions), shared-index claims/s from 4
worker processes with 1 and several partitions, how often concurrent near copies both
become originals, and how fast a resumed run (or `dedup.against`) seeds the index from a
corpus's data files, in the driver and by a Ray task per CPU.

    .venv/bin/python bench/dedup_bench.py [--entries 1000000] [--claims 20000] [--pipeline-ms 2.8,19.9]
        [--seed-rows 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import pickle
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from recaption.config import ImageConfig
from recaption.corpus import CorpusStore
from recaption.dedup import DedupIndex, Fingerprint, SharedIndex, fingerprint
from recaption.dedup.corpus import data_files, originals, seed, seed_from_files
from recaption.images import prepare
from recaption.samples import _load_photos
from recaption.shard import CLAIM_BATCH

CAPTION = {  # about 100 words, the shape of a caption row
    "caption": " ".join(["a woman in a white space suit holds a helmet beside a flag"] * 9),
    "caption_short": "An astronaut in a white suit beside a flag.",
    "objects": ["astronaut", "space suit", "flag", "helmet"],
    "visible_text": [],
    "style": "photograph",
}


def cpu_ms(fn, reps: int) -> float:
    """Steady-state CPU per call: a first round warms caches and allocators (the first few
    hundred fingerprints of a process cost ~1.6x the rest)."""
    for _ in range(reps):
        fn()
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps * 1000


def random_fp(rng: random.Random) -> Fingerprint:
    return Fingerprint(f"{rng.getrandbits(256):064x}", rng.getrandbits(64), rng.getrandbits(64))


def build(entries: int) -> tuple[DedupIndex, int, int]:
    """An index of `entries` originals with captions; bytes without and with captions."""
    rng = random.Random(2)
    batches = [
        [(f"{i + j:09d}", random_fp(rng)) for j in range(1000)] for i in range(0, entries, 1000)
    ]
    tracemalloc.start()
    index = DedupIndex()
    base = tracemalloc.get_traced_memory()[0]
    for batch in batches:
        index.claim(batch)
    bare = tracemalloc.get_traced_memory()[0] - base
    for batch in batches:
        index.answered_many([(key, CAPTION) for key, _ in batch])
    full = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return index, bare, full


def per_image(index: DedupIndex, reps: int, pipeline_ms: list[float]) -> None:
    photo = _load_photos()["astronaut"]
    photo.thumbnail((512, 512), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    auto, always = ImageConfig(), ImageConfig(reencode="always")
    passed, decoded = prepare(data, auto), prepare(data, always)
    assert passed.passed_through and decoded.decoded is not None
    rng, keys = random.Random(1), iter(range(10**9))
    claims = [
        [(f"q{next(keys)}", random_fp(rng)) for _ in range(CLAIM_BATCH)] for _ in range(2 * reps)
    ]
    batches = iter(claims)
    rows = {
        "prepare (reencode auto, passed through)": cpu_ms(lambda: prepare(data, auto), reps),
        "prepare (reencode always)": cpu_ms(lambda: prepare(data, always), reps),
        "fingerprint, passed-through JPEG": cpu_ms(lambda: fingerprint(passed), reps),
        "fingerprint, decoded image": cpu_ms(lambda: fingerprint(decoded), reps),
        f"claim, {CLAIM_BATCH} a call, per image": cpu_ms(lambda: index.claim(next(batches)), reps)
        / CLAIM_BATCH,
    }
    print(f"\nCPU per image, 512-px JPEG ({len(data) // 1024} KiB), index of"
          f" {len(index.keys):,} originals, {index.multi.m} blocks")  # fmt: skip
    for name, ms in rows.items():
        print(f"  {name:42s} {ms:7.3f} ms")
    claim = rows[f"claim, {CLAIM_BATCH} a call, per image"]
    cases = (
        ("passed through", "fingerprint, passed-through JPEG"),
        ("re-encoded", "fingerprint, decoded image"),
    )
    for (case, fp), pipe in zip(cases, pipeline_ms, strict=True):
        cost = rows[fp] + claim
        print(f"  {case}: fingerprint + claim {cost:.2f} ms = {cost / pipe:.1%} of the pipeline's"
              f" {pipe} ms per request (--pipeline-ms)")  # fmt: skip


def memory(entries: int, bare: int, full: int, index: DedupIndex) -> None:
    per_m = 1_000_000 / entries / 2**20
    print(f"\nindex memory ({entries:,} originals, 9-char keys, tracemalloc)")
    print(f"  without captions: {bare * per_m:7.0f} MiB per million ({bare / entries:.0f} B/entry)")
    print(f"  with captions:    {full * per_m:7.0f} MiB per million ({full / entries:.0f} B/entry,"
          f" caption zlib'd {index.state()['caption_bytes'] / entries:.0f} B)")  # fmt: skip


@ray.remote(num_cpus=0)
class Worker:
    def __init__(self, index: SharedIndex):
        self.index = index

    def run(self, items: list, batch: int) -> tuple[float, list]:
        async def go():
            out = []
            start = time.perf_counter()
            for i in range(0, len(items), batch):
                out += await self.index.claim(items[i : i + batch])
            return time.perf_counter() - start, out

        return asyncio.run(go())


def shared(claims: int, partitions: list[int], batch: int = 64) -> None:
    print(f"\nshared index, 4 worker processes, batches of {batch}")
    rng = random.Random(3)
    for n in partitions:
        index = SharedIndex.start(n, name_prefix=f"bench-dedup-{n}")
        workers = [Worker.remote(index) for _ in range(4)]
        # each original in one worker, a 2-bit near copy of it in the next, at the same moment
        base = [random_fp(rng) for _ in range(claims // 2)]
        near = [Fingerprint(f"{rng.getrandbits(256):064x}", f.phash ^ 0b101, f.dhash) for f in base]
        share = [[] for _ in range(4)]
        for i, (a, b) in enumerate(zip(base, near, strict=True)):
            share[i % 4].append((f"o{i}", a))
            share[(i + 1) % 4].append((f"n{i}", b))
        ray.get([w.run.remote([], batch) for w in workers])  # warm
        start = time.perf_counter()
        results = ray.get([w.run.remote(s, batch) for w, s in zip(workers, share, strict=True)])
        wall = time.perf_counter() - start
        kinds = {
            key: c
            for s, (_, out) in zip(share, results, strict=True)
            for (key, _), c in zip(s, out, strict=True)
        }
        both_new = sum(
            kinds[f"n{i}"].kind == "new" and kinds[f"o{i}"].kind == "new" for i in range(len(base))
        )
        print(f"  {n} partition(s): {claims / wall:8.0f} claims/s  ({claims:,} claims in {wall:.1f} s;"
              f" near copies claimed at the same moment as their original that became originals"
              f" too: {both_new / len(base):.2%})")  # fmt: skip
        for w in workers:
            ray.kill(w)
        index.shutdown()


def seeding(rows: int, partitions: int = 2, shards: int = 40) -> None:
    """A committed corpus's first occurrences read into a fresh index, two ways."""
    print(f"\nseeding {partitions} partitions from {rows:,} rows in {shards} data files")
    rng = random.Random(4)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").mkdir()
        per = rows // shards
        for sid in range(shards):
            fps = [random_fp(rng) for _ in range(per)]
            table = {
                "shard": [f"{sid:05d}"] * per,
                "key": [f"{sid:05d}{i:04d}" for i in range(per)],
                "image_sha256": [f.sha256 for f in fps],
                **{k: [v] * per for k, v in CAPTION.items()},
                "cost_usd": [0.0004] * per,
                "image_phash": [f"{f.phash:016x}:{f.dhash:016x}" for f in fps],
                "duplicate_of": [None] * per,
            }
            pq.write_table(pa.table(table), Path(tmp) / "data" / f"{sid:05d}.parquet")
        store = CorpusStore(tmp)
        paths = data_files(store)
        start = time.process_time()
        items = list(originals(store, paths))
        read_us = (time.process_time() - start) / len(items) * 1e6
        blobs = [pickle.dumps(items[i : i + 4096]) for i in range(0, len(items), 4096)]
        local, start = DedupIndex(), time.process_time()
        for blob in blobs:  # what a partition does with a batch: unpickle it, store it
            local.seed(pickle.loads(blob))
        store_us = (time.process_time() - start) / len(items) * 1e6
        del items, blobs, local
        print(f"  CPU a row: reading {read_us:.1f} us (caption zlib'd), a partition"
              f" storing it {store_us:.1f} us; 800M rows: {800e6 * read_us / 3.6e9:.1f}"
              f" CPU-hours of reading over the cluster's CPUs, {800e6 * store_us / 3.6e9:.1f}"
              f" over the partitions")  # fmt: skip
        ways = {
            "in the driver": lambda index: asyncio.run(seed(index, [originals(store, paths)])),
            "a task per CPU": lambda index: seed_from_files(index, store, paths, per_task=1),
        }
        for name, way in ways.items():
            index = SharedIndex.start(partitions, name_prefix=f"bench-seed-{len(name)}")
            start = time.perf_counter()
            count = way(index)
            wall = time.perf_counter() - start
            assert count == per * shards, count
            print(f"  {name:16s} {count / wall:8.0f} rows/s  ({wall:.1f} s, this machine)")
            index.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--claims", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--partitions", default="1,4")
    ap.add_argument("--seed-rows", type=int, default=200_000)
    # client CPU per request of `bench/openai_bench.py --only floor` (its steady middle), pass-
    # through with dedup off and re-encode (with near dedup, as it runs there; this machine,
    # 6 December 2026): what the dedup cost is a share of
    ap.add_argument("--pipeline-ms", default="2.8,19.9")
    args = ap.parse_args()
    index, bare, full = build(args.entries)
    per_image(index, args.reps, [float(x) for x in args.pipeline_ms.split(",")])
    memory(args.entries, bare, full, index)
    del index
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        shared(args.claims, [int(p) for p in args.partitions.split(",")])
        seeding(args.seed_rows)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
