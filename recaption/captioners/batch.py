"""The `openai-batch` captioner: the Batch API, at half the online price.

Before the pipeline writes a shard, `settle` drives every key of it to an answer:

    read shard ─▶ keys due (never asked, or worth another try) ─▶ JSONL parts (≤ limits)
      ─▶ room in the run's queue quota (else wait) ─▶ upload (Files API) ─▶ create batch
      ─▶ poll with backoff ─▶ output + error files
      ─▶ each line read and validated exactly as online ─▶ answered, or due again

The enqueued-token quota (`batch.max_enqueued_tokens`, or learnt from refusals) is held
by a QueueActor the run's workers share (limits.py): a part is created only when the live
batches leave room for it, counted as the API counts input tokens; a batch the API still
fails with `token_limit_exceeded` costs no attempt, its keys simply go back in line.

Each id is saved to `CORPUS/.batches/NNNNN.json` the moment the API returns it, so a run
stopped at any point picks its batches up again; a part uploaded but not yet on record
as a batch (stopped between the two calls) is matched to its batch by input file. No key
is submitted while a batch holding it is live. Answers, and what every attempt cost, are
read again from the output files on resume, so the state holds ids only.

The shard pass (recaption/shard.py) hands `settle` a `ShardJob`: the shard's prepared
images not yet answered, the run's validation rules and where the state lives; the answers
then take the shard pass's usual path (validation, the journal, the writers). This module
speaks only the Batch API. With `batch.retry: online`, keys that a batch did not answer
are captioned online, their batch attempts counting against `captioner.max_attempts`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

from recaption.captioners.base import Answer, CaptionFailure, CaptionResult, ShardJob, ShardPending
from recaption.captioners.batch_queue import Queue, QueueQuota
from recaption.captioners.batch_state import (
    LIVE,
    BatchState,
    Part,
    call_api,
    create,
    delete_files,
    load_state,
    refresh,
    save_state,
)
from recaption.captioners.endpoints import endpoint_configs
from recaption.captioners.openai import OpenAICaptioner, Retry, Tries
from recaption.config import PipelineConfig, redacted
from recaption.errors import BudgetSpent, Rejected
from recaption.images import PreparedImage
from recaption.records import Caption, Reason


class _Key:
    """One key's attempts across batches, and where they left it."""

    def __init__(self, tries: Tries):
        self.tries = tries
        self.answer: Answer | None = None  # final; None: due again, unless a live batch has it
        self.invalid: Caption | None = None  # the last caption validation refused


