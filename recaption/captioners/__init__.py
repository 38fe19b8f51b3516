"""Captioner backends behind one small interface.

A captioner turns a prepared image into a `Caption` plus usage, or raises `CaptionFailure`
with a rejection reason. It is created once per worker and reused for every shard.
`CaptionerFatal` is for what no row can survive (a revoked key, an unknown model): the
run stops with its message instead of rejecting every image.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from recaption.config import PipelineConfig
from recaption.images import PreparedImage
from recaption.records import Caption, Reason


@dataclass
class CaptionResult:
    caption: Caption
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    outcomes: Counter[str] = field(default_factory=Counter)  # API requests and their kinds
    latency_ms: float | None = None  # None: the time the caption call took


class CaptionFailure(Exception):
    """This image gets no caption; what its attempts used is still accounted."""

    def __init__(
        self,
        reason: Reason,
        detail: str,
        attempts: int = 1,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost_usd: float = 0.0,
        outcomes: Counter[str] | None = None,
    ):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.attempts = attempts
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cost_usd = cost_usd
        self.outcomes = outcomes or Counter()


class CaptionerFatal(Exception):
    """The backend cannot caption anything; the message is one line for the user."""


class ShardPending(Exception):
    """openai-batch with `batch.wait` off: the shard's batches are still running. Not a
    failure: the next run collects them."""


OPENAI_BACKENDS = ("openai", "openai-batch")  # the OpenAI API, online or by the Batch API


class Captioner(Protocol):
    backend: str
    model: str
    prompt_version: str
    counters: Counter[str]  # requests sent and their outcomes, for progress and the manifest

    async def caption(self, image: PreparedImage) -> CaptionResult: ...

    async def aclose(self) -> None:
        """Release connections bound to the running event loop."""


# A backend that answers a whole shard at once (the Batch API) also has
#     async def settle(self, shard, answered) -> dict[key, Answer]
# which the pipeline awaits before its pass over the shard; see captioners/batch.py.
Answer = CaptionResult | CaptionFailure | Callable[[PreparedImage], Awaitable[CaptionResult]]


def make_captioner(cfg: PipelineConfig, limiters: dict[str, Any] | None = None) -> Captioner:
    """`limiters`: endpoint name -> shared LimiterActor, for backends that call a metered API."""
    if cfg.captioner.backend == "analyzer":
        from recaption.captioners.analyzer import Analyzer

        return Analyzer(cfg.captioner)
    if cfg.captioner.backend == "openai":
        from recaption.captioners.openai import OpenAICaptioner

        return OpenAICaptioner(cfg.captioner, cfg.limits, limiters)
    if cfg.captioner.backend == "openai-batch":
        from recaption.captioners.batch import BatchCaptioner

        return BatchCaptioner(cfg, limiters)
    if cfg.captioner.backend == "transformers":
        from recaption.captioners.local import TransformersCaptioner

        return TransformersCaptioner(cfg.captioner)
    raise ValueError(f"unknown captioner.backend {cfg.captioner.backend!r}")


def captioner_identity(cfg: PipelineConfig) -> tuple[str, str, str]:
    """(backend, model, prompt_version) the run's rows will carry, known before any worker."""
    if cfg.captioner.backend == "analyzer":
        from recaption.captioners.analyzer import DEFAULT_MODEL, VERSION

        return "analyzer", cfg.captioner.model or DEFAULT_MODEL, VERSION
    if cfg.captioner.backend == "transformers":
        from recaption.captioners.local import check_model_path
        from recaption.captioners.openai import load_prompt

        model = cfg.captioner.model or check_model_path(cfg.captioner).name
        return "transformers", model, load_prompt(cfg.captioner.prompt)[0]
    from recaption.captioners.openai import DEFAULT_MODEL, load_prompt

    model = cfg.captioner.model or DEFAULT_MODEL
    return cfg.captioner.backend, model, load_prompt(cfg.captioner.prompt)[0]


def metered_endpoints(cfg: PipelineConfig) -> dict[str, tuple[int | None, int | None]]:
    """Endpoint name -> (rpm, tpm) for backends whose quota the run's workers share."""
    if cfg.captioner.backend in OPENAI_BACKENDS:  # batch: for its online retries
        from recaption.captioners.openai import endpoint_configs

        return {ep.name: (ep.rpm, ep.tpm) for ep in endpoint_configs(cfg.captioner, cfg.limits)}
    return {}


async def preflight(cfg: PipelineConfig) -> None:
    """Before any work: credentials present, endpoints reachable. Raises ConfigError or
    CaptionerFatal."""
    if cfg.captioner.backend in OPENAI_BACKENDS:
        from recaption.captioners.openai import preflight as openai_preflight

        await openai_preflight(cfg.captioner, cfg.limits)
    if cfg.captioner.backend == "transformers":
        from recaption.captioners.local import check_model_path

        check_model_path(cfg.captioner)


def worker_env(cfg: PipelineConfig) -> dict[str, str]:
    """The environment variables workers on other nodes need (credentials, endpoints).
    They travel to the worker actors in memory and are never written."""
    if cfg.captioner.backend not in OPENAI_BACKENDS:
        return {}
    from recaption.captioners.openai import ENV_VARS, endpoint_configs, key_env

    names = {*ENV_VARS, *(key_env(ep) for ep in endpoint_configs(cfg.captioner, cfg.limits))}
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}
