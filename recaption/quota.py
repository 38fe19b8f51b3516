"""A worker's side of an endpoint's limiter (`limits.py`): permits leased a few at a time.

A request costs no limiter call of its own: the worker leases what it will send in the next
`LEASE_AHEAD_S` at its recent rate, and its refunds, unused permits and latest header reading
ride on the next lease. Coroutines wait here, in line, for permits reserved for a moment
just ahead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recaption.actors import Handle
from recaption.limits import LEASE_S, EndpointLimiter, Grant, Reading

LEASE_TTL_S = 0.5  # permits unused this long past their moment go back: nobody sits on quota
LEASE_AHEAD_S = 0.5  # a lease asks for this long of the worker's own recent demand
LEASE_MAX = 32  # permits a worker asks for at once


@dataclass
class Permit:
    tokens: int  # reserved for this request
    mark: int
    token_mark: int
    granted_at: float  # time.monotonic() in this process at which it may be sent


class Quota(Handle):
    """A worker's side of one endpoint's limiter, local or a `LimiterActor` handle.

    `try_acquire` returns a Permit, or the seconds to wait before trying again. Permits are
    leased a few at a time (what this worker sends in `LEASE_AHEAD_S` at its recent rate,
    and at least as many as coroutines are waiting; the limiter grants at most `LEASE_S` of
    the endpoint's quota, each permit with its moment) and go back if unused, so a pause
    announced by any worker stops every worker within a request. Coroutines wait in line
    for reserved permits, one at a time. `done` frees a permit's slot once its request is
    answered (endpoints with max_in_flight).
    """

    def __init__(self, limiter: EndpointLimiter | Any, slots: bool = False):
        super().__init__(limiter, EndpointLimiter)
        self.slots = slots  # the endpoint caps requests in flight: permits hold a slot
        self.pocket: list[Permit] = []
        self.pocket_expires = 0.0
        self.not_before = 0.0  # no lease before this: paused, or the limiter said to wait
        self.free = 1.0  # as of the last lease
        self.waiting = 0
        # what goes with the next lease: tokens to give back (negative: to charge), permits
        # never sent, the latest header reading
        self.refund = 0
        self.unused = 0
        self.reading: Reading | None = None  # its age_s: granted_at, in this process
        self.taken = 0  # permits used since the last lease
        self.last_lease = time.monotonic()
        self.rate = 0.0  # permits a second this worker has been using
        self._lock = asyncio.Lock()

    async def try_acquire(self, tokens: int, wait: bool = True) -> Permit | float:
        """A permit, or the seconds to wait before asking again. A permit reserved for a
        moment at most RESERVE_S away is waited for here, in line (`wait`), so the other
        coroutines queue on the lock instead of all sleeping to the same moment and all but
        one finding it gone: with 32 waiters that herd cost ~2 ms of CPU a request.
        `wait=False` returns the seconds instead (a pool with other endpoints to try)."""
        now = time.monotonic()
        if now < self.not_before:
            return self.not_before - now
        self.waiting += 1
        try:
            async with self._lock:
                while True:
                    now = time.monotonic()
                    if self.pocket and now < self.pocket_expires:
                        ahead = self.pocket[0].granted_at - now
                        if ahead <= 0:
                            return self._take()
                        if not wait:
                            return ahead
                        await asyncio.sleep(ahead)
                        continue  # a pause may have emptied the pocket meanwhile
                    if now < self.not_before:  # the limiter said when: no need to ask again
                        return self.not_before - now
                    self._return_pocket()
                    grant: Grant = await self.call("lease", self._want(now), tokens, *self._news())
                    self.free = grant.free
                    if not grant.permits:
                        # One lease call per wait, not one per waiting coroutine. Where the
                        # quota binds, let a lease's worth accrue (the bucket keeps it) rather
                        # than ask again for each permit: W workers polling per permit cost W
                        # calls each.
                        wait_s = grant.wait_s + (0.0 if self.slots else LEASE_S)
                        self.not_before = time.monotonic() + wait_s
                        return wait_s
                    n, each, now = grant.permits, grant.tokens_each, time.monotonic()
                    self.pocket = [
                        Permit(
                            each,
                            grant.mark - n + 1 + i,
                            grant.token_mark - (n - 1 - i) * each,
                            now + grant.delays[i],
                        )
                        for i in range(n)
                    ]
                    self.pocket_expires = now + grant.delays[-1] + LEASE_TTL_S
        finally:
            self.waiting -= 1

    def _take(self) -> Permit:
        self.taken += 1
        return self.pocket.pop(0)

    def _want(self, now: float) -> int:
        """As many as are waiting, or what this worker will use in LEASE_AHEAD_S at the
        rate it used permits since its last lease (smoothed), if more."""
        elapsed = now - self.last_lease
        if elapsed > 0:
            recent = self.taken / elapsed
            self.rate = recent if elapsed > LEASE_TTL_S else (self.rate + recent) / 2
        self.taken, self.last_lease = 0, now
        return max(1, min(LEASE_MAX, max(self.waiting, round(self.rate * LEASE_AHEAD_S))))

    def _news(self) -> tuple[int, int, Reading | None]:
        """What the limiter learns with this lease; each is sent once."""
        reading = self.reading
        if reading is not None:  # its age as of now: the limiter adds what refilled since
            reading = (*reading[:3], time.monotonic() - reading[3])
        news = (self.refund, self.unused, reading)
        self.refund, self.unused, self.reading = 0, 0, None
        return news

    def _return_pocket(self) -> None:
        if self.pocket:
            self.refund += sum(p.tokens for p in self.pocket)
            self.unused += len(self.pocket)
            if self.slots:
                self.tell("release", len(self.pocket))
            self.pocket = []

    def done(self, permit: Permit) -> None:
        """The request of `permit` is answered, or failed: its slot is free for any worker."""
        if self.slots:
            self.tell("release", 1)

    def settle(self, permit: Permit, tokens_used: int) -> None:
        self.refund += permit.tokens - tokens_used  # goes with the next lease

    def observe(self, headers: Mapping[str, str], permit: Permit) -> None:
        """Keep the newest reading for the next lease: each is the server's whole count."""
        wanted = {k: v for k, v in headers.items() if k.startswith("x-ratelimit-")}
        if wanted and (self.reading is None or permit.mark >= self.reading[1]):
            self.reading = (wanted, permit.mark, permit.token_mark, permit.granted_at)

    def pause(self, seconds: float) -> None:
        self.not_before = max(self.not_before, time.monotonic() + seconds)
        if self.slots and self.pocket:
            self.tell("release", len(self.pocket))
        # sent to nobody, but not handed back: the buckets start empty after a pause
        self.pocket = []
        self.tell("pause", seconds)
