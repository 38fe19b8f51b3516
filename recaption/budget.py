"""The run's spending cap (`limits.max_usd`): one Budget per run, shared by every worker and
endpoint through a BudgetActor, and what the driver says when it is reached."""

from __future__ import annotations

import asyncio
from typing import Any

from recaption.actors import Handle, shared_actor
from recaption.config import PipelineConfig
from recaption.corpus import Committed, CorpusStore
from recaption.errors import BudgetSpent


class Budget:
    """The run's spending cap (`limits.max_usd`), in US dollars: what the corpus cost before
    the run, what requests in flight may still cost (reserved at their most), and what they
    did cost. One per run, shared by every worker and endpoint.

    A request that does not fit waits while others are in flight (they usually cost less
    than reserved and give the rest back); when nothing is in flight and it still does not
    fit, the budget is spent and every later reservation is refused.
    """

    def __init__(self, cap: float, spent: float = 0.0):
        self.cap = cap
        self.spent = spent
        self.reserved = 0.0
        self.stopped = False

    def reserve(self, usd: float) -> str:
        """ "ok" (reserved), "wait" (ask again soon) or "stop" (the cap is reached)."""
        if self.stopped:
            return "stop"
        if self.spent + self.reserved + usd <= self.cap:
            self.reserved += usd
            return "ok"
        if self.reserved > 1e-12:
            return "wait"
        self.stopped = True
        return "stop"

    def hold(self, usd: float) -> None:
        """Count what already-submitted work (a live batch) can cost, cap or not."""
        self.reserved += usd

    def settle(self, reserved: float, spent: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += spent

    def state(self) -> dict[str, Any]:
        return {"cap": self.cap, "spent": self.spent, "reserved": self.reserved,
                "stopped": self.stopped}  # fmt: skip


BudgetActor = shared_actor(Budget)


class Spend(Handle):
    """A worker's handle on the run's Budget (local, or a BudgetActor)."""

    def __init__(self, budget: Budget | Any):
        super().__init__(budget, Budget)

    async def reserve(self, usd: float, wait: bool = True) -> None:
        """Returns once `usd` is reserved; raises BudgetSpent at the cap (or, without
        `wait`, when it does not fit now)."""
        while (answer := await self.call("reserve", usd)) == "wait" and wait:
            await asyncio.sleep(0.05)
        if answer != "ok":
            raise BudgetSpent("the spend cap (limits.max_usd) is reached")

    async def hold(self, usd: float) -> None:
        await self.call("hold", usd)

    def settle(self, reserved: float, spent: float) -> None:
        self.tell("settle", reserved, spent)


def run_budget(cfg: PipelineConfig, store: CorpusStore, committed: Committed) -> Any:
    """The run's BudgetActor, holding what the corpus cost so far, or None without a cap."""
    if cfg.limits.max_usd is None:
        return None
    before = committed.totals.cost_usd + store.unwritten_cost()
    return BudgetActor.options(num_cpus=0).remote(cfg.limits.max_usd, before)


def spent_line(state: dict[str, Any], left: int) -> str:
    return (
        f"stopped at the spend cap: the corpus has cost ${state['spent']:.4f} of "
        f"limits.max_usd=${state['cap']:.4f}; {left} shards left resumable. Raise "
        "limits.max_usd and run again: nothing already answered is asked again"
    )
