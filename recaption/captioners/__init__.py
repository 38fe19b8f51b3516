"""Captioner backends behind one small interface.

A captioner turns a prepared image into a `Caption` plus usage, or raises `CaptionFailure`
with a rejection reason. It is created once per worker and reused for every shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from recaption.config import CaptionerConfig
from recaption.images import PreparedImage
from recaption.records import Caption, Reason


@dataclass
class CaptionResult:
    caption: Caption
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1


class CaptionFailure(Exception):
    def __init__(self, reason: Reason, detail: str, attempts: int = 1):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.attempts = attempts


class Captioner(Protocol):
    backend: str
    model: str
    prompt_version: str

    async def caption(self, image: PreparedImage) -> CaptionResult: ...


def make_captioner(cfg: CaptionerConfig) -> Captioner:
    if cfg.backend == "analyzer":
        from recaption.captioners.analyzer import Analyzer

        return Analyzer(cfg)
    raise ValueError(f"unknown captioner.backend {cfg.backend!r}")
