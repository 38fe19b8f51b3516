"""A worker's handle on something the run shares: an object in this process, or the Ray actor
that holds it for every worker (the limiter, the spend cap, the batch queue)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray

ACTOR_TRIES = 5  # calls to a shared actor whose process died, while Ray restarts it


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
            try:
                return await getattr(self.target, method).remote(*args)
            except ray.exceptions.RayActorError:
                # the actor's process died: Ray restarts it (max_restarts=-1), empty, and
                # a call lost with it is a short wait here, not an image rejected
                tries += 1
                if tries == ACTOR_TRIES:
                    raise
                await asyncio.sleep(0.25 * tries)

    def tell(self, method: str, *args: Any) -> None:
        """Fire and forget: Ray runs one caller's actor calls in order."""
        if self.remote:
            getattr(self.target, method).remote(*args)
        else:
            getattr(self.target, method)(*args)
