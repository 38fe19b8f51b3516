"""The rate limiter's arithmetic on a simulated clock, and the image-token and price rules."""

import asyncio

import pytest

from recaption.limits import EndpointLimiter
from recaption.pricing import PRICES, Price, image_tokens, price_for
from recaption.quota import Permit, Quota


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(limiter: EndpointLimiter, clock: Clock, seconds: float, tokens: int = 1) -> int:
    """Lease one permit at a time and send it at its moment, for `seconds`; returns permits
    sent within them."""
    end, sent = clock.now + seconds, 0
    while clock.now < end:
        grant = limiter.lease(1, tokens)
        if not grant.permits and grant.wait_s == 0:
            pytest.fail("no permit and no wait")
        clock.now += grant.delays[0] if grant.permits else grant.wait_s
        sent += grant.permits and clock.now < end
    return sent


def test_rpm_is_used_in_full_and_never_exceeded():
    clock = Clock()
    limiter = EndpointLimiter(rpm=600, tpm=None, clock=clock)
    # from empty: exactly the rate, from the first second on, in every minute
    assert drain(limiter, clock, 60) in (599, 600)
    assert drain(limiter, clock, 60) in (599, 600, 601)


def test_tpm_counts_reserved_tokens_and_settle_refunds():
    clock = Clock()
    limiter = EndpointLimiter(rpm=None, tpm=60_000, clock=clock)  # 1000 tokens a second
    assert drain(limiter, clock, 60, tokens=1000) in (59, 60)
    # each request really used half its reservation: refunds double the throughput
    granted, end = 0, clock.now + 60
    while clock.now < end:
        grant = limiter.lease(1, 1000)
        if grant.permits:
            granted += 1
            limiter.settle(500)
        else:
            clock.now += grant.wait_s
    assert 118 <= granted <= 122


def test_a_request_larger_than_the_burst_still_goes_through():
    clock = Clock()
    limiter = EndpointLimiter(rpm=None, tpm=6000, clock=clock)  # 100 tokens a second
    assert drain(limiter, clock, 100, tokens=2000) in (5, 6)  # 10000 tokens / 2000


def test_a_pause_stops_everyone_and_the_rate_resumes_without_a_burst():
    clock = Clock()
    limiter = EndpointLimiter(rpm=600, tpm=None, clock=clock)
    limiter.pause(10)
    grant = limiter.lease(4, 1)
    assert grant.permits == 0 and grant.wait_s == pytest.approx(10)
    clock.now += 9.99
    assert limiter.lease(1, 1).permits == 0
    clock.now += 0.01
    # the pause does not accrue a burst: the first second after it yields the rate
    assert drain(limiter, clock, 1.0) in (9, 10)
    assert limiter.state()["pauses"] == 1


def test_leases_hold_a_fifth_of_a_second_of_quota_reserved_at_its_pace():
    clock = Clock()
    fast = EndpointLimiter(rpm=60_000, tpm=None, clock=clock)  # 1000 a second
    slow = EndpointLimiter(rpm=600, tpm=None, clock=clock)
    # buckets start empty (no opening burst): a lease reserves what comes, each permit at
    # its moment, never a burst and never more than 0.2 s of quota
    grant = fast.lease(500, 1)
    assert grant.permits == 200
    assert grant.delays == pytest.approx([(i + 1) / 1000 for i in range(200)])
    assert slow.lease(8, 1).delays == pytest.approx((0.1, 0.2))
    # reserved up to RESERVE_S ahead: the next lease waits until its permit is that close
    later = slow.lease(8, 1)
    assert later.permits == 0 and later.wait_s == pytest.approx(0.3 - 0.25)
    clock.now += 1
    assert fast.lease(500, 1).delays == (0.0,) * 200  # saved up: sent now, up to the burst


