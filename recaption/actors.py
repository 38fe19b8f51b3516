"""A worker's handle on something the run shares: an object in this process, or the Ray actor
that holds it for every worker (the limiter, the spend cap, the batch queue)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

log = logging.getLogger(__name__)

ACTOR_TRIES = 5  # calls to a shared actor whose process died, while Ray restarts it
# its methods answer in milliseconds: none in a minute is a call Ray lost. Seen once, after a
# node died: both workers' leases were resubmitted to the restarted limiter, none came back,
# and the run hung until killed
CALL_TIMEOUT_S = 60.0


def shared_actor(cls: type) -> Any:
    """`cls` as the Ray actor a run shares: no CPU reserved (its methods take microseconds),
    restarted empty if its process dies (callers retry, see Handle.call), and no task events:
    recording each call for the dashboard costs ~20% of a call's CPU (2.3-3.0 against
    3.0-3.6 ms a call, caller and actor, on 2 cores), and these calls are many and alike
    (Ray Serve turns them off for its replicas too)."""
    options = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
    return ray.remote(**options, enable_task_events=False)(cls)


class Handle:
    """A worker's handle on something the run shares: the object itself (one process,
    tests), or the handle of the actor holding it."""

    def __init__(self, target: Any, local: type):
        self.target = target
        self.remote = not isinstance(target, local)

    async def call(self, method: str, *args: Any) -> Any:
        if not self.remote:
            return getattr(self.target, method)(*args)
        tries = 0
        while True:
            ref = getattr(self.target, method).remote(*args)
            try:
                return await asyncio.wait_for(ref, CALL_TIMEOUT_S)
            except (ray.exceptions.RayActorError, TimeoutError) as exc:
                # the actor's process died (Ray restarts it, max_restarts=-1, empty) or the
                # call was lost: a short wait here and asked again, not an image rejected
                tries += 1
                if tries == ACTOR_TRIES:
                    raise
                if isinstance(exc, TimeoutError):
                    log.warning("%s: no answer in %.0f s, asked again", method, CALL_TIMEOUT_S)
                    ray.cancel(ref)
                await asyncio.sleep(0.25 * tries)

    def tell(self, method: str, *args: Any) -> None:
        """Fire and forget: Ray runs one caller's actor calls in order."""
        if self.remote:
            getattr(self.target, method).remote(*args)
        else:
            getattr(self.target, method)(*args)
