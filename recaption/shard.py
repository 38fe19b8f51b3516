"""The shard pass: one input shard in, its two corpus files out. The one per-sample path.

    prepared_chunks(shard): read ─▶ prepare, in threads ── (a Rejected: a rejected/ row)
      ─▶ dedup claim, CLAIM_BATCH at a time: a copy waits for its first occurrence's caption
      ─▶ the journal has its answer? replay it, no call
      ─▶ answer.answer(): captioner.caption, or the answer `settle` gave ─▶ validate
      ─▶ write: a data/ row and a journal line
    then both files are committed, and the pass reports what the shard became.

`reading.samples` and `answer.answer` are the two pieces others reuse: `recaption estimate` draws
and answers images with them, and a backend that answers whole shards (the Batch API) gets
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
import os
import resource
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow.parquet as pq

from recaption.answer import answer
from recaption.captioners.base import Answer, Captioner, CaptionResult, ShardJob
from recaption.config import PipelineConfig
from recaption.corpus import DATA_DIR, REJECTED_DIR, CorpusStore, ShardWriter
from recaption.dedup import Claim, SharedIndex
from recaption.dedup.corpus import DuplicateImage, local_index, phash_column, reusable
from recaption.errors import BudgetSpent, Rejected
from recaption.images import PreparedImage
from recaption.journal import Journal
from recaption.reading import PREPARE_CHUNK, Timer, batched, image_pool, prepared_chunks, samples
from recaption.records import Caption, CaptionRecord, Reason, Rejection, ShardReport, Stage, Usage
from recaption.sources import Sample, Shard
from recaption.validation import validate_caption

_TRUNCATION = {Reason.truncated_member, Reason.missing_from_tar}
OnSample = Callable[[Usage, bool], None]  # (what the sample cost, rejected?) as it is written
CLAIM_BATCH = 64  # samples claimed at once from the run's dedup index: a call is ~1-3 ms of CPU


class ShardPass:
    """Caption one shard and commit its output; every sample ends in data/ or rejected/.
    `in_flight` bounds the images being captioned and `pool` prepares them; a worker shares
    both across its shards.
    `retry`: the shard is committed; recommit it, asking its rejections with these reasons
    again. `index`: the run's duplicate index (dedup.mode reuse | reject)."""

    def __init__(
        self,
        shard: Shard,
        cfg: PipelineConfig,
        captioner: Captioner,
        on_sample: OnSample | None = None,
        in_flight: asyncio.Semaphore | None = None,
        retry: frozenset[str] | None = None,
        pool: ThreadPoolExecutor | None = None,
        index: SharedIndex | None = None,
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
        # the run's duplicate index (a local one for a pass on its own); None: dedup is off
        looks = cfg.dedup.mode != "off"
        self.index = (index or local_index(cfg)) if looks else None
        self.originals: set[str] = set()  # keys claimed first: their duplicates wait on them
        self.copies: set[str] = set()  # left out of the shard's batch: they reuse a caption
        self.waiting = asyncio.Semaphore(4 * cfg.limits.concurrency)  # duplicates waiting
        self.duplicates: Counter[str] = Counter()
        self.saved_usd = 0.0

    async def run(self) -> ShardReport:
        started = time.perf_counter()
        tasks: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            self.in_flight.release()

        try:
            skip = self.carry_over() if self.retry is not None else None
            if self.captioner.answers_shards and self.index is not None:
                await self.plan_copies(skip)
            # a backend that answers whole shards does so first; the pass below writes them
            answers = await self.captioner.settle(self.job())
            async for chunk in self.chunks(skip):
                if self.deferred:  # the spend cap: send nothing more, let the rest land
                    break
                claims = await self.claim(chunk)
                for sample, image in chunk:
                    if self.deferred:
                        break
                    self.samples += 1
                    if isinstance(image, Rejected):
                        self.reject(sample, image)
                    elif sample.key in self.journal.answered:
                        self.replay(sample, image, self.journal.answered[sample.key])
                    elif (
                        (claim := claims.get(sample.key)) is not None
                        and claim.kind != "new"
                        and sample.key not in answers  # a batch answered it: paid, its own
                        and (not self.captioner.answers_shards or sample.key in self.copies)
                    ):
                        # waits for its first occurrence's caption without holding a request
                        # slot (that caption may be waiting for one)
                        await self.waiting.acquire()
                        task = asyncio.create_task(self.duplicate(sample, image, claim))
                        tasks.add(task)
                        task.add_done_callback(lambda t: (tasks.discard(t), self.waiting.release()))
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
            if self.index is not None:
                self.index.flush()  # the last answers, for copies waiting on other workers
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
            self.reject(sample, exc)
            return await self.answered(sample, None)
        except BudgetSpent:
            self.deferred += 1
            return await self.answered(sample, None)
        with self.timer("write"):
            record = self.write(sample, image, result, caption)
        await self.answered(sample, record)

    def chunks(self, skip: Callable[[str], bool] | None) -> AsyncIterator[list]:
        """The shard's samples with their prepared images (and fingerprints, when looking
        for duplicates: then CLAIM_BATCH at a time), in shard order."""
        image_cfg = self.cfg.captioner.image
        depth = 2 * image_cfg.threads  # every thread busy, and one chunk more each
        kind = None if self.index is None else "near" if self.cfg.dedup.near.enabled else "exact"
        if kind:  # a claim batch's worth more, prepared while the last batch goes out
            depth += CLAIM_BATCH // PREPARE_CHUNK
        chunks = prepared_chunks(self.shard, image_cfg, self.pool, self.timer, skip, depth, kind)
        return batched(chunks, CLAIM_BATCH) if kind else chunks

    # -- duplicates (dedup.mode reuse | reject) ---------------------------------------------------

    async def plan_copies(self, skip: Callable[[str], bool] | None) -> None:
        """A backend that answers whole shards (the Batch API): claim the shard's images
        before its batch is written. A copy whose first occurrence has its caption, or is
        in this shard (its answer comes with this batch), is left out of the batch and
        reuses it; a copy of one still pending in another shard's batch is asked (a batch
        may take hours: waiting for it would hold this shard as long). With several shards
        in batches at once, a resumed run may claim in another order and ask such a copy
        it left out before: once, never a key twice."""
        async for chunk in self.chunks(skip):
            for key, claim in (await self.claim(chunk)).items():
                here = claim.original is not None and claim.original.startswith(f"{self.shard.id}/")
                if claim.kind != "new" and (claim.caption is not None or here):
                    self.copies.add(key)

    def _index_key(self, key: str) -> str:
        return f"{self.shard.id}/{key}"  # keys are unique within a shard only

    async def claim(self, chunk: list[tuple[Sample, PreparedImage | Rejected]]) -> dict:
        """Claim the chunk's images that will be asked: key -> Claim ("new": this is the
        first occurrence in the run). Rows replayed from the journal are seeded instead."""
        if self.index is None:
            return {}
        asked, seeded = [], []
        for sample, image in chunk:
            if not isinstance(image, PreparedImage) or image.fingerprint is None:
                continue
            entry = self.journal.answered.get(sample.key)
            if entry is None:
                asked.append((self._index_key(sample.key), image.fingerprint))
            elif entry["kind"] == "data" and not entry["row"].get("duplicate_of"):
                seeded.append(
                    (self._index_key(sample.key), image.fingerprint, reusable(entry["row"]))
                )
        if seeded:
            await self.index.seed(seeded)
        if not asked:
            return {}
        claims = await self.index.claim(asked)
        out = {}
        for (ikey, _), claim in zip(asked, claims, strict=True):
            key = ikey.split("/", 1)[1]
            out[key] = claim
            if claim.kind == "new":
                self.originals.add(key)
        return out

    async def answered(self, sample: Sample, record: CaptionRecord | None) -> None:
        """A first occurrence got its caption (or none): its duplicates may go on."""
        if self.index is not None and sample.key in self.originals:
            await self.index.answered(
                self._index_key(sample.key), reusable(record) if record is not None else None
            )

    async def duplicate(self, sample: Sample, image: PreparedImage, claim: Claim) -> None:
        started = time.perf_counter()
        assert self.index is not None
        first = claim.caption or await self.index.caption(claim.original, self.cfg.dedup.wait_s)
        if first is None:  # its first occurrence got no caption (or is lost): ask this one
            self.originals.add(sample.key)
            await self.in_flight.acquire()
            try:
                return await self.caption(sample, image, None)
            finally:
                self.in_flight.release()
        original = first["key"]  # a copy of a copy reuses (and names) the first occurrence
        kind = claim.kind if original == claim.original.split("/", 1)[1] else "near"
        self.duplicates[kind] += 1
        self.saved_usd += first.get("cost_usd", 0.0)
        if self.cfg.dedup.mode == "reject":
            detail = f"{kind} duplicate of {original}"
            return self.reject(sample, DuplicateImage(Reason.duplicate_image, detail))
        result = CaptionResult(
            caption=Caption(**{k: first[k] for k in Caption.model_fields}),
            usage=Usage(attempts=0),
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        with self.timer("write"):
            self.write(sample, image, result, result.caption, (original, kind))

    # -- what becomes of a sample ---------------------------------------------------------------

    def write(
        self,
        sample: Sample,
        image: PreparedImage,
        result: CaptionResult,
        caption: Caption,
        duplicate: tuple[str, str] | None = None,
    ) -> CaptionRecord:
        """A data/ row and its journal line; `duplicate`: (first occurrence's key, kind)."""
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
            duplicate_of=duplicate[0] if duplicate else None,
            duplicate_kind=duplicate[1] if duplicate else None,
            image_phash=phash_column(image.fingerprint),
        )
        self.writer.add(record)
        self.usage.add(result.usage)
        self.journal.record("data", record, result.usage.spent())
        self.on_sample(result.usage, False)
        return record

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
            self.journal.record("rejected", rejection, exc.usage.spent())
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
            if row.get("duplicate_kind"):
                self.duplicates[row["duplicate_kind"]] += 1
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
        answered, copies = self.journal.answered, self.copies
        for sample, image in samples(
            self.shard,
            self.cfg.captioner.image,
            skip=lambda key: key in answered or key in copies or skip(key),
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
            self.duplicates.update(before.duplicates)
            self.saved_usd += before.saved_usd
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
            duplicates=dict(sorted(self.duplicates.items())),
            saved_usd=self.saved_usd,
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
