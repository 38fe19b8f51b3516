"""Rate limits: one limiter per endpoint for the whole run, leased from by every worker.

Hosted models meter requests and tokens per minute per key (or Azure deployment), and may
enforce a per-minute quota over windows of a second or less. The limiter keeps a token
bucket for each, holding at most `burst_s` seconds of quota, so the client never sends
faster than the quota over any window longer than that; its average rate is exactly the
quota, which is all of it. `burst_s` left open starts at 0.25 s and halves (to 0.05 s) at
each 429 the buckets did not foresee: the server's window is shorter than ours.

A self-hosted server (vLLM) has no quota but a capacity: `max_in_flight` is held here too,
for all workers together, so that adding workers never overloads it.

    EndpointLimiter   the buckets, the slots, the pause, what the headers say (pure logic)
    LimiterActor      the same on Ray: a named actor all workers of a run share
    quota.Quota       a worker's side: leases permits in small batches, off the hot path

A request reserves its estimated tokens (prompt + image tokens + max output, which is how
OpenAI and Azure count TPM) and `settle`s the difference once `usage` is known. Responses'
`x-ratelimit-*` headers only ever lower the buckets (another client shares the key), or
set the quota when the config leaves it open. A 429 pauses the endpoint for everyone for
its `retry-after`. A worker leases what it will send in the next `LEASE_AHEAD_S` at its
recent rate, and its latest header reading (one reading is the server's whole count), its
token refunds and any permits it never used ride on that lease: a request costs no limiter
call of its own, and a lease serves several. Where the quota binds, a lease also reserves
permits up to `RESERVE_S` ahead, each with the moment it may be sent: a call's worth of
permits goes out paced at the quota's rate, not as a burst, and workers call a few times a
second, not once a request (a Ray actor call costs ~1-3 ms of CPU on each side).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from recaption.actors import shared_actor

LEASE_S = 0.2  # a lease holds at most this much of the quota, so a pause reaches all soon
RESERVE_S = 0.25  # a permit may be granted this long before it may be sent
# The burst a bucket holds until a 429 says the server's window is shorter. A saturated
# pipeline always has requests waiting, so a short burst costs it no quota; it only stops
# a lull's savings going out at once into a server that counts per fraction of a second.
BURST_S = 0.25
MIN_BURST_S = 0.05
SLOT_WAIT_S = 0.02  # every slot taken: ask again after this long


@dataclass(frozen=True)
class EndpointLimits:
    """What one endpoint allows, for all workers of a run together."""

    rpm: int | None = None  # None: learnt from x-ratelimit-limit-requests, if it sends one
    tpm: int | None = None
    burst_s: float | None = None  # None: learnt (from BURST_S, halved by unforeseen 429s)
    max_in_flight: int | None = None  # requests in flight at once (a self-hosted server)
    request_s: float = 600.0  # no request outlives this: a slot held longer was a dead worker's


class TokenBucket:
    """`rate` units per second, at most `capacity` saved up. A take larger than the capacity
    goes through once the bucket is full and leaves it in debt, so the average rate holds."""

    def __init__(self, per_minute: float, burst_s: float):
        self.burst_s = burst_s
        self.set_rate(per_minute)
        # Start empty at the first request (workers start seconds after the limiter): the
        # rate from then on, and no opening burst for a sub-second window to refuse.
        self.level = 0.0
        self.updated: float | None = None

    def set_rate(self, per_minute: float) -> None:
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate * self.burst_s)

    def refill(self, now: float) -> None:
        if self.updated is None:
            self.updated = now
        if now <= self.updated:  # a pause set `updated` ahead: nothing accrues until then
            return
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0 if now)."""
        need = min(amount, self.capacity) - self.level
        return need / self.rate if need > 1e-9 else 0.0  # float dust is not a wait


# (headers, mark, token_mark, age_s): see EndpointLimiter.observe
Reading = tuple[dict[str, str], int, int, float]


@dataclass
class Grant:
    permits: int  # requests granted
    tokens_each: int  # tokens reserved for each of them
    wait_s: float  # when permits == 0: ask again after this long (the pause, if paused)
    mark: int  # requests granted in the run up to and including this grant
    token_mark: int
    free: float = 1.0  # share of the burst (or slots) left after this grant, to pick endpoints
    delays: tuple[float, ...] = ()  # per permit: seconds from now until it may be sent


