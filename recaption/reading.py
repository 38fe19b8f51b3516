"""Reading a shard's samples and preparing their images, in shard order: `samples` in the
calling thread (estimate, the Batch API's job), `prepared_chunks` in a worker's thread pool
beside its event loop (the shard pass). A sample that cannot be read or decoded comes with
the Rejected that stops it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from recaption.config import ImageConfig, PipelineConfig
from recaption.dedup import fingerprint
from recaption.errors import Rejected, Unreadable
from recaption.images import PreparedImage, prepare
from recaption.sources import Sample, Shard, read_samples

PREPARE_CHUNK = 8  # samples a thread reads or prepares at once: a hand-off costs ~50 us


def image_pool(cfg: PipelineConfig) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(cfg.captioner.image.threads, thread_name_prefix="prepare")


class Timer(Counter[str]):
    """Seconds per step, as `with timer("read"): ...` adds them up under `read_s`."""

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[f"{step}_s"] += time.perf_counter() - t0


def samples(
    shard: Shard,
    image: ImageConfig,
    timer: Timer | None = None,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[Sample, PreparedImage | Rejected]]:
    """Every sample of the shard with its prepared image, or the reason it has none. A key
    for which `skip` says so is passed over before its image is decoded."""
    timer = timer if timer is not None else Timer()
    stream = read_samples(shard)
    while chunk := _read(stream, skip, 1, timer):
        yield from _prepare(chunk, image, timer)


async def prepared_chunks(
    shard: Shard,
    image: ImageConfig,
    pool: ThreadPoolExecutor,
    timer: Timer,
    skip: Callable[[str], bool] | None = None,
    depth: int = 4,
    fingerprints: str | None = None,
) -> AsyncIterator[list[tuple[Sample, PreparedImage | Rejected]]]:
    """`samples` a chunk at a time, read and prepared in `pool`'s threads (Pillow and zlib
    release the GIL), so that the event loop keeps sending requests and reading replies
    meanwhile and a worker uses more than one core. In shard order; at most `depth` chunks
    ahead of the caller. `fingerprints` "exact" or "near": each prepared image also gets its
    dedup fingerprint (the sha alone, or with its perceptual hashes)."""
    loop = asyncio.get_running_loop()
    stream = read_samples(shard)
    ahead: deque[asyncio.Future] = deque()
    done = False
    while ahead or not done:
        while not done and len(ahead) < depth:
            # reads are sequential (one stream), each awaited before the next is asked
            local = Timer()
            chunk = await loop.run_in_executor(pool, _read, stream, skip, PREPARE_CHUNK, local)
            timer.update(local)
            if not chunk:
                done = True
                break
            ahead.append(loop.run_in_executor(pool, _prepared_chunk, chunk, image, fingerprints))
        if ahead:
            chunk_out, local = await ahead.popleft()
            timer.update(local)
            yield chunk_out


def _read(
    stream: Iterator[Sample], skip: Callable[[str], bool] | None, n: int, timer: Timer
) -> list[Sample]:
    """Up to `n` samples of the stream that `skip` does not pass over ([] at its end)."""
    chunk: list[Sample] = []
    while len(chunk) < n:
        with timer("read"):
            sample = next(stream, None)
        if sample is None:
            break
        if skip is None or not skip(sample.key):
            chunk.append(sample)
    return chunk


def _prepare(
    chunk: list[Sample], image: ImageConfig, timer: Timer
) -> Iterator[tuple[Sample, PreparedImage | Rejected]]:
    for sample in chunk:
        if sample.error is not None:
            yield sample, Unreadable(*sample.error)
            continue
        with timer("prepare"):
            try:
                prepared: PreparedImage | Rejected = prepare(sample.image, image)
            except Rejected as exc:
                prepared = exc
            finally:
                sample.image = None  # the raw bytes are not needed past this point
        yield sample, prepared


def _prepared_chunk(
    chunk: list[Sample], image: ImageConfig, fingerprints: str | None
) -> tuple[list[tuple[Sample, PreparedImage | Rejected]], Timer]:
    timer = Timer()  # one per chunk: threads do not share a counter
    out = list(_prepare(chunk, image, timer))
    if fingerprints:
        with timer("dedup"):
            for _, prepared in out:
                if isinstance(prepared, PreparedImage):
                    prepared.fingerprint = fingerprint(prepared, fingerprints == "near")
    return out, timer


async def batched(chunks: AsyncIterator[list], n: int) -> AsyncIterator[list]:
    """Chunks joined into batches of at least `n` items (the last one may hold fewer)."""
    batch: list = []
    async for chunk in chunks:
        batch.extend(chunk)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch
