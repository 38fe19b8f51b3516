"""Backend name -> its captioner class, imported only when that backend is used (a run
with the analyzer never imports the OpenAI SDK or transformers)."""

from __future__ import annotations

import importlib
from typing import Any

from recaption.captioners.base import Captioner
from recaption.config import PipelineConfig

BACKENDS = {
    "analyzer": "recaption.captioners.analyzer:Analyzer",
    "openai": "recaption.captioners.openai:OpenAICaptioner",
    "openai-batch": "recaption.captioners.batch:BatchCaptioner",
    "transformers": "recaption.captioners.local:TransformersCaptioner",
}


def backend_class(name: str) -> type[Captioner]:
    if name not in BACKENDS:
        raise ValueError(f"unknown captioner.backend {name!r}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def backend_of(cfg: PipelineConfig) -> type[Captioner]:
    return backend_class(cfg.captioner.backend)


def make_captioner(
    cfg: PipelineConfig,
    limiters: dict[str, Any] | None = None,
    budget: Any = None,
    queues: dict[str, Any] | None = None,
) -> Captioner:
    """What the run's workers share: `limiters` (endpoint name -> LimiterActor), `budget`
    (a BudgetActor when `limits.max_usd` caps the spend), `queues` (endpoint name -> the
    Batch API's QueueActor)."""
    captioner = backend_of(cfg)(cfg, limiters)
    captioner.share(budget, queues)
    return captioner


def captioner_identity(cfg: PipelineConfig) -> tuple[str, str, str]:
    """(backend, model, prompt_version) the run's rows will carry, known before any worker."""
    return (cfg.captioner.backend, *backend_of(cfg).identity(cfg))
