"""Duplicates and the corpus: what a duplicate row reuses, the rejection it may become, and
the index seeded with what a corpus already holds (this run's committed shards on resume,
and the corpora of `dedup.against`)."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from recaption.config import PipelineConfig
from recaption.corpus import DATA_DIR, Committed, CorpusStore
from recaption.dedup.fingerprint import Fingerprint
from recaption.dedup.index import DedupIndex, pack
from recaption.dedup.shared import SharedIndex
from recaption.errors import ConfigError, Rejected, RunError
from recaption.records import Caption, CaptionRecord, Stage
from recaption.storage import storage_env

# what a duplicate takes from its first occurrence: its key, caption, and cost (saved)
_REUSED = ("key", *Caption.model_fields, "cost_usd")
# settings under which a caption of another corpus is the caption this run would write
_SAME = (
    ("captioner", "backend"),
    ("captioner", "model"),
    ("captioner", "prompt"),
    ("captioner", "image", "max_side"),
    ("captioner", "image", "format"),
    ("captioner", "image", "quality"),
    ("captioner", "image", "detail"),
    ("validation",),
)
SEED_BATCH = 4096
SEED_FILES_PER_TASK = 16  # data files a seeding task reads at least (~160k rows of img2dataset)


class DuplicateImage(Rejected):
    """dedup.mode=reject: the picture is in the corpus under another key."""

    stage = Stage.caption


def local_index(cfg: PipelineConfig) -> SharedIndex:
    """An index of one pass's own (tests, `process_shard`): duplicates within the shard."""
    return SharedIndex(DedupIndex(cfg.dedup.near.max_distance, cfg.dedup.near.enabled))


def reusable(row: CaptionRecord | dict[str, Any]) -> dict[str, Any]:
    """The part of a first occurrence's row that its duplicates reuse."""
    data = row.model_dump() if isinstance(row, CaptionRecord) else row
    return {k: data[k] for k in _REUSED}


def phash_column(fp: Fingerprint | None) -> str | None:
    """`image_phash`: "phash:dhash" in hex, for an image detailed enough to match near."""
    if fp is None or not fp.near_ok:
        return None
    return f"{fp.phash:016x}:{fp.dhash:016x}"


def _fingerprint(sha256: str, column: str | None) -> Fingerprint:
    if not column:
        return Fingerprint(sha256, 0, 0, near_ok=False)  # matched exactly only
    phash, dhash = column.split(":")
    return Fingerprint(sha256, int(phash, 16), int(dhash, 16))


def data_files(store: CorpusStore, only: set[str] | None = None) -> list[str]:
    """The data files of the corpus's committed shards (of those in `only`), one listing."""
    files = store.shard_files(DATA_DIR, ".parquet")
    return [path for sid, path in files.items() if only is None or sid in only]


def originals(store: CorpusStore, paths: list[str], prefix: str = ""):
    """(index key, fingerprint, reusable row zlib'd) of every captioned first occurrence in
    these data files, a row group at a time. The row is packed here, by the reader, not by
    the index partition that every reader sends to (3x less of its CPU, 2.6x fewer bytes).
    `prefix` keeps another corpus's keys apart from this run's (the same crawl has the same
    keys)."""
    columns = ["shard", "image_sha256", *_REUSED]
    for path in paths:
        try:
            data = pq.ParquetFile(path, filesystem=store.arrow_fs)
            names = set(data.schema_arrow.names)
            extra = [c for c in ("image_phash", "duplicate_of") if c in names]  # schema 2 on
            groups = (
                data.read_row_group(g, columns=columns + extra) for g in range(data.num_row_groups)
            )
            for group in groups:
                for row in group.to_pylist():
                    if row.get("duplicate_of"):
                        continue
                    fp = _fingerprint(row["image_sha256"], row.get("image_phash"))
                    packed = pack({k: row[k] for k in _REUSED})
                    yield f"{prefix}{row['shard']}/{row['key']}", fp, packed
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise RunError(
                f"cannot read {path} (its captions seed the duplicate index): {exc}"
                f" (`recaption verify {store.path}` checks the corpus)"
            ) from None


@ray.remote(num_cpus=1)
def _seed_task(
    index: SharedIndex, corpus: str, paths: list[str], prefix: str, env: dict[str, str]
) -> int:
    """One share of a corpus's data files read into the index, on any node of the cluster."""
    for name, value in env.items():  # object-store credentials, held in memory only
        os.environ.setdefault(name, value)
    return asyncio.run(seed(index, [originals(CorpusStore(corpus), paths, prefix)]))


