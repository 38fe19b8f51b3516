"""Answering one prepared image: the captioner's call (or an answer a backend already has),
then validation. The shard pass and `recaption estimate` both answer images this way."""

from __future__ import annotations

import time

from recaption.captioners.base import Answer, Captioner, CaptionFailure, CaptionResult
from recaption.config import ValidationConfig
from recaption.errors import BudgetSpent, CaptionerFatal, Rejected
from recaption.images import PreparedImage
from recaption.reading import Timer
from recaption.records import Caption, Reason, Usage
from recaption.validation import validate_caption


async def answer(
    captioner: Captioner,
    image: PreparedImage,
    rules: ValidationConfig,
    given: Answer | None = None,
    timer: Timer | None = None,
) -> tuple[CaptionResult, Caption]:
    """Answer one prepared image and validate the caption: (the result, the caption as it is
    stored). Raises Rejected, carrying what the attempts cost, when it gets no caption."""
    timer = timer if timer is not None else Timer()
    t0 = time.perf_counter()
    with timer("caption"):
        try:
            if isinstance(given, CaptionFailure):
                raise given
            if isinstance(given, CaptionResult):
                result = given
            else:
                result = await (given or captioner.caption)(image)
        except (Rejected, CaptionerFatal, BudgetSpent):
            raise  # a rejection for this image; or nothing more can be captioned
        except Exception as exc:  # a backend bug must cost one row, not the shard
            detail = f"{type(exc).__name__}: {exc}"
            raise CaptionFailure(Reason.caption_error, detail, Usage(attempts=1)) from None
    if result.latency_ms is None:
        result.latency_ms = (time.perf_counter() - t0) * 1000
    with timer("validate"):
        try:
            return result, validate_caption(result.caption, rules)
        except Rejected as exc:
            exc.usage = result.usage  # the caption was paid for
            raise