class EndpointLimiter:
    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        burst_s: float | None = None,
        max_in_flight: int | None = None,
        request_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self.learn_burst = burst_s is None
        self.burst_s = BURST_S if burst_s is None else burst_s
        self.requests = TokenBucket(rpm, self.burst_s) if rpm else None
        self.tokens = TokenBucket(tpm, self.burst_s) if tpm else None
        self.learn = {"requests": rpm is None, "tokens": tpm is None}
        self.max_in_flight, self.request_s = max_in_flight, request_s
        self.slots: deque[list[float]] = deque()  # [granted at, requests] still in flight
        self.in_flight = 0
        self.paused_until = 0.0
        self.granted = 0  # running totals, to reconcile with the server's remaining counts
        self.granted_tokens = 0
        self.pauses = 0

    def _refill(self, now: float) -> None:
        for bucket in (self.requests, self.tokens):
            if bucket:
                bucket.refill(now)

    def _free_slots(self, now: float) -> float:
        if self.max_in_flight is None:
            return float("inf")
        while self.slots and self.slots[0][0] < now - self.request_s:  # a worker died with them
            self.in_flight -= self.slots.popleft()[1]
        return self.max_in_flight - self.in_flight

    def lease(
        self,
        want: int,
        tokens_each: int,
        refund: int = 0,
        unused: int = 0,
        reading: Reading | None = None,
    ) -> Grant:
        """Up to `want` permits of `tokens_each` tokens. What the caller learnt since its
        last lease comes with it: `refund`, tokens its requests did not use (negative: used
        beyond what they reserved); `unused`, permits it never sent (the server never
        counted them); `reading`, its latest `x-ratelimit-*` headers."""
        now = self.clock()
        if refund:
            self.settle(refund)
        self._refill(now)
        if unused and self.requests:
            self.requests.level = min(self.requests.capacity, self.requests.level + unused)
            self.granted -= unused
        if reading is not None:
            self.observe(*reading)
        if now < self.paused_until:
            wait = self.paused_until - now
            return Grant(0, tokens_each, wait, self.granted, self.granted_tokens, 0.0)
        cap = max(1, int(self.requests.rate * LEASE_S)) if self.requests else want
        cap = int(min(want, cap, self._free_slots(now)))
        delays: list[float] = []
        while len(delays) < cap and (delay := self._delay(tokens_each)) <= RESERVE_S:
            # the buckets go into debt for a reserved permit: the next one's moment is later
            if self.requests:
                self.requests.level -= 1
            if self.tokens:
                self.tokens.level -= tokens_each
            delays.append(delay)
        permits = len(delays)
        self.granted += permits
        self.granted_tokens += permits * tokens_each
        if permits and self.max_in_flight is not None:
            self.in_flight += permits
            self.slots.append([now, permits])
        wait = 0.0
        if not permits:
            wait = max(
                self._delay(tokens_each) - RESERVE_S,
                SLOT_WAIT_S if self._free_slots(now) <= 0 else 0.0,
            )
        shares = [max(0.0, b.level) / b.capacity for b in (self.requests, self.tokens) if b]
        if self.max_in_flight is not None:
            shares.append(max(0.0, self._free_slots(now)) / self.max_in_flight)
        free = min(shares, default=1.0)
        return Grant(
            permits, tokens_each, wait, self.granted, self.granted_tokens, free, tuple(delays)
        )

    def _delay(self, tokens_each: int) -> float:
        """Seconds until the buckets hold one more request of `tokens_each` tokens."""
        return max(
            self.requests.wait(1) if self.requests else 0.0,
            self.tokens.wait(tokens_each) if self.tokens else 0.0,
        )

    def release(self, requests: int) -> None:
        """`requests` granted earlier are answered (or were never sent): their slots are free."""
        self.in_flight = max(0, self.in_flight - requests)
        while requests and self.slots:  # the oldest grants first: they would expire first
            taken = min(requests, int(self.slots[0][1]))
            self.slots[0][1] -= taken
            requests -= taken
            if not self.slots[0][1]:
                self.slots.popleft()

    def settle(self, tokens: int) -> None:
        """Give back (positive) or charge (negative) tokens once the real count is known."""
        if self.tokens:
            self._refill(self.clock())
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + tokens)

    def pause(self, seconds: float) -> None:
        """A 429: nobody sends to this endpoint for `seconds`; the buckets start empty after.
        One the buckets did not foresee also says the server's window is shorter than our
        burst: a learnt burst halves (once a pause, however many 429s it explains)."""
        now = self.clock()
        self._refill(now)
        if now >= self.paused_until and self.learn_burst and self.burst_s > MIN_BURST_S:
            self.burst_s = max(MIN_BURST_S, self.burst_s / 2)
            for bucket in (self.requests, self.tokens):
                if bucket:
                    bucket.burst_s = self.burst_s
                    bucket.set_rate(bucket.rate * 60)
        if now + seconds > self.paused_until:
            self.pauses += 1
            self.paused_until = now + seconds
        for bucket in (self.requests, self.tokens):
            if bucket:
                bucket.level = min(bucket.level, 0.0)
                bucket.updated = self.paused_until

    def observe(self, headers: Mapping[str, str], mark: int, token_mark: int, age_s: float) -> None:
        """Reconcile with the server's `x-ratelimit-*` view as of the request granted at
        `mark`, `age_s` seconds ago: since then we granted more, and the server refilled."""
        now = self.clock()
        self._refill(now)
        for kind, lag in (
            ("requests", self.granted - mark),
            ("tokens", self.granted_tokens - token_mark),
        ):
            bucket = getattr(self, kind)
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            if self.learn[kind] and limit:
                if bucket is None:
                    bucket = TokenBucket(limit, self.burst_s)
                    bucket.refill(now)
                    setattr(self, kind, bucket)
                elif bucket.rate * 60 != limit:
                    bucket.set_rate(limit)
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if bucket and remaining is not None:
                server_now = remaining - lag + age_s * bucket.rate
                bucket.level = min(bucket.level, server_now)

    def state(self) -> dict[str, Any]:
        now = self.clock()
        self._refill(now)
        return {
            "rpm": self.requests.rate * 60 if self.requests else None,
            "tpm": self.tokens.rate * 60 if self.tokens else None,
            "paused_s": max(0.0, self.paused_until - now),
            "granted": self.granted,
            "pauses": self.pauses,
            "burst_s": self.burst_s,
            "in_flight": self.in_flight if self.max_in_flight is not None else None,
        }


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# Sync methods are microseconds each; the actor answers them one at a time, in call order.
# If its node dies it restarts empty (a fresh bucket) and callers' calls are retried.
LimiterActor = shared_actor(EndpointLimiter)
