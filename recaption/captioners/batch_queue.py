"""The Batch API's enqueued-token quota for one endpoint and model, shared by every worker
of a run through a QueueActor, so that eight workers do not each fill the queue."""

from __future__ import annotations

from typing import Any

from recaption.actors import Handle, shared_actor


class QueueQuota:
    """The Batch API's enqueued-token quota for one endpoint and model: the input tokens of
    the run's live batches (validating, in progress, finalizing) stay under it. One per run,
    shared by every worker, so that eight workers do not each fill the queue.

    `limit` None: learnt. Unbounded until the API fails a batch with token_limit_exceeded;
    from then on, what it had accepted at that moment.
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.learnt: int | None = None
        self.live = 0
        self.refusals = 0
        # the API's count of a request's text tokens per token the workers estimate: the
        # most any worker has seen, so that every worker sizes its batches alike
        self.text_scale: float | None = None

    @property
    def cap(self) -> int | None:
        return self.limit if self.limit is not None else self.learnt

    def admit(self, tokens: int) -> bool:
        """Reserve room for a batch of `tokens`; False: wait for live batches to end. A
        batch alone in the queue is always let in (it is the caller's to size it)."""
        if not self.fits(tokens):
            return False
        self.live += tokens
        return True

    def fits(self, tokens: int) -> bool:
        """Would `admit` take a batch of `tokens` now? (Asked before preparing one.)"""
        cap = self.cap
        return cap is None or not self.live or self.live + tokens <= cap

    def observe(self, text_scale: float) -> float:
        """A worker's reading of the text scale; returns the run's (the most seen)."""
        self.text_scale = max(self.text_scale or 0.0, text_scale)
        return self.text_scale

    def hold(self, tokens: int) -> None:
        """Count a batch already in the queue (submitted by a run that stopped)."""
        self.live += tokens

    def release(self, tokens: int) -> None:
        self.live = max(0, self.live - tokens)

    def refused(self, tokens: int) -> None:
        """The API failed a batch of `tokens` for the quota: what else was live fits."""
        self.release(tokens)
        self.refusals += 1
        if self.limit is None:
            accepted = self.live or tokens // 2
            self.learnt = accepted if self.learnt is None else min(self.learnt, accepted)

    def state(self) -> dict[str, Any]:
        return {"limit": self.cap, "learnt": self.limit is None, "live": self.live,
                "refusals": self.refusals}  # fmt: skip


QueueActor = shared_actor(QueueQuota)


class Queue(Handle):
    """A worker's handle on a QueueQuota (local, or a QueueActor)."""

    def __init__(self, quota: QueueQuota | Any):
        super().__init__(quota, QueueQuota)
