"""The shard pass: one input shard in, its two corpus files out. The one per-sample path.

    samples(shard): read ─▶ prepare ─────────────── (a Rejected at any step: a rejected/ row)
      (read and prepared in a thread pool, a few chunks ahead of the event loop)
      ─▶ the journal has its answer? replay it, no call
      ─▶ answer(): captioner.caption, or the answer `settle` gave ─▶ validate
      ─▶ write: a data/ row and a journal line
    then both files are committed, and the pass reports what the shard became.

`samples` and `answer` are the two pieces others reuse: `recaption estimate` draws and
answers images with them, and a backend that answers whole shards (the Batch API) gets
the shard's unanswered prepared images and the validation rules through a `ShardJob`.

A recommit (`recaption run --retry-rejected`) is the same pass over a committed shard: its
rows are carried over, except the rejections with the reasons asked again, which go the
usual way; both files are then replaced and the driver rewrites the commit record. A
marker (corpus.retry_mark) and the journal make it safe to kill at any point.

At the spend cap (`limits.max_usd`) a sample gets no row: the pass sends nothing more,
lets what is in flight land, and raises BudgetSpent, leaving the shard resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow.parquet as pq

from recaption.captioners.base import Answer, Captioner, CaptionFailure, CaptionResult, ShardJob
from recaption.config import ImageConfig, PipelineConfig, ValidationConfig
from recaption.corpus import DATA_DIR, REJECTED_DIR, CorpusStore, ShardWriter
from recaption.errors import BudgetSpent, CaptionerFatal, Rejected, Unreadable
from recaption.images import PreparedImage, prepare
from recaption.journal import Journal
from recaption.records import Caption, CaptionRecord, Reason, Rejection, ShardReport, Stage, Usage
from recaption.sources import Sample, Shard, read_samples
from recaption.validation import validate_caption

_TRUNCATION = {Reason.truncated_member, Reason.missing_from_tar}
PREPARE_CHUNK = 8  # samples a thread reads or prepares at once: a hand-off costs ~50 us


def image_pool(cfg: PipelineConfig) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(cfg.captioner.image.threads, thread_name_prefix="prepare")


OnSample = Callable[[Usage, bool], None]  # (what the sample cost, rejected?) as it is written


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


async def prepared_samples(
    shard: Shard,
    image: ImageConfig,
    pool: ThreadPoolExecutor,
    timer: Timer,
    skip: Callable[[str], bool] | None = None,
    depth: int = 4,
) -> AsyncIterator[tuple[Sample, PreparedImage | Rejected]]:
    """`samples`, read and prepared in `pool`'s threads (Pillow and zlib release the GIL), so
    that the event loop keeps sending requests and reading replies meanwhile and a worker
    uses more than one core. In shard order; at most `depth` chunks ahead of the caller."""
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
            ahead.append(loop.run_in_executor(pool, _prepared_chunk, chunk, image))
        if ahead:
            chunk_out, local = await ahead.popleft()
            timer.update(local)
            for item in chunk_out:
                yield item


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
    chunk: list[Sample], image: ImageConfig
) -> tuple[list[tuple[Sample, PreparedImage | Rejected]], Timer]:
    timer = Timer()  # one per chunk: threads do not share a counter
    return list(_prepare(chunk, image, timer)), timer


async def answer(
    captioner: Captioner,
    image: PreparedImage,
    rules: ValidationConfig,
    given: Answer | None = None,
    timer: Timer | None = None,
) -> tuple[CaptionResult, Caption]:
    """Answer one prepared image and validate the caption: (the result, the caption as it is
    stored). Raises Rejected, carrying what the attempts cost, when it gets no caption."""
    timer = timer if timer is not None else Timer()
    t0 = time.perf_counter()
    with timer("caption"):
        try:
            if isinstance(given, CaptionFailure):
                raise given
            if isinstance(given, CaptionResult):
                result = given
            else:
                result = await (given or captioner.caption)(image)
        except (Rejected, CaptionerFatal, BudgetSpent):
            raise  # a rejection for this image; or nothing more can be captioned
        except Exception as exc:  # a backend bug must cost one row, not the shard
            detail = f"{type(exc).__name__}: {exc}"
            raise CaptionFailure(Reason.caption_error, detail, Usage(attempts=1)) from None
    if result.latency_ms is None:
        result.latency_ms = (time.perf_counter() - t0) * 1000
    with timer("validate"):
        try:
            return result, validate_caption(result.caption, rules)
        except Rejected as exc:
            exc.usage = result.usage  # the caption was paid for
            raise


class ShardPass:
    """Caption one shard and commit its output; every sample ends in data/ or rejected/.
    `in_flight` bounds the images being captioned and `pool` prepares them; a worker shares
    both across its shards.
    `retry`: the shard is committed; recommit it, asking its rejections with these reasons
    again."""

    def __init__(
        self,
        shard: Shard,
        cfg: PipelineConfig,
        captioner: Captioner,
        on_sample: OnSample | None = None,
        in_flight: asyncio.Semaphore | None = None,
        retry: frozenset[str] | None = None,
        pool: ThreadPoolExecutor | None = None,
    ):
        self.shard, self.cfg, self.captioner, self.retry = shard, cfg, captioner, retry
        self.on_sample = on_sample or (lambda usage, rejected: None)
        self.in_flight = in_flight or asyncio.Semaphore(cfg.limits.concurrency)
        self.own_pool = pool is None
        self.pool = pool or image_pool(cfg)
        self.store = CorpusStore(cfg.output.path, cfg.output.staging)
        self.writer = ShardWriter(self.store, shard.id, cfg.output.row_group_size)
        # what an earlier, unfinished run of this shard already answered
        self.journal = Journal(self.store.local, shard.id, enabled=cfg.output.journal)
        self.timer = Timer()
        self.usage = Usage()  # every attempt of the shard's samples, rejected ones included
        self.rejected: Counter[str] = Counter()
        self.samples = self.resumed = 0
        self.deferred = 0  # samples left unanswered at the spend cap
        self.prior: ShardReport | None = None  # a recommit: the report it starts from

    async def run(self) -> ShardReport:
        started = time.perf_counter()
        tasks: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            self.in_flight.release()

        try:
            skip = self.carry_over() if self.retry is not None else None
            # a backend that answers whole shards does so first; the pass below writes them
            answers = await self.captioner.settle(self.job())
            image_cfg = self.cfg.captioner.image
            depth = 2 * image_cfg.threads  # every thread busy, and one chunk more each
            images = prepared_samples(self.shard, image_cfg, self.pool, self.timer, skip, depth)
            async for sample, image in images:
                if self.deferred:  # the spend cap: send nothing more, let the rest land
                    break
                self.samples += 1
                if isinstance(image, Rejected):
                    self.reject(sample, image)
                elif sample.key in self.journal.answered:
                    self.replay(sample, image, self.journal.answered[sample.key])
                else:
                    await self.in_flight.acquire()  # at most `limits.concurrency` in flight
                    given = answers.pop(sample.key, None)
                    task = asyncio.create_task(self.caption(sample, image, given))
                    tasks.add(task)
                    task.add_done_callback(finished)
                    # let requests go out (and a local VLM's batcher run) while the next
                    # images are read and prepared, not only once the in-flight bound is hit
                    await asyncio.sleep(0)
            await asyncio.gather(*tasks)
            if self.deferred:
                raise BudgetSpent(f"shard {self.shard.id}: {self.deferred} samples wait")
            with self.timer("write"):
                self.writer.commit()
        except BaseException:
            for task in tasks:  # a worker's event loop outlives the shard: leave nothing running
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.writer.abort()
            raise
        finally:
            self.journal.close()  # kept until the manifest records the shard; the driver removes it
            if self.own_pool:
                self.pool.shutdown(wait=False)
        self.timer["total_s"] = time.perf_counter() - started
        return self.report()

    async def caption(self, sample: Sample, image: PreparedImage, given: Answer | None) -> None:
        try:
            result, caption = await answer(
                self.captioner, image, self.cfg.validation, given, self.timer
            )
        except Rejected as exc:
            return self.reject(sample, exc)
        except BudgetSpent:
            self.deferred += 1
            return
        with self.timer("write"):
            self.write(sample, image, result, caption)

    # -- what becomes of a sample ---------------------------------------------------------------

    def write(
        self, sample: Sample, image: PreparedImage, result: CaptionResult, caption: Caption
    ) -> None:
        record = CaptionRecord(
            key=sample.key,
            shard=self.shard.id,
            url=sample.url,
            alt_text=sample.alt_text,
            image=image.data if self.cfg.output.store_images else None,
            image_sha256=image.sha256,
            width=image.width,
            height=image.height,
            **caption.model_dump(),
            model=self.captioner.model,
            backend=self.captioner.backend,
            prompt_version=self.captioner.prompt_version,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cost_usd=result.cost_usd,
            attempts=result.attempts,
            latency_ms=round(result.latency_ms or 0.0, 3),
            created_at=datetime.now(UTC),
        )
        self.writer.add(record)
        self.usage.add(result.usage)
        self.journal.record(
            "data", record.model_dump(mode="json", exclude={"image"}), result.usage.spent()
        )
        self.on_sample(result.usage, False)

    def reject(self, sample: Sample, exc: Rejected) -> None:
        rejection = Rejection(
            key=sample.key,
            shard=self.shard.id,
            url=sample.url,
            stage=exc.stage,
            reason=exc.reason,
            detail=exc.detail[:500],
            attempts=exc.attempts,
        )
        self.writer.reject(rejection)
        self.usage.add(exc.usage)
        if exc.stage in (Stage.caption, Stage.validate):  # the captioner was asked: never again
            self.journal.record("rejected", rejection.model_dump(mode="json"), exc.usage.spent())
        self.rejected[exc.reason] += 1
        self.on_sample(exc.usage, True)

    def replay(self, sample: Sample, image: PreparedImage, entry: dict) -> None:
        """A key answered before this shard was interrupted: its row, without a new call."""
        spent = Usage.from_spent(entry["spent"])
        self.usage.add(spent)
        self.resumed += 1
        if entry["kind"] == "data":
            row = entry["row"] | {
                "image": image.data if self.cfg.output.store_images else None,
                "image_sha256": image.sha256,
                "width": image.width,
                "height": image.height,
            }
            self.writer.add(CaptionRecord.model_validate(row))
        else:
            self.writer.reject(Rejection.model_validate(entry["row"]))
            self.rejected[entry["row"]["reason"]] += 1
        self.on_sample(spent, entry["kind"] != "data")

    # -- a recommit -----------------------------------------------------------------------------

    def carry_over(self) -> Callable[[str], bool]:
        """Copy the committed shard's rows into the new files, except the rejections asked
        again and the keys this recommit already answered (its journal); returns the skip
        rule for the pass: every key but those."""
        assert self.retry is not None
        self.prior = self.store.mark_retry(self.shard.id, self.retry)
        answered = self.journal.answered
        fs, sid = self.store.arrow_fs, self.shard.id
        rejected = pq.read_table(self.store.where(f"{REJECTED_DIR}/{sid}.parquet"), filesystem=fs)
        rejected = rejected.to_pylist()
        redo = {r["key"] for r in rejected if r["reason"] in self.retry}
        ask = redo | set(answered)  # these keys go through the pass, repeats and all
        for row in rejected:
            if row["key"] not in ask:
                self.writer.rejected.add(row)
                self.rejected[row["reason"]] += 1
        data = pq.ParquetFile(self.store.where(f"{DATA_DIR}/{sid}.parquet"), filesystem=fs)
        for group in range(data.num_row_groups):  # a row group at a time: images are big
            for row in data.read_row_group(group).to_pylist():
                if row["key"] not in ask:
                    self.writer.data.add(row)
        return lambda key: key not in ask

    # -- for a backend that answers whole shards --------------------------------------------------

    def job(self) -> ShardJob:
        return ShardJob(
            id=self.shard.id,
            state=self.store.batch_state_path(self.shard.id),
            images=self.unanswered,
            validate=lambda caption: validate_caption(caption, self.cfg.validation),
        )

    def unanswered(self, skip: Callable[[str], bool]) -> Iterator[tuple[str, PreparedImage]]:
        """Prepared images the journal holds no answer for; unreadable and undecodable ones
        are left to the pass, which rejects them."""
        answered = self.journal.answered
        for sample, image in samples(
            self.shard, self.cfg.captioner.image, skip=lambda key: key in answered or skip(key)
        ):
            if not isinstance(image, Rejected):
                yield sample.key, image

    def report(self) -> ShardReport:
        outcomes = Counter(self.usage.outcomes)
        requests = outcomes.pop("requests", 0)
        before = self.prior  # a recommit: what the shard cost and asked before it
        if before is not None:
            outcomes.update(before.request_outcomes)
            requests += before.requests
            self.usage.input_tokens += before.input_tokens
            self.usage.output_tokens += before.output_tokens
            self.usage.cost_usd += before.cost_usd
        return ShardReport(
            shard=self.shard.id,
            source=str(self.shard.path),
            samples=before.samples if before is not None else self.samples,
            captioned=self.writer.data.count,
            rejected=self.writer.rejected.count,
            rejected_by_reason=dict(sorted(self.rejected.items())),
            truncated=any(reason in _TRUNCATION for reason in self.rejected),
            input_tokens=self.usage.input_tokens,
            output_tokens=self.usage.output_tokens,
            cost_usd=self.usage.cost_usd,
            requests=requests,
            request_outcomes=dict(sorted(outcomes.items())),
            resumed=self.resumed,
            backend=self.captioner.backend,
            model=self.captioner.model,
            prompt_version=self.captioner.prompt_version,
            timings={k: round(v, 4) for k, v in sorted(self.timer.items())},
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            worker=f"{socket.gethostname()}:{os.getpid()}",
            finished_at=datetime.now(UTC),
        )


def process_shard(
    shard: Shard, cfg: PipelineConfig, captioner: Captioner, on_sample: OnSample | None = None
) -> ShardReport:
    """The shard pass on its own event loop (tests, benchmarks, one process)."""

    async def once() -> ShardReport:
        try:
            return await ShardPass(shard, cfg, captioner, on_sample).run()
        finally:
            await captioner.aclose()  # its connections belong to this event loop

    return asyncio.run(once())