def seed_from_files(
    index: SharedIndex,
    store: CorpusStore,
    paths: list[str],
    prefix: str = "",
    per_task: int = SEED_FILES_PER_TASK,
) -> int:
    """Seed the index from a corpus's data files: read here when they are few, else by Ray
    tasks of `per_task` files or more, at most one a CPU of the cluster. 800M rows cost ~7
    CPU-hours to read (~32 us a row), so a resumed run spreads them over the cluster."""
    tasks = min(math.ceil(len(paths) / per_task), int(ray.cluster_resources().get("CPU", 1)))
    if tasks <= 1:
        return asyncio.run(seed(index, [originals(store, paths, prefix)]))
    env = storage_env()
    shares = [paths[i::tasks] for i in range(tasks)]
    refs = [_seed_task.remote(index, store.path, s, prefix, env) for s in shares]
    try:
        return sum(ray.get(refs))
    except ray.exceptions.RayTaskError as exc:  # a damaged file: the task's one-line error
        raise (exc.cause if isinstance(exc.cause, RunError) else exc) from None


def journaled(store: CorpusStore, skip: set[str]):
    """The same, from the journals of shards an interrupted run left unfinished: their
    answers are replayed without a call, so their duplicates elsewhere need not wait."""
    for path in store.journals():
        if path.stem in skip:
            continue
        for line in path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
                row = entry["row"]
                if entry["kind"] != "data" or row.get("duplicate_of"):
                    continue
                fp = _fingerprint(row["image_sha256"], row.get("image_phash"))
                yield f"{row['shard']}/{row['key']}", fp, {k: row[k] for k in _REUSED}
            except (ValueError, KeyError, TypeError):
                continue  # a torn line: that key is asked again anyway


def check_against(cfg: PipelineConfig, store: CorpusStore) -> None:
    """A corpus of `dedup.against` must have been made as this run makes captions."""
    manifest = store.load_manifest()
    if manifest is None:
        raise ConfigError(f"dedup.against: {store.path} is not a recaption corpus (no manifest)")
    ours = cfg.model_dump(mode="json")
    for path in _SAME:
        theirs, mine = manifest.config, ours
        for part in path:
            theirs, mine = (theirs or {}).get(part), (mine or {}).get(part)
        if theirs != mine:
            raise ConfigError(
                f"dedup.against: {store.path} was made with {'.'.join(path)}={theirs!r}, this "
                f"run uses {mine!r}; its captions are not what this run would write"
            )


async def seed(index: SharedIndex, sources: list[Iterator]) -> int:
    """Put these first occurrences (`originals`, `journaled`) into the index; how many. A
    batch is sent before the next is read, and awaited after: reading and storing overlap."""
    count, batch, sent = 0, [], None
    for source in sources:
        for item in source:
            batch.append(item)
            if len(batch) >= SEED_BATCH:
                if sent is not None:
                    await sent
                sent = asyncio.ensure_future(index.seed(batch))
                await asyncio.sleep(0)  # the calls go out now, while the next batch is read
                count, batch = count + len(batch), []
    if sent is not None:
        await sent
    if batch:
        await index.seed(batch)
        count += len(batch)
    return count


def run_index(
    cfg: PipelineConfig, store: CorpusStore, committed: Committed, run_id: str
) -> SharedIndex | None:
    """The run's duplicate index, holding the first occurrences the corpus already has (a
    resumed run) and those of `dedup.against`; None when the run looks for no duplicates."""
    if cfg.dedup.mode == "off":
        return None
    earlier = [CorpusStore(path) for path in cfg.dedup.against]
    for other in earlier:
        check_against(cfg, other)
    near = cfg.dedup.near
    index = SharedIndex.start(
        cfg.dedup.partitions, near.max_distance, near.enabled, f"recaption-dedup-{run_id}"
    )
    for i, other in enumerate(earlier):
        seed_from_files(index, other, data_files(other), prefix=f"against{i}:")
    if committed.ids:  # a resumed run: what it captioned before is reused, not paid again
        seed_from_files(index, store, data_files(store, committed.ids))
    asyncio.run(seed(index, [journaled(store, skip=committed.ids)]))
    return index
