"""What a shard's batches are, kept as ids only: `CORPUS/.batches/NNNNN.json`
(corpus.batch_state_path), saved the moment the API returns an id. Also the Files/Batches
API call with its retries, and the `recaption batches` table."""

from __future__ import annotations

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
    errors: list[str] = []  # why the API failed the batch
    seconds: float | None = None  # from creation to the end, once it ended
    usage: dict[str, float] | None = None  # what its answers cost, once read

    def update(self, batch: Any) -> None:
        """Take what the API says of the batch."""
        part = self
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


# -- `recaption batches` ------------------------------------------------------------------------


async def batch_table(
    states: list[Path], written: int, written_cost: float, cancel: bool = False
) -> list[str]:
    """What the batch states of a corpus's unfinished shards hold, refreshed from the API
    where credentials allow; with `cancel`, live batches are cancelled first. Answers already
    in a cancelled batch are kept: the next run writes them and submits only the rest.
    `written`, `written_cost`: the shards committed so far and what they cost."""
    rows, statuses, note = [], {}, ""
    spent = written_cost
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
        try:
            for i, part in enumerate(state.parts):
                if client is not None and part.batch_id and part.status in LIVE:
                    if cancel:
                        await call_api(client.batches.cancel, part.batch_id)
                    part.update(await call_api(client.batches.retrieve, part.batch_id))
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
    header = ("shard", "part", "batch", "status", "done/failed/all", "cost")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"
    lines.append(f"batches of unfinished shards: {summary}" + (f"; {note}" if note else ""))
    lines.append(
        f"shards written: {written}; cost so far ${spent:.4f} "
        "(written shards, and answers read from finished batches)"
    )
    return lines