def test_headers_lower_the_buckets_and_teach_an_open_quota():
    clock = Clock()
    limiter = EndpointLimiter(rpm=600, tpm=None, burst_s=1.0, clock=clock)
    limiter.lease(1, 100)  # the first request starts the bucket
    clock.now += 1  # a full bucket: 10
    grant = limiter.lease(1, 100)
    for _ in range(3):  # three more requests granted after the observed one
        limiter.lease(1, 100)
    # another client shares the key: the server said 5 left as of our first request, 0.2 s
    # ago; since then we sent 3 more and it refilled 2 (10 a second)
    limiter.observe({"x-ratelimit-remaining-requests": "5"}, grant.mark, grant.token_mark, 0.2)
    assert limiter.requests.level == pytest.approx(4)
    # plenty left: nothing changes
    limiter.observe({"x-ratelimit-remaining-requests": "590"}, grant.mark, grant.token_mark, 0.2)
    assert limiter.requests.level == pytest.approx(4)

    open_quota = EndpointLimiter(rpm=None, tpm=None, clock=clock)
    assert open_quota.lease(50, 10).permits == 50  # nothing known: no limit
    open_quota.observe(
        {"x-ratelimit-limit-requests": "120", "x-ratelimit-limit-tokens": "6000"}, 50, 500, 0.1
    )
    assert open_quota.state()["rpm"] == 120 and open_quota.state()["tpm"] == 6000


def test_a_worker_quota_leases_and_returns_unused_permits():
    async def go():
        limiter = EndpointLimiter(rpm=6000, tpm=None)  # leases of up to 10
        quota = Quota(limiter)
        limiter.lease(1, 10)  # the first request starts the bucket
        await asyncio.sleep(0.15)  # let it fill a little
        quota.waiting = 5  # as if five coroutines were waiting
        first = await quota.try_acquire(10)
        assert isinstance(first, Permit) and len(quota.pocket) >= 1
        marks = [first.mark] + [p.mark for p in quota.pocket]
        assert marks == sorted(set(marks))
        quota.pause(5)
        assert not quota.pocket and limiter.state()["paused_s"] > 4
        assert await quota.try_acquire(10) == pytest.approx(5, abs=0.1)

    asyncio.run(go())


def test_image_tokens_follow_the_published_rules():
    # GPT-4o / GPT-4.1: 85 + 170 per 512-px tile after fitting 2048 and shortest side 768
    assert image_tokens("gpt-4.1", 1024, 1024) == 765
    assert image_tokens("gpt-4o-2024-08-06", 2048, 4096) == 1105
    assert image_tokens("gpt-4.1", 4000, 3000, detail="low") == 85
    assert image_tokens("gpt-4.1", 512, 384) == 255
    # GPT-4.1-mini: 32-px patches, at most 1536, times 1.62
    assert image_tokens("gpt-4.1-mini", 1024, 1024) == 1659
    assert image_tokens("gpt-4.1-mini", 1800, 2400) == 2353  # 1452 patches
    assert image_tokens("gpt-4.1-nano-2025-04-14", 64, 64) == 10


def test_prices_match_models_and_snapshots():
    assert price_for("gpt-4.1-2025-04-14") == PRICES["gpt-4.1"]
    assert price_for("gpt-4.1-mini") == PRICES["gpt-4.1-mini"]
    assert price_for("Qwen/Qwen2.5-VL-7B-Instruct").cost(10**6, 10**6) == 0
    assert price_for("gpt-4.1", Price(1, 1)).cost(10**6, 0) == 1
    assert PRICES["gpt-4.1"].cost(1_000_000, 1_000_000) == pytest.approx(10.0)


def test_slots_cap_requests_in_flight_and_a_dead_workers_slots_expire():
    clock = Clock()
    limiter = EndpointLimiter(max_in_flight=4, request_s=60, clock=clock)
    assert limiter.lease(3, 1).permits == 3  # no quota: only the slots bound it
    grant = limiter.lease(3, 1)
    assert grant.permits == 1 and grant.free == 0.0
    refused = limiter.lease(1, 1)
    assert refused.permits == 0 and refused.wait_s > 0  # full: ask again soon
    limiter.release(2)  # two answered
    assert limiter.lease(5, 1).permits == 2
    clock.now += 61  # the worker holding the rest died: its slots come back
    assert limiter.lease(5, 1).permits == 4
    assert limiter.state()["in_flight"] == 4


def test_a_learnt_burst_halves_at_each_unforeseen_429_down_to_a_twentieth_of_a_second():
    clock = Clock()
    limiter = EndpointLimiter(rpm=6000, clock=clock)  # 100 a second
    assert limiter.burst_s == 0.25 and limiter.requests.capacity == 25
    limiter.pause(0.2)
    limiter.pause(0.2)  # the same pause explains this one: no second halving
    assert limiter.burst_s == 0.125 and limiter.requests.capacity == 12.5
    for _ in range(6):
        clock.now += 1
        limiter.pause(0.2)
    assert limiter.burst_s == 0.05 and limiter.requests.capacity == 5
    fixed = EndpointLimiter(rpm=600, burst_s=0.5, clock=clock)
    fixed.pause(0.2)
    assert fixed.burst_s == 0.5  # set in the config: kept


