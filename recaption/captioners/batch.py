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

The answers then take the pipeline's usual path (validation, the journal, the writers).
With `batch.retry: online`, keys that a batch did not answer are captioned online,
their batch attempts counting against `captioner.max_attempts`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from tenacity import wait_random_exponential as backoff

from recaption.captioners import Answer, CaptionFailure, CaptionResult, ShardPending
from recaption.captioners.openai import OpenAICaptioner, Retry, Tries, make_client
from recaption.config import EndpointConfig, PipelineConfig, redacted
from recaption.images import ImageRejected, PreparedImage, prepare
from recaption.journal import batch_state_path
from recaption.records import Caption, Reason
from recaption.sinks import CorpusStore
from recaption.sources import Shard, read_samples
from recaption.validation import CaptionInvalid, validate_caption

LIVE = ("uploaded", "validating", "in_progress", "finalizing", "cancelling")  # "uploaded": ours
# an API call (upload, create, retrieve, download) failing transiently is tried this often
_API_TRIES = 5


class Part(BaseModel):
    """One batch: the keys it holds and where it stands."""

    keys: list[str]
    file_id: str
    uploaded_at: float
    batch_id: str | None = None
    status: str = "uploaded"  # then the API's: validating, in_progress, ... completed
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: dict[str, int] = {}
    errors: list[str] = []  # why the API failed the batch
    seconds: float | None = None  # from creation to the end, once it ended
    usage: dict[str, float] | None = None  # what its answers cost, once read


class BatchState(BaseModel):
    endpoint: dict[str, Any]  # EndpointConfig, redacted: `recaption batches` calls it too
    parts: list[Part] = []


def load_state(path: Path) -> BatchState | None:
    return BatchState.model_validate_json(path.read_bytes()) if path.exists() else None


def save_state(path: Path, state: BatchState) -> None:
    """Atomic and durable: an id the API gave us must survive a kill the next instant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(state.model_dump_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def batch_client(endpoint: dict[str, Any], timeout_s: float = 120) -> openai.AsyncOpenAI:
    return make_client(EndpointConfig.model_validate(endpoint), timeout_s)


async def call_api(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """One Files/Batches API call, retried on what passes (connection, 429, 5xx)."""
    transient = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(_API_TRIES),
        wait=backoff(multiplier=0.5, max=30),
        retry=retry_if_exception_type(transient),
        reraise=True,
    ):
        with attempt:
            return await fn(*args, **kwargs)


class _Key:
    """One key's attempts across batches, and where they left it."""

    def __init__(self, tries: Tries):
        self.tries = tries
        self.answer: Answer | None = None  # final; None: due again, unless a live batch has it
        self.invalid: Caption | None = None  # the last caption validation refused


