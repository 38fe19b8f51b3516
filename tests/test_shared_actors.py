"""A worker's calls to the run's shared actors (limiter, spend cap, batch queue) on a real Ray."""

import asyncio
import time

import pytest
import ray

from recaption import actors
from recaption.actors import Handle, shared_actor


def slow_class() -> type:
    """An actor whose first answer comes late: to its caller, a call Ray lost looks like this.
    Made in a function, so that Ray's workers get it by value (they cannot import tests)."""

    class Slow:
        def __init__(self, first_s: float):
            self.first_s, self.calls = first_s, 0

        def ask(self, x: int) -> tuple[int, int]:
            self.calls += 1
            if self.calls == 1:
                time.sleep(self.first_s)
            return x, self.calls

    return Slow


def test_a_call_without_an_answer_is_asked_again_then_given_up(ray_cluster, monkeypatch, caplog):
    Slow = slow_class()
    slow, stuck = shared_actor(Slow).remote(1.5), shared_actor(Slow).remote(30.0)
    ray.get([slow.__ray_ready__.remote(), stuck.__ray_ready__.remote()])  # started: the clock
    monkeypatch.setattr(actors, "CALL_TIMEOUT_S", 1.0)  # runs from the first call on
    handle = Handle(slow, Slow)
    # the first call times out and is asked again (at 1.25 s); the actor answers the second
    assert asyncio.run(handle.call("ask", 7)) == (7, 2)
    assert "ask: no answer in 1 s, asked again" in caplog.text

    monkeypatch.setattr(actors, "ACTOR_TRIES", 2)
    with pytest.raises(TimeoutError):  # a bounded wait, then the shard fails, resumable
        asyncio.run(Handle(stuck, Slow).call("ask", 1))
