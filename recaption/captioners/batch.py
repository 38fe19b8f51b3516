"""The `openai-batch` captioner: the Batch API, at half the online price.

Before the pipeline writes a shard, `settle` drives every key of it to an answer:

    read shard ─▶ keys due (never asked, or worth another try) ─▶ JSONL parts (≤ limits)
      ─▶ upload (Files API) ─▶ create batch ─▶ poll with backoff ─▶ output + error files
      ─▶ each line read and validated exactly as online ─▶ answered, or due again

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
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

from recaption.captioners.base import Answer, CaptionFailure, CaptionResult, ShardJob, ShardPending
from recaption.captioners.batch_state import (
    LIVE,
    BatchState,
    Part,
    call_api,
    load_state,
    save_state,
)
from recaption.captioners.openai import OpenAICaptioner, Retry, Tries
from recaption.config import PipelineConfig, redacted
from recaption.errors import Rejected
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

    def __init__(self, cfg: PipelineConfig, limiters: dict[str, Any] | None = None):
        super().__init__(cfg, limiters)
        self.batch = cfg.captioner.batch
        self.batch_price = self.price.batch()  # online retries keep self.price
        self.endpoint = self.pool.endpoints[0]  # batches go to the first endpoint
        azure = self.endpoint.config.api == "azure"
        self.url = "/chat/completions" if azure else "/v1/chat/completions"

    @classmethod
    def shards_per_worker(cls, cfg: PipelineConfig) -> int:
        return cfg.captioner.batch.shards_per_worker  # a shard in a batch mostly waits

    @classmethod
    def online(cls) -> str:
        return OpenAICaptioner.backend

    # -- one shard ----------------------------------------------------------------------------

    async def settle(self, job: ShardJob) -> dict[str, Answer]:
        """key -> its final answer, or (retry: online) a coroutine function that captions the
        prepared image online. Raises ShardPending when `batch.wait` is off and batches are
        still running."""
        shard, path = job.id, job.state
        state = load_state(path) or BatchState(endpoint=redacted(self.endpoint.config))
        client = self.endpoint.client
        keys: dict[str, _Key] = {}
        read: set[int] = set()  # parts whose output this call has read
        delay, plan = self.batch.poll_s, True
        while True:
            await self._refresh(client, shard, state)
            for i, part in enumerate(state.parts):
                if i not in read and part.status not in LIVE:
                    await self._read_part(client, shard, part, keys, job.validate)
                    read.add(i)
                    plan = True
            # one save a pass: a kill before it loses only statuses, asked again, or a batch
            # id, which find-or-create finds again by its input file
            save_state(path, state)
            live = {key for part in state.parts if part.status in LIVE for key in part.keys}
            if plan:  # something was answered (or this is the start): what is due now?
                plan = False
                due = self._due(job, keys, live)
                if await self._submit(client, shard, due, state, path):
                    delay = self.batch.poll_s
                    continue
            if not live:
                break
            if not self.batch.wait:
                counts = sorted({p.status for p in state.parts if p.status in LIVE})
                raise ShardPending(
                    f"{len(live)} requests in batches still {'/'.join(counts)}; run again to collect"
                )
            await asyncio.sleep(delay)
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
    ) -> int:
        """Write the due requests as JSONL parts within the API's limits, upload each and
        create its batch, saving each id as soon as it exists. Returns the requests sent."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pending: list[tuple[list[str], Path]] = []
        keys: list[str] = []
        jsonl = path.parent / f"{shard}.{len(state.parts)}.jsonl"
        fh = open(jsonl, "wb")  # noqa: SIM115 - rolls over to the next part below
        for key, image, tries in due:
            tries.image_url = self.data_url(image)
            line = {
                "custom_id": f"{shard}/{key}",
                "method": "POST",
                "url": self.url,
                "body": self._request(self.endpoint, tries),
            }
            tries.image_url = ""  # held by the file now
            data = json.dumps(line, separators=(",", ":")).encode() + b"\n"
            if keys and (
                len(keys) >= self.batch.max_requests or fh.tell() + len(data) > self.batch.max_bytes
            ):
                fh.close()
                pending.append((keys, jsonl))
                keys = []
                jsonl = path.parent / f"{shard}.{len(state.parts) + len(pending)}.jsonl"
                fh = open(jsonl, "wb")  # noqa: SIM115
            fh.write(data)
            keys.append(key)
        fh.close()
        if keys:
            pending.append((keys, jsonl))
        else:
            jsonl.unlink()
        for part_keys, jsonl in pending:
            with open(jsonl, "rb") as body:
                uploaded = await call_api(
                    client.files.create, file=(jsonl.name, body), purpose="batch"
                )
            part = Part(keys=part_keys, file_id=uploaded.id, uploaded_at=time.time())
            state.parts.append(part)
            save_state(path, state)
            jsonl.unlink()
            await self._create(client, shard, part, len(state.parts) - 1, resumed=False)
            save_state(path, state)
        return sum(len(part_keys) for part_keys, _ in pending)

    async def _create(
        self, client: openai.AsyncOpenAI, shard: str, part: Part, i: int, resumed: bool
    ) -> None:
        """Create the part's batch, unless it exists: a create whose answer was lost (a
        dropped connection, or a kill before `resumed`) may have made it, and a second one
        would run every request twice. Only then is the batch list searched."""
        lost = resumed

        async def find_or_create() -> Any:
            nonlocal lost
            found = await self._find(client, part) if lost else None
            lost = True  # if this try fails, its answer may be lost too
            return found or await client.batches.create(
                input_file_id=part.file_id,
                endpoint=self.url,
                completion_window=self.batch.completion_window,
                metadata={"recaption_shard": shard, "recaption_part": str(i)},
            )

        part.update(await call_api(find_or_create))

    # -- follow -------------------------------------------------------------------------------

    async def _refresh(self, client: openai.AsyncOpenAI, shard: str, state: BatchState) -> None:
        """Where each live part stands now. A part stopped between its upload and its batch
        gets its batch here (found, or created); the caller saves the state."""
        for i, part in enumerate(state.parts):
            if part.status not in LIVE:
                continue
            if part.batch_id is None:  # stopped after the upload: the batch may exist already
                await self._create(client, shard, part, i, resumed=True)
            else:
                part.update(await call_api(client.batches.retrieve, part.batch_id))

    async def _find(self, client: openai.AsyncOpenAI, part: Part) -> Any:
        """The batch made from this part's file, among those created since its upload."""
        async for batch in client.batches.list(limit=100):
            if batch.input_file_id == part.file_id:
                return batch
            if batch.created_at < part.uploaded_at - 3600:  # newest first: it is not there
                return None
        return None

    # -- read answers -------------------------------------------------------------------------

    async def _read_part(
        self,
        client: openai.AsyncOpenAI,
        shard: str,
        part: Part,
        keys: dict[str, _Key],
        validate: Callable[[Caption], Caption],
    ) -> None:
        """Take a finished batch's output and error files, line by line."""
        lines: dict[str, dict] = {}
        for file_id in (part.output_file_id, part.error_file_id):
            if not file_id:
                continue
            content = await call_api(client.files.content, file_id)
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
        usage = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        for key in part.keys:
            # image tokens only shape the online limiter's estimate; `caption` fills them in
            blank = Tries(max_tokens=self.cfg.max_output_tokens, image_url="", image_tokens=0)
            known = keys.setdefault(key, _Key(blank))
            spent = known.tries.usage
            before = (spent.input_tokens, spent.output_tokens, spent.cost_usd)
            self._take(known, lines.get(key), missing, validate)
            if isinstance(known.answer, CaptionResult) and part.seconds is not None:
                known.answer.latency_ms = part.seconds * 1000  # the batch's turnaround
            usage["input_tokens"] += spent.input_tokens - before[0]
            usage["output_tokens"] += spent.output_tokens - before[1]
            usage["cost_usd"] += spent.cost_usd - before[2]
        part.usage = usage

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