def test_a_worker_sends_refunds_readings_and_unused_permits_with_its_next_lease():
    class Counting(EndpointLimiter):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.observed: list = []

        def observe(self, *args) -> None:
            self.observed.append(args)
            super().observe(*args)

    async def go():
        limiter = Counting(rpm=60_000, tpm=6_000_000)  # 1,000 requests, 100k tokens a second
        quota = Quota(limiter)
        limiter.lease(1, 1)  # the first request starts the bucket
        await asyncio.sleep(0.05)
        permit = await quota.try_acquire(500)
        assert isinstance(permit, Permit)
        quota.settle(permit, 100)  # 400 unused: owed to the bucket, not a call of its own
        for remaining in ("99999", "99000", "98000"):  # a burst of replies: no calls
            quota.observe({"x-ratelimit-remaining-tokens": remaining}, permit)
        assert limiter.observed == [] and quota.refund == 400
        before_tokens, granted = limiter.tokens.level, limiter.granted
        quota.pocket_expires = 0  # the pocket's permits were never sent: they go back
        unsent = len(quota.pocket)
        await quota.try_acquire(1)
        assert quota.refund == 0 and quota.unused == 0 and quota.reading is None
        assert len(limiter.observed) == 1  # the newest reading, once
        headers, mark, _, age_s = limiter.observed[0]
        assert headers == {"x-ratelimit-remaining-tokens": "98000"} and mark == permit.mark
        assert age_s > 0
        # the refund and the unsent permits' tokens are back, the new lease's taken out
        taken = limiter.granted - (granted - unsent)
        assert limiter.tokens.level >= before_tokens + 400 - taken - 1e-6

    asyncio.run(go())


def test_a_busy_worker_leases_ahead_of_its_demand():
    async def go():
        limiter = EndpointLimiter(rpm=600_000)  # never the limit here: leases of up to 16
        quota = Quota(limiter)
        calls = 0
        lease = limiter.lease

        def counting(*args):
            nonlocal calls
            calls += 1
            return lease(*args)

        limiter.lease = counting
        limiter.lease(1, 1)
        await asyncio.sleep(0.02)
        for _ in range(400):  # one coroutine, a request every millisecond
            assert isinstance(await quota.try_acquire(1), Permit)
            await asyncio.sleep(0.001)
        # one call a permit, at first; then what ~0.25 s of this demand needs (capped at 16)
        assert calls < 400 / 4

    asyncio.run(go())


def test_coroutines_wait_in_line_for_reserved_permits_instead_of_polling():
    """32 coroutines of one worker on a binding quota: each permit is asked for about once
    (they queue on the quota), not once per waiting coroutine, and sends keep the pace."""
    from recaption.captioners.endpoints import Endpoint, EndpointPool
    from recaption.config import CaptionerConfig, EndpointConfig

    async def go() -> tuple[int, list[float]]:
        quota = Quota(EndpointLimiter(rpm=6_000))  # 100 a second: leases reserve ahead
        asks = 0
        ask = quota.try_acquire

        async def counted(*args, **kwargs):
            nonlocal asks
            asks += 1
            return await ask(*args, **kwargs)

        quota.try_acquire = counted
        pool = EndpointPool([Endpoint(EndpointConfig(name="a"), quota, CaptionerConfig())])
        sent: list[float] = []
        end = asyncio.get_running_loop().time() + 1.5

        async def worker() -> None:
            while asyncio.get_running_loop().time() < end:
                _, permit = await pool.acquire(1)
                sent.append(permit.granted_at)
                quota.done(permit)

        await asyncio.gather(*(worker() for _ in range(32)))
        return asks, sent

    asks, sent = asyncio.run(go())
    assert len(sent) > 100
    assert asks < 3 * len(sent)  # polling: ~32 asks a permit
    paced = sorted(sent)
    span = paced[-1] - paced[10]
    assert (len(paced) - 11) / span < 100 * 1.1  # the quota's pace, not a burst
