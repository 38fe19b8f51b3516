"""The one interface every captioner backend implements, and the values it passes back.

A captioner turns a prepared image into a `CaptionResult` (a caption plus its `Usage`), or
raises `CaptionFailure` with a rejection reason and what the attempts cost. It is created
once per worker and reused for every shard. `CaptionerFatal` (recaption.errors) is for what
no row can survive: the run stops with its message instead of rejecting every image.

The class methods are what the driver asks of a backend before any worker exists: the
identity its rows will carry, static checks, a reachability preflight, the environment
workers need, the metered endpoints the run's limiters guard, and how many shards a worker
keeps at once. Each backend declares them once, on its class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from recaption.budget import Spend
from recaption.config import PipelineConfig
from recaption.errors import Rejected
from recaption.images import PreparedImage
from recaption.limits import EndpointLimits
from recaption.records import Caption, Metered, Usage


@dataclass
class CaptionResult(Metered):
    caption: Caption
    usage: Usage = field(default_factory=lambda: Usage(attempts=1))
    latency_ms: float | None = None  # None: the time the caption call took


class CaptionFailure(Rejected):
    """This image gets no caption; what its attempts used is still accounted."""


class ShardPending(Exception):
    """openai-batch with `batch.wait` off: the shard's batches are still running. Not a
    failure: the next run collects them."""


# An answer given before the shard pass (by `settle`): final, or a coroutine function that
# captions the prepared image now (the Batch API's online retries).
Answer = CaptionResult | CaptionFailure | Callable[[PreparedImage], Awaitable[CaptionResult]]


@dataclass
class ShardJob:
    """What the shard pass hands a backend that answers whole shards (the Batch API)."""

    id: str
    state: Path  # where the backend keeps this shard's resume state
    # the shard's prepared images not yet answered; `skip(key)` is asked before decoding
    images: Callable[[Callable[[str], bool]], Iterator[tuple[str, PreparedImage]]]
    validate: Callable[[Caption], Caption]  # the run's quality rules; raises Rejected


class Captioner:
    backend: ClassVar[str]
    paid: ClassVar[bool] = False  # a metered, billed API: estimate counts tokens and dollars
    # answers whole shards before their pass (`settle`): copies are found before it
    answers_shards: ClassVar[bool] = False
    model: str
    prompt_version: str
    counters: Counter[str]  # requests sent and their outcomes, for progress and the manifest
    budget: Spend | None = None  # the run's spend cap, for backends that pay per request

    def __init__(self, cfg: PipelineConfig, limiters: dict[str, Any] | None = None):
        """`limiters`: endpoint name -> the run's shared LimiterActor, for metered APIs."""
        self.counters = Counter()

    async def caption(self, image: PreparedImage) -> CaptionResult:
        raise NotImplementedError

    async def settle(self, job: ShardJob) -> dict[str, Answer]:
        """Answers for the shard before its pass; a backend that answers online gives none."""
        return {}

    async def aclose(self) -> None:
        """Release connections bound to the running event loop."""

    def describe(self) -> dict[str, Any] | None:
        """A local model's setup (device, dtype, batch), for `recaption estimate`."""
        return None

    # -- what the driver asks before any worker ------------------------------------------------

    @classmethod
    def identity(cls, cfg: PipelineConfig) -> tuple[str, str]:
        """(model, prompt_version) the run's rows will carry."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: PipelineConfig) -> None:
        """Static checks (credentials, files) before anything is written; raises UserError."""

    @classmethod
    async def preflight(cls, cfg: PipelineConfig) -> None:
        """Reachability, before workers start; raises UserError."""

    @classmethod
    def worker_env(cls, cfg: PipelineConfig) -> dict[str, str]:
        """Environment variables workers on other nodes need (credentials), sent in memory."""
        return {}

    @classmethod
    def metered_endpoints(cls, cfg: PipelineConfig) -> dict[str, EndpointLimits]:
        """Endpoint name -> its quota and capacity, for the run's shared limiters."""
        return {}

    @classmethod
    def queues(cls, cfg: PipelineConfig) -> dict[str, int | None]:
        """Endpoint name -> its Batch API enqueued-token quota, for the run's shared queues."""
        return {}

    @classmethod
    async def cleanup(cls, cfg: PipelineConfig, states: list[Path]) -> None:
        """After commits: release what committed shards left with the service (batch files)."""
        for path in states:
            path.unlink(missing_ok=True)

    def share(self, budget: Any = None, queues: dict[str, Any] | None = None) -> None:
        """Take the run's shared handles: the spend cap's Budget actor, the queue quotas."""
        self.budget = Spend(budget) if budget is not None else None

    @classmethod
    def shards_per_worker(cls, cfg: PipelineConfig) -> int:
        """Shards queued on a worker at once: the next starts while the last one drains."""
        return 2

    @classmethod
    def online(cls) -> str:
        """The backend that sends the same request answered at once (for `estimate`)."""
        return cls.backend