class BatchCaptioner(OpenAICaptioner):
    backend = "openai-batch"

    def __init__(self, cfg: PipelineConfig, limiters: dict[str, Any] | None = None):
        super().__init__(cfg.captioner, cfg.limits, limiters)
        self.batch = cfg.captioner.batch
        self.validation = cfg.validation
        self.corpus = CorpusStore(cfg.output.path, cfg.output.staging).local  # where state lives
        self.batch_price = self.price.batch()  # online retries keep self.price
        self.endpoint = self.pool.endpoints[0]  # batches go to the first endpoint
        azure = self.endpoint.config.api == "azure"
        self.url = "/chat/completions" if azure else "/v1/chat/completions"

    # -- one shard ----------------------------------------------------------------------------

    async def settle(self, shard: Shard, answered: Container[str]) -> dict[str, Answer]:
        """key -> its final answer, or (retry: online) a coroutine function that captions the
        prepared image online. `answered`: keys the journal already holds. Raises
        ShardPending when `batch.wait` is off and batches are still running."""
        path = batch_state_path(self.corpus, shard.id)
        state = load_state(path) or BatchState(endpoint=redacted(self.endpoint.config))
        client = self.endpoint.client
        keys: dict[str, _Key] = {}
        read: set[int] = set()  # parts whose output this call has read
        delay, plan = self.batch.poll_s, True
        while True:
            await self._refresh(client, shard, state)
            for i, part in enumerate(state.parts):
                if i not in read and part.status not in LIVE:
                    await self._read_part(client, shard, part, keys)
                    read.add(i)
                    plan = True
            # one save a pass: a kill before it loses only statuses, asked again, or a batch
            # id, which find-or-create finds again by its input file
            save_state(path, state)
            live = {key for part in state.parts if part.status in LIVE for key in part.keys}
            if plan:  # something was answered (or this is the start): what is due now?
                plan = False
                due = self._due(shard, answered, keys, live)
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
        self, shard: Shard, answered: Container[str], keys: dict[str, _Key], live: set[str]
    ) -> Iterator[tuple[str, PreparedImage, Tries]]:
        """Keys to ask (again), with their prepared images. Reading and decoding problems
        are left to the pipeline's pass, which rejects them."""
        for sample in read_samples(shard):
            key = sample.key
            if sample.error or key in answered or key in live:
                continue
            known = keys.get(key)
            if known is not None and known.answer is not None:
                continue
            if known is not None and self.batch.retry == "online":  # batches: first tries only
                known.answer = functools.partial(self.caption, prior=known.tries)
                continue
            try:
                image = prepare(sample.image, self.cfg.image)
            except ImageRejected:
                continue
            finally:
                sample.image = None
            yield key, image, known.tries if known is not None else self.tries(image)

    # -- submit -------------------------------------------------------------------------------

    async def _submit(
        self,
        client: openai.AsyncOpenAI,
        shard: Shard,
        due: Iterator[tuple[str, PreparedImage, Tries]],
        state: BatchState,
        path: Path,
    ) -> int:
        """Write the due requests as JSONL parts within the API's limits, upload each and
        create its batch, saving each id as soon as it exists. Returns the requests sent."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pending: list[tuple[list[str], Path]] = []
        keys: list[str] = []
        jsonl = path.parent / f"{shard.id}.{len(state.parts)}.jsonl"
        fh = open(jsonl, "wb")  # noqa: SIM115 - rolls over to the next part below
        for key, image, tries in due:
            tries.image_url = self.data_url(image)
            line = {
                "custom_id": f"{shard.id}/{key}",
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
                jsonl = path.parent / f"{shard.id}.{len(state.parts) + len(pending)}.jsonl"
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
        self, client: openai.AsyncOpenAI, shard: Shard, part: Part, i: int, resumed: bool
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
                metadata={"recaption_shard": shard.id, "recaption_part": str(i)},
            )

        self._update(part, await call_api(find_or_create))

    # -- follow -------------------------------------------------------------------------------

    async def _refresh(self, client: openai.AsyncOpenAI, shard: Shard, state: BatchState) -> None:
        """Where each live part stands now. A part stopped between its upload and its batch
        gets its batch here (found, or created); the caller saves the state."""
        for i, part in enumerate(state.parts):
            if part.status not in LIVE:
                continue
            if part.batch_id is None:  # stopped after the upload: the batch may exist already
                await self._create(client, shard, part, i, resumed=True)
            else:
                self._update(part, await call_api(client.batches.retrieve, part.batch_id))

    async def _find(self, client: openai.AsyncOpenAI, part: Part) -> Any:
        """The batch made from this part's file, among those created since its upload."""
        async for batch in client.batches.list(limit=100):
            if batch.input_file_id == part.file_id:
                return batch
            if batch.created_at < part.uploaded_at - 3600:  # newest first: it is not there
                return None
        return None

    @staticmethod
    def _update(part: Part, batch: Any) -> None:
        part.batch_id = batch.id
        part.status = batch.status
        part.output_file_id = batch.output_file_id
        part.error_file_id = batch.error_file_id
        if batch.request_counts is not None:
            part.request_counts = batch.request_counts.model_dump()
        if batch.errors is not None and batch.errors.data:
            part.errors = [f"{e.code}: {e.message}" for e in batch.errors.data]
        ended = batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at
        if ended:
            part.seconds = float(ended - batch.created_at)

    # -- read answers -------------------------------------------------------------------------

    async def _read_part(
        self, client: openai.AsyncOpenAI, shard: Shard, part: Part, keys: dict[str, _Key]
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
                    lines[line["custom_id"].removeprefix(f"{shard.id}/")] = line
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
            before = (known.tries.input_tokens, known.tries.output_tokens, known.tries.cost_usd)
            self._take(known, lines.get(key), missing)
            if isinstance(known.answer, CaptionResult) and part.seconds is not None:
                known.answer.latency_ms = part.seconds * 1000  # the batch's turnaround
            usage["input_tokens"] += known.tries.input_tokens - before[0]
            usage["output_tokens"] += known.tries.output_tokens - before[1]
            usage["cost_usd"] += known.tries.cost_usd - before[2]
        part.usage = usage

    def _take(self, known: _Key, line: dict | None, missing: str) -> None:
        """One attempt's outcome: final (`answer` set) or due again (`answer` left None)."""
        tries = known.tries
        tries.attempts += 1
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
                validate_caption(caption, self.validation)
            except CaptionInvalid as exc:
                known.invalid = caption
                raise Retry(exc.reason, exc.detail) from None
            known.answer = self._result(caption, tries)
        except CaptionFailure as exc:  # a refusal or truncation out of its own budget
            known.answer = exc
        except Retry as exc:  # due again, unless that was its last attempt
            if tries.attempts >= self.cfg.max_attempts:  # out of attempts: final
                known.answer = (
                    self._result(known.invalid, tries)  # the pipeline rejects it with its reason
                    if known.invalid is not None
                    else self._failure(exc.reason, exc.detail, tries)
                )


# -- `recaption batches` ------------------------------------------------------------------------


async def batch_table(corpus: CorpusStore, cancel: bool = False) -> list[str]:
    """What the corpus's unfinished shards have in batches, refreshed from the API where
    credentials allow; with `cancel`, live batches are cancelled first. Answers already in
    a cancelled batch are kept: the next run writes them and submits only the rest."""
    from recaption.captioners.openai import check_credentials
    from recaption.config import ConfigError
    from recaption.journal import BATCHES_DIR
    from recaption.sinks import load_manifest

    rows, statuses, note = [], {}, ""
    spent = 0.0
    for path in sorted((corpus.local / BATCHES_DIR).glob("*.json")):
        state = load_state(path)
        if state is None:
            continue
        client = None
        try:
            check_credentials(EndpointConfig.model_validate(state.endpoint))
            client = batch_client(state.endpoint)
        except ConfigError as exc:
            note = f"as last recorded (to refresh: {exc})"
        try:
            for i, part in enumerate(state.parts):
                if client is not None and part.batch_id and part.status in LIVE:
                    if cancel:
                        await call_api(client.batches.cancel, part.batch_id)
                    BatchCaptioner._update(
                        part, await call_api(client.batches.retrieve, part.batch_id)
                    )
                counts = part.request_counts
                cost = f"${part.usage['cost_usd']:.4f}" if part.usage else "-"
                spent += part.usage["cost_usd"] if part.usage else 0.0
                statuses[part.status] = statuses.get(part.status, 0) + 1
                rows.append(
                    (
                        path.stem,
                        str(i),
                        part.batch_id or "(not created)",
                        part.status,
                        f"{counts.get('completed', 0)}/{counts.get('failed', 0)}/{len(part.keys)}",
                        cost,
                    )
                )
        finally:
            if client is not None:
                await client.close()
    manifest = load_manifest(corpus)
    committed = [r for r in manifest.shards.values()] if manifest else []
    spent += sum(r.cost_usd for r in committed)
    header = ("shard", "part", "batch", "status", "done/failed/all", "cost")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"
    lines.append(f"batches of unfinished shards: {summary}" + (f"; {note}" if note else ""))
    lines.append(
        f"shards written: {len(committed)}; cost so far ${spent:.4f} "
        "(written shards, and answers read from finished batches)"
    )
    return lines
