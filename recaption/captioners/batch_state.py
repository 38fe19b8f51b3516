"""What a shard's batches are, kept as ids only: `CORPUS/.batches/NNNNN.json`
(corpus.batch_state_path), saved the moment the API returns an id. Also the Files and
Batches API calls that follow them (create, find by input file over every page of the list,
refresh, delete their files), each retried on what passes, and the `recaption batches`
table."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import openai
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from tenacity import wait_random_exponential as backoff

from recaption.captioners.endpoints import check_credentials, make_client
from recaption.config import EndpointConfig
from recaption.errors import ConfigError

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
    errors: list[str] = []  # why the API failed the batch: "code: message"
    bad_lines: list[int] = []  # 1-based lines a validation failure named
    seconds: float | None = None  # from creation to the end, once it ended
    usage: dict[str, float] | None = None  # what its answers cost, once read
    reserved_usd: float = 0.0  # the most it can cost, held against limits.max_usd
    tokens: int = 0  # its input tokens as the API counts them, against the queue quota
    images: list[int] = []  # each line's image tokens (to learn the text's from usage)

    @property
    def over_quota(self) -> bool:
        """Failed at validation for the enqueued-token quota: to submit again, not an attempt."""
        return self.status == "failed" and any(
            e.startswith("token_limit_exceeded") for e in self.errors
        )

    def update(self, batch: Any) -> None:
        """Take what the API says of the batch."""
        self.batch_id = batch.id
        self.status = batch.status
        self.output_file_id = batch.output_file_id
        self.error_file_id = batch.error_file_id
        if batch.request_counts is not None:
            self.request_counts = batch.request_counts.model_dump()
        if batch.errors is not None and batch.errors.data:
            self.errors = [f"{e.code}: {e.message}" for e in batch.errors.data]
            self.bad_lines = [e.line for e in batch.errors.data if e.line]
        ended = batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at
        if ended:
            self.seconds = float(ended - batch.created_at)

    def files(self) -> list[str]:
        """Its files in the account's storage: input, output, errors."""
        return [f for f in (self.file_id, self.output_file_id, self.error_file_id) if f]


class BatchState(BaseModel):
    endpoint: dict[str, Any]  # EndpointConfig, redacted: `recaption batches` calls it too
    queue_limit: int | None = None  # captioner.batch.max_enqueued_tokens (None: learnt)
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


# -- `recaption batches` ------------------------------------------------------------------------


async def create(
    client: openai.AsyncOpenAI,
    shard: str,
    part: Part,
    i: int,
    url: str,
    window: str,
    resumed: bool = False,
) -> None:
    """Create the part's batch, unless it exists: a create whose answer was lost (a
    dropped connection, or a kill before `resumed`) may have made it, and a second one
    would run every request twice. Only then is the batch list searched."""
    lost = resumed

    async def find_or_create() -> Any:
        nonlocal lost
        found = await find(client, part) if lost else None
        lost = True  # if this try fails, its answer may be lost too
        return found or await client.batches.create(
            input_file_id=part.file_id,
            endpoint=url,
            completion_window=window,
            metadata={"recaption_shard": shard, "recaption_part": str(i)},
        )

    part.update(await call_api(find_or_create))


async def refresh(
    client: openai.AsyncOpenAI, shard: str, state: BatchState, url: str, window: str
) -> None:
    """Where each live part stands now. A part stopped between its upload and its batch
    gets its batch here (found, or created); the caller saves the state."""
    for i, part in enumerate(state.parts):
        if part.status not in LIVE:
            continue
        if part.batch_id is None:  # stopped after the upload: the batch may exist already
            await create(client, shard, part, i, url, window, resumed=True)
        else:
            part.update(await call_api(client.batches.retrieve, part.batch_id))


async def find(client: openai.AsyncOpenAI, part: Part) -> Any:
    """The batch made from this part's file: every page of the list (`after`, until
    `has_more` is false), in whatever order the server keeps it."""
    async for batch in client.batches.list(limit=100):  # the SDK follows the pages
        if batch.input_file_id == part.file_id:
            return batch
    return None


async def delete_files(states: list[Path], delete: bool = True) -> None:
    """Delete the batches' files from the account's storage (unless not `delete`), then
    the saved states."""
    for path in states:
        state = load_state(path)
        if state is not None and delete:
            client = batch_client(state.endpoint)
            try:
                for part in state.parts:
                    for file_id in part.files():
                        with contextlib.suppress(openai.NotFoundError):
                            await call_api(client.files.delete, file_id)
            finally:
                await client.close()
        path.unlink(missing_ok=True)


async def batch_table(
    states: list[Path], written: int, written_cost: float, cancel: bool = False
) -> list[str]:
    """What the batch states of a corpus's unfinished shards hold, refreshed from the API
    where credentials allow; with `cancel`, live batches are cancelled first. Answers already
    in a cancelled batch are kept: the next run writes them and submits only the rest.
    `written`, `written_cost`: the shards committed so far and what they cost."""
    rows, statuses, note = [], {}, ""
    spent = written_cost
    queues: dict[str, dict[str, Any]] = {}  # endpoint -> enqueued tokens, quota, waiting
    for path in states:
        state = load_state(path)
        if state is None:
            continue
        client = None
        try:
            check_credentials(EndpointConfig.model_validate(state.endpoint))
            client = batch_client(state.endpoint)
        except ConfigError as exc:
            note = f"as last recorded (to refresh: {exc})"
        name = state.endpoint.get("name", "default")
        queue = queues.setdefault(name, {"tokens": 0, "live": 0, "waiting": 0, "quota": None})
        queue["quota"] = state.queue_limit
        try:
            for i, part in enumerate(state.parts):
                if client is not None and part.batch_id and part.status in LIVE:
                    if cancel:  # a batch that ended meanwhile cannot be cancelled: fine
                        with contextlib.suppress(openai.BadRequestError, openai.ConflictError):
                            await call_api(client.batches.cancel, part.batch_id)
                    part.update(await call_api(client.batches.retrieve, part.batch_id))
                if part.status in LIVE:
                    queue["tokens"] += part.tokens
                    queue["live"] += 1
                queue["waiting"] += part.over_quota
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
                        part.errors[0].split(":")[0] if part.errors else "",
                    )
                )
        finally:
            if client is not None:
                await client.close()
    header = ("shard", "part", "batch", "status", "done/failed/all", "cost", "why")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    for name, q in sorted(queues.items()):
        quota = f"{q['quota']:,}" if q["quota"] else "not set (learnt from refusals)"
        lines.append(
            f"endpoint {name}: {q['tokens']:,} tokens enqueued in {q['live']} live batches, "
            f"quota {quota}; {q['waiting']} batches refused for the quota (waiting to go again)"
        )
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"
    lines.append(f"batches of unfinished shards: {summary}" + (f"; {note}" if note else ""))
    lines.append(
        f"shards written: {written}; cost so far ${spent:.4f} "
        "(written shards, and answers read from finished batches)"
    )
    return lines