class BatchCaptioner(OpenAICaptioner):
    backend = "openai-batch"
    answers_shards = True

    def __init__(self, cfg: PipelineConfig, limiters: dict[str, Any] | None = None):
        super().__init__(cfg, limiters)
        self.batch = cfg.captioner.batch
        self.batch_price = self.price.batch()  # online retries keep self.price
        self.endpoint = self.pool.endpoints[0]  # batches go to the first endpoint
        # the run's shared queue quota (make_captioner sets it), else one of our own
        self.queue = Queue(QueueQuota(self.batch.max_enqueued_tokens))
        # the API's count of a request's text tokens per token we estimate (ours is high)
        self.scale = 1.0
        azure = self.endpoint.config.api == "azure"
        self.url = "/chat/completions" if azure else "/v1/chat/completions"

    @classmethod
    def shards_per_worker(cls, cfg: PipelineConfig) -> int:
        return cfg.captioner.batch.shards_per_worker  # a shard in a batch mostly waits

    @classmethod
    def online(cls) -> str:
        return OpenAICaptioner.backend

    @classmethod
    def queues(cls, cfg: PipelineConfig) -> dict[str, int | None]:
        """The endpoint the batches go to -> its enqueued-token quota (None: learnt)."""
        first = endpoint_configs(cfg.captioner, cfg.limits)[0]
        return {first.name: cfg.captioner.batch.max_enqueued_tokens}

    @classmethod
    async def cleanup(cls, cfg: PipelineConfig, states: list[Path]) -> None:
        """Delete the files (input, output, errors) of committed shards' batches from the
        account's storage, then their saved ids. A kill in between leaves them for the next
        run to delete."""
        await delete_files(states, cfg.captioner.batch.cleanup)

    def share(self, budget: Any = None, queues: dict[str, Any] | None = None) -> None:
        super().share(budget, queues)
        if queues and self.endpoint.name in queues:
            self.queue = Queue(queues[self.endpoint.name])

    def text_estimate(self) -> int:
        """A request's text tokens as the queue quota counts them: our estimate, corrected
        by what the API counted so far."""
        return math.ceil(self.text_tokens * self.scale)

    def enqueued_tokens(self, tries: Tries) -> int:
        """A request's input tokens as the queue quota counts them: the image by the model's
        rule, exactly, and the text as estimated."""
        return self.text_estimate() + tries.image_tokens

    def _learn(self, part: Part, lines: dict[str, dict]) -> float | None:
        """What the API counted for the text of each answered line (its input tokens less
        the image's): the most of it, per token we estimate, is the correction."""
        texts = []
        for key, image in zip(part.keys, part.images, strict=False):
            body = ((lines.get(key) or {}).get("response") or {}).get("body") or {}
            counted = (body.get("usage") or {}).get("prompt_tokens")
            if isinstance(counted, int):
                texts.append(counted - image)
        return min(1.0, max(texts) / self.text_tokens) if texts else None

    # -- one shard ----------------------------------------------------------------------------

    async def settle(self, job: ShardJob) -> dict[str, Answer]:
        """key -> its final answer, or (retry: online) a coroutine function that captions the
        prepared image online. Raises ShardPending when `batch.wait` is off and batches are
        still running."""
        shard, path = job.id, job.state
        state = load_state(path) or BatchState(endpoint=redacted(self.endpoint.config))
        state.queue_limit = self.batch.max_enqueued_tokens
        held: set[int] = set()  # parts counted in the queue quota by this call
        for i, part in enumerate(state.parts):  # what a stopped run left in the queue
            if part.status in LIVE:
                await self.queue.call("hold", part.tokens)
                held.add(i)
                if self.budget is not None:  # ... and what it can still cost
                    await self.budget.hold(part.reserved_usd)
        client = self.endpoint.client
        keys: dict[str, _Key] = {}
        read: set[int] = set()  # parts whose output this call has read
        delay, plan = self.batch.poll_s, True
        blocked = (0, 0)  # (lines, image tokens) of a part the full queue held back
        while True:
            await refresh(client, shard, state, self.url, self.batch.completion_window)
            for i, part in enumerate(state.parts):
                if i in held and part.status not in LIVE:  # it left the queue: room for more
                    held.discard(i)
                    method = "refused" if part.over_quota else "release"
                    await self.queue.call(method, part.tokens)
            for i, part in enumerate(state.parts):
                if i not in read and part.status not in LIVE:
                    if not await self._read_part(client, shard, part, keys, job.validate):
                        continue  # its files could not be had yet: the next pass tries again
                    read.add(i)
                    plan = True
            # one save a pass: a kill before it loses only statuses, asked again, or a batch
            # id, which find-or-create finds again by its input file
            save_state(path, state)
            live = {key for part in state.parts if part.status in LIVE for key in part.keys}
            # answers came, or this is the start; or the queue was full and now has room
            # (asked first: preparing a shard's images to learn that it is still full is
            # what a waiting shard must not spend its CPU on)
            claimed = 0  # room taken in the queue before preparing a part to fill it
            if not plan and blocked[0]:
                wanted = blocked[0] * self.text_estimate() + blocked[1]  # sized as now
                if await self.queue.call("admit", wanted):
                    claimed = wanted  # the others waiting stay waiting: no herd of writers
            if plan or claimed:
                plan = False
                due = self._due(job, keys, live)
                sent, blocked = await self._submit(client, shard, due, state, path, held, claimed)
                if sent:
                    delay = self.batch.poll_s
                    continue
            if not live and not blocked[0]:
                break
            if not self.batch.wait:
                counts = sorted({p.status for p in state.parts if p.status in LIVE})
                what = f"batches still {'/'.join(counts)}" if live else "waiting for queue quota"
                raise ShardPending(f"{len(live)} requests in {what}; run again to collect")
            await asyncio.sleep(delay)
            # waiting only for room in the queue asks the run's queue actor, not the API:
            # no backoff then; batches of our own are polled with backoff
            if live:
                delay = min(delay * 1.5, self.batch.poll_max_s)
        return {key: k.answer for key, k in keys.items() if k.answer is not None}

    def _due(
        self, job: ShardJob, keys: dict[str, _Key], live: set[str]
    ) -> Iterator[tuple[str, PreparedImage, Tries]]:
        """Keys to ask (again), with their prepared images; known first, so that no image
        is decoded for a key a live batch holds or that has its answer."""

        def settled(key: str) -> bool:
            known = keys.get(key)
            if key in live or known is None:
                return key in live
            if known.answer is None and self.batch.retry == "online":  # batches: first tries
                known.answer = functools.partial(self.caption, prior=known.tries)
            return known.answer is not None

        for key, image in job.images(settled):
            known = keys.get(key)
            yield key, image, known.tries if known is not None else self.tries(image)

    # -- submit -------------------------------------------------------------------------------

    async def _submit(
        self,
        client: openai.AsyncOpenAI,
        shard: str,
        due: Iterator[tuple[str, PreparedImage, Tries]],
        state: BatchState,
        path: Path,
        held: set[int],
        claimed: int = 0,
    ) -> tuple[int, tuple[int, int]]:
        """Write the due requests as JSONL parts within the API's limits (requests, bytes
        and the queue quota), upload each and create its batch once the run's queue has room
        for it, saving each id as soon as it exists. Returns (requests sent, the (lines,
        image tokens) of the part the full queue held back, or (0, 0)). `claimed`: queue
        room already taken, for the first part."""
        # reading, decoding and encoding the images is CPU work (Pillow lets go of the
        # GIL): in a thread, so the worker's other shards keep polling meanwhile
        pending = await asyncio.to_thread(self._write_parts, shard, due, state, path)
        sent, blocked = 0, (0, 0)
        if claimed and not pending:
            await self.queue.call("release", claimed)  # nothing was due after all
        for n, (part_keys, jsonl, cost, part_tokens, part_images) in enumerate(pending):
            take, claimed = part_tokens - claimed, 0  # what is not claimed yet
            if take < 0:
                await self.queue.call("release", -take)
            if take > 0 and not await self.queue.call("admit", take):
                await self.queue.call("release", part_tokens - take)
                blocked = (len(part_keys), sum(part_images))  # due again once there is room
                for left in pending[n:]:
                    left[1].unlink()
                break
            if self.budget is not None:  # a batch holds its cost for hours: no waiting
                try:
                    await self.budget.reserve(cost, wait=False)
                except BudgetSpent:
                    await self.queue.call("release", part_tokens)
                    for left in pending[n:]:
                        left[1].unlink()
                    raise
            with open(jsonl, "rb") as body:
                uploaded = await call_api(
                    client.files.create, file=(jsonl.name, body), purpose="batch"
                )
            part = Part(
                keys=part_keys,
                file_id=uploaded.id,
                uploaded_at=time.time(),
                reserved_usd=cost,
                tokens=part_tokens,
                images=part_images,
            )
            state.parts.append(part)
            held.add(len(state.parts) - 1)
            save_state(path, state)
            jsonl.unlink()
            await create(
                client, shard, part, len(state.parts) - 1, self.url, self.batch.completion_window
            )
            save_state(path, state)
            sent += len(part_keys)
        return sent, blocked

    def _write_parts(
        self,
        shard: str,
        due: Iterator[tuple[str, PreparedImage, Tries]],
        state: BatchState,
        path: Path,
    ) -> list[tuple[list[str], Path, float, int, list[int]]]:
        """The due requests as JSONL files, a part each within the API's limits: (keys, file,
        most it can cost, input tokens, each line's image tokens)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pending: list[tuple[list[str], Path, float, int, list[int]]] = []
        keys: list[str] = []
        most = 0.0  # what the part can cost, at most, for the spend cap
        tokens = 0  # its input tokens, as the queue quota counts them
        images: list[int] = []  # each line's image tokens, to learn the text's from usage
        cap = self.batch.max_enqueued_tokens
        jsonl = path.parent / f"{shard}.{len(state.parts)}.jsonl"
        fh = open(jsonl, "wb")  # noqa: SIM115 - rolls over to the next part below
        for key, image, tries in due:
            tries.image_b64 = base64.b64encode(image.data)
            line = {
                "custom_id": f"{shard}/{key}",
                "method": "POST",
                "url": self.url,
                "body": self._request(self.endpoint, tries),
            }
            tries.image_b64 = b""  # held by the file now
            data = json.dumps(line, separators=(",", ":")).encode() + b"\n"
            line_tokens = self.enqueued_tokens(tries)
            if keys and (
                len(keys) >= self.batch.max_requests
                or fh.tell() + len(data) > self.batch.max_bytes
                or (cap is not None and tokens + line_tokens > cap)
            ):
                fh.close()
                pending.append((keys, jsonl, most, tokens, images))
                keys, most, tokens, images = [], 0.0, 0, []
                jsonl = path.parent / f"{shard}.{len(state.parts) + len(pending)}.jsonl"
                fh = open(jsonl, "wb")  # noqa: SIM115
            fh.write(data)
            keys.append(key)
            most += self.most(tries, self.batch_price)
            tokens += line_tokens
            images.append(tries.image_tokens)
        fh.close()
        if keys:
            pending.append((keys, jsonl, most, tokens, images))
        else:
            jsonl.unlink()
        return pending

    # -- read answers -------------------------------------------------------------------------

    async def _read_part(
        self,
        client: openai.AsyncOpenAI,
        shard: str,
        part: Part,
        keys: dict[str, _Key],
        validate: Callable[[Caption], Caption],
    ) -> bool:
        """Take a finished batch's output and error files, line by line. False: a file could
        not be downloaded yet (retried on the next pass; no request is asked again)."""
        usage = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        if part.over_quota:  # the queue was full: no line ran, none is an attempt
            self.counters["batch_over_quota"] += 1
            part.usage = usage
            if self.budget is not None:
                self.budget.settle(part.reserved_usd, 0.0)
            return True
        lines: dict[str, dict] = {}
        for file_id in (part.output_file_id, part.error_file_id):
            if not file_id:
                continue
            try:
                content = await call_api(client.files.content, file_id)
            except openai.APIError:
                self.counters["batch_download_failed"] += 1
                return False
            for raw in content.content.splitlines():
                try:
                    line = json.loads(raw)
                    lines[line["custom_id"].removeprefix(f"{shard}/")] = line
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.counters["malformed_output_line"] += 1  # its key counts as missing
        missing = {
            "expired": "the batch expired before this request ran",
            "cancelled": "the batch was cancelled before this request ran",
            "failed": "the batch failed: " + ("; ".join(part.errors) or "no reason given"),
        }.get(part.status, "missing from the batch's output")
        bad = {part.keys[n - 1] for n in part.bad_lines if 0 < n <= len(part.keys)}
        for key in part.keys:
            if bad and key not in bad:  # a batch refused for other lines: not an attempt
                continue
            # image tokens only shape the online limiter's estimate; `caption` fills them in
            blank = Tries(max_tokens=self.cfg.max_output_tokens, image_b64=b"", image_tokens=0)
            known = keys.setdefault(key, _Key(blank))
            spent = known.tries.usage
            before = (spent.input_tokens, spent.output_tokens, spent.cost_usd)
            if key in bad:  # the API named this line: it will not take it
                known.tries.usage.attempts += 1
                known.answer = self._failure(Reason.bad_request, missing, known.tries)
            else:
                self._take(known, lines.get(key), missing, validate)
            if isinstance(known.answer, CaptionResult) and part.seconds is not None:
                known.answer.latency_ms = part.seconds * 1000  # the batch's turnaround
            usage["input_tokens"] += spent.input_tokens - before[0]
            usage["output_tokens"] += spent.output_tokens - before[1]
            usage["cost_usd"] += spent.cost_usd - before[2]
        part.usage = usage
        if self.budget is not None:
            self.budget.settle(part.reserved_usd, usage["cost_usd"])
        if (scale := self._learn(part, lines)) is not None:
            self.scale = await self.queue.call("observe", scale)  # the run's, not only ours
        return True

    def _take(
        self,
        known: _Key,
        line: dict | None,
        missing: str,
        validate: Callable[[Caption], Caption],
    ) -> None:
        """One attempt's outcome: final (`answer` set) or due again (`answer` left None)."""
        tries = known.tries
        tries.usage.attempts += 1
        self._count(tries, "requests")
        known.invalid = None
        response = (line or {}).get("response") or {}
        status = response.get("status_code")
        try:
            if line is None or status is None:
                self._count(tries, "batch_missing")
                error = (line or {}).get("error") or {}
                raise Retry(Reason.batch_failed, error.get("message") or missing)
            if status != 200:
                self._count(tries, f"http_{status}")
                detail = f"HTTP {status}: {json.dumps(response.get('body'))[:200]}"
                if status == 400:
                    known.answer = self._failure(Reason.bad_request, detail, tries)
                    return
                raise Retry(Reason.rate_limited if status == 429 else Reason.server_error, detail)
            try:
                completion = ChatCompletion.model_validate(response.get("body"))
            except ValidationError as exc:
                self._count(tries, "broken_response")
                raise Retry(Reason.schema_invalid, f"unreadable response: {exc}") from None
            if completion.usage is not None:
                tries.paid(completion.usage, self.batch_price)
            caption = self._read(completion, tries)
            try:
                validate(caption)
            except Rejected as exc:
                known.invalid = caption
                raise Retry(exc.reason, exc.detail) from None
            known.answer = self._result(caption, tries)
        except CaptionFailure as exc:  # a refusal or truncation out of its own budget
            known.answer = exc
        except Retry as exc:  # due again, unless that was its last attempt
            if tries.usage.attempts >= self.cfg.max_attempts:  # out of attempts: final
                known.answer = (
                    self._result(known.invalid, tries)  # the pipeline rejects it with its reason
                    if known.invalid is not None
                    else self._failure(exc.reason, exc.detail, tries)
                )
