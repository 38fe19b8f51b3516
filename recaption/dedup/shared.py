"""The run's index as workers hold it: one local DedupIndex, or N partition actors.

A partition owns the shas whose first 32 bits fall to it (so an exact duplicate is decided by
one actor, exactly once a run), the entries of those originals (state, link, caption) and the
multi-index of their phashes. A claim batch is four rounds, whatever its size: claim_exact
at the shas' partitions, near_lookup at every partition (each searches its own originals),
one call to `Recent` (below), settle at the shas' partitions. An original is not visible to
the near search until it settles, so two near copies claimed at the same moment on two workers
would both become originals (26% of such pairs in `bench/dedup_bench.py`); the images that
found no original in the partitions pass one more actor, `Recent`, which holds the run's last
minute or two of new originals and lets one call at a time in: the second of two such copies
finds the first there. Exact copies are decided at their sha's partition alone.

A Ray actor call costs ~1-3 ms of CPU on each side, so calls are per batch, never per image:
claims a batch at a time, answers sent together every `FLUSH_S`, a worker's copies waiting for
their originals polled together as often, and a claim whose original is answered already
carries its caption (the common case: no wait, no poll).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import ray

from recaption.actors import shared_actor
from recaption.dedup.fingerprint import Fingerprint
from recaption.dedup.index import Claim, DedupIndex, Hit, link_within

DedupActor = shared_actor(DedupIndex)
HOMES_KEPT = 1_000_000  # keys whose partition a handle remembers; beyond it, it asks them all
MAX_LINKS = 8  # near links followed to reach a caption
FLUSH_S = 1.0  # a worker's answers wait at most this long to go out together
RECENT_S = 60.0  # a new original is held by Recent for 60-120 s (settling takes milliseconds)


class Recent:
    """The run's newest originals, in two generations of RECENT_S each: the near search's
    arbiter for originals whose claims have not settled at their partitions yet.

    One actor runs one call at a time, so of two near copies claimed at once the first to
    arrive here is registered and the second finds it. Correct as long as a claim settles
    within RECENT_S of passing here; after that its partition's near search finds it."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self.old, self.new = DedupIndex(max_distance), DedupIndex(max_distance)
        self.since = time.monotonic()

    def check(self, items: list[tuple[str, Fingerprint]]) -> list[Hit | None]:
        """Per (key, fingerprint) that found no original: a newer original it copies, or None
        (it is one, registered here; a retried claim finds itself and stays one)."""
        if time.monotonic() - self.since >= RECENT_S:
            self.old, self.new = self.new, DedupIndex(self.max_distance)
            self.since = time.monotonic()
        out: list[Hit | None] = [None] * len(items)
        rest = []
        olds = self.old.near_lookup([(fp.phash, fp.dhash, fp.near_ok) for _, fp in items])
        for j, ((key, _), hit) in enumerate(zip(items, olds, strict=True)):
            if hit is None:
                rest.append(j)
            elif hit[1] != key:
                out[j] = hit
        for j, claim in zip(rest, self.new.claim([items[j] for j in rest]), strict=True):
            if claim.original is not None:  # near, or exact: a partition restarted empty
                out[j] = (claim.distance, claim.original, None)
        return out

    def forget(self, keys: list[str]) -> None:
        """Originals answered without a caption: the next near copy becomes the original, as
        at the partitions, instead of linking to one that has nothing to give."""
        for key in keys:
            self.old.answered(key, None)
            self.new.answered(key, None)


RecentActor = shared_actor(Recent)


class SharedIndex:
    def __init__(self, target: DedupIndex | list[Any], recent: Any = None):
        self.local = target if isinstance(target, DedupIndex) else None
        self.parts: list[Any] = [] if self.local is not None else list(target)
        self.recent = recent  # the Recent actor of a partitioned index that searches near copies
        self.max_distance = self.local.max_distance if self.local else None
        self.homes: dict[str, int] = {}  # key -> partition, learnt from claims
        self.outbox: dict[int, list[tuple[str, dict | None]]] = defaultdict(list)
        self.flushing: asyncio.TimerHandle | None = None
        # original -> the copies waiting for its caption (a future each, with the near links
        # followed so far), polled by one task
        self.waiting: dict[str, list[tuple[asyncio.Future, int]]] = defaultdict(list)
        self.polling: asyncio.Task | None = None

    def __reduce__(self):  # a handle pickles as its actors (or its local index), nothing else
        return (SharedIndex, (self.local if self.local is not None else self.parts, self.recent))

    @classmethod
    def start(
        cls,
        partitions: int,
        max_distance: int = 10,
        near: bool = True,
        name_prefix: str = "recaption-dedup",
    ) -> SharedIndex:
        """Named partition actors (num_cpus=0), spread over the cluster's nodes."""
        actors = [
            DedupActor.options(
                name=f"{name_prefix}-{i}", scheduling_strategy="SPREAD", get_if_exists=True
            ).remote(max_distance, near)
            for i in range(partitions)
        ]
        recent = None
        if near and partitions > 1:
            recent = RecentActor.options(name=f"{name_prefix}-recent", get_if_exists=True).remote(
                max_distance
            )
        index = cls(actors, recent)
        index.max_distance = max_distance
        return index

    def shutdown(self) -> None:
        for actor in [*self.parts, *([self.recent] if self.recent else [])]:
            ray.kill(actor)
        self.parts, self.recent = [], None

    # --- calls ------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return 1 if self.local is not None else len(self.parts)

    def home(self, fp: Fingerprint) -> int:
        return int(fp.sha256[:8], 16) % self.n

    async def _call(self, part: int, method: str, *args: Any) -> Any:
        if self.local is not None:
            return getattr(self.local, method)(*args)
        return await getattr(self.parts[part], method).remote(*args)

    async def _all(self, method: str, *args: Any) -> list[Any]:
        return await asyncio.gather(*(self._call(p, method, *args) for p in range(self.n)))

    def _remember(self, key: str, part: int) -> None:
        if len(self.homes) >= HOMES_KEPT:
            self.homes.clear()
        self.homes[key] = part

    # --- the API ----------------------------------------------------------------------------

    async def claim(self, items: list[tuple[str, Fingerprint]]) -> list[Claim]:
        if self.n == 1:  # one partition: one call, atomic for near copies too
            claims = await self._call(0, "claim", items)
            for (key, _), c in zip(items, claims, strict=True):
                self._remember(c.original if c.original else key, 0)
            return claims
        out: list[Claim | None] = [None] * len(items)
        groups: dict[int, list[int]] = defaultdict(list)
        for pos, (_, fp) in enumerate(items):
            groups[self.home(fp)].append(pos)
        firsts = await asyncio.gather(
            *(self._call(p, "claim_exact", [items[i] for i in pos]) for p, pos in groups.items())
        )
        fresh: list[int] = []
        for (part, pos), claims in zip(groups.items(), firsts, strict=True):
            for i, c in zip(pos, claims, strict=True):
                self._remember(c.original if c is not None and c.original else items[i][0], part)
                if c is None:
                    fresh.append(i)
                else:
                    out[i] = c
        if fresh:
            await self._settle(items, fresh, out)
        return out  # type: ignore[return-value]

    async def _settle(
        self, items: list[tuple[str, Fingerprint]], fresh: list[int], out: list[Claim | None]
    ) -> None:
        queries = [(items[i][1].phash, items[i][1].dhash, items[i][1].near_ok) for i in fresh]
        answers = await self._all("near_lookup", queries)
        hits: list[Hit | None] = []
        for j in range(len(fresh)):
            found = [(a[j], p) for p, a in enumerate(answers) if a[j] is not None]
            best = min(found, key=lambda f: f[0][:2], default=None)
            if best is not None:
                self._remember(best[0][1], best[1])
            hits.append(best[0] if best else None)
        if self.recent is not None:  # the arbiter also links near copies within the batch
            unseen = [j for j, i in enumerate(fresh) if hits[j] is None and items[i][1].near_ok]
            if unseen:
                found = await self.recent.check.remote([items[fresh[j]] for j in unseen])
                for j, hit in zip(unseen, found, strict=True):
                    hits[j] = hit
        elif self.max_distance is not None:
            link_within(items, fresh, hits, self.max_distance)
        groups: dict[int, list[int]] = defaultdict(list)
        for j, i in enumerate(fresh):
            groups[self.home(items[i][1])].append(j)
        settled = await asyncio.gather(
            *(
                self._call(
                    p,
                    "settle",
                    [
                        (
                            items[fresh[j]][0],
                            items[fresh[j]][1].phash,
                            items[fresh[j]][1].near_ok,
                            hits[j],
                        )
                        for j in js
                    ],
                )
                for p, js in groups.items()
            )
        )
        for js, claims in zip(groups.values(), settled, strict=True):
            for j, c in zip(js, claims, strict=True):
                out[fresh[j]] = c

    async def answered(self, key: str, caption: dict | None) -> None:
        """Copies waiting here get it at once; the partitions within FLUSH_S, with the others
        answered meanwhile, not awaited (Ray runs one caller's calls to an actor in order),
        and copies waiting in other workers poll them for it."""
        for future, _ in self.waiting.pop(key, []):  # copies here need no round trip
            if not future.done():
                future.set_result(caption)
        if self.local is not None:
            self.local.answered(key, caption)
            return
        part = self.homes.get(key)
        for p in range(self.n) if part is None else [part]:  # a partition ignores others' keys
            self.outbox[p].append((key, caption))
        if self.flushing is None:
            self.flushing = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Send the answers waiting in the outbox now (a shard's end does not wait)."""
        if self.flushing is not None:
            self.flushing.cancel()
            self.flushing = None
        rejected: set[str] = set()
        for p, items in self.outbox.items():
            self.parts[p].answered_many.remote(items)
            rejected.update(key for key, caption in items if caption is None)
        if rejected and self.recent is not None:
            self.recent.forget.remote(sorted(rejected))
        self.outbox = defaultdict(list)

    async def seed(self, items: list[tuple[str, Fingerprint, dict]]) -> None:
        groups: dict[int, list] = defaultdict(list)
        for item in items:
            groups[self.home(item[1])].append(item)
        await asyncio.gather(*(self._call(p, "seed", g) for p, g in groups.items()))

    async def caption(self, original: str, timeout_s: float) -> dict | None:
        """The original's caption once answered (following near links); None when it was
        rejected or `timeout_s` passed: then the caller asks the captioner itself. A waiting
        copy makes no call of its own: an answer this worker gives resolves it at once, and
        the rest are polled together, 50 ms after they start waiting and then every FLUSH_S
        (as often as answers reach the partitions), one call a partition for all of this
        worker's waiting copies."""
        future = asyncio.get_running_loop().create_future()
        self.waiting[original].append((future, 0))
        if self.polling is None:
            self.polling = asyncio.create_task(self._poll())
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None

    async def _poll(self) -> None:
        """Ask the partitions for the keys copies wait on until none is left."""
        delay = 0.05  # the copies of one claim batch start waiting together: one call
        try:
            while self.waiting:
                await asyncio.sleep(delay)
                delay = FLUSH_S
                for key in [k for k, ws in self.waiting.items() if all(f.done() for f, _ in ws)]:
                    del self.waiting[key]  # its copies all timed out
                keys = list(self.waiting)
                asks: dict[int, list[str]] = defaultdict(list)
                for key in keys:
                    part = self.homes.get(key)
                    for p in range(self.n) if part is None else [part]:
                        asks[p].append(key)
                replies = await asyncio.gather(
                    *(self._call(p, "caption_states", ks) for p, ks in asks.items())
                )
                states: dict[str, tuple[str, Any]] = {}
                for ks, reply in zip(asks.values(), replies, strict=True):
                    for key, state in zip(ks, reply, strict=True):
                        if state[0] != "unknown" or key not in states:
                            states[key] = state  # one partition knows it; the others do not
                for key in keys:
                    kind, value = states.get(key, ("unknown", None))
                    if kind == "pending":
                        continue
                    for future, hops in self.waiting.pop(key, []):
                        if kind == "link" and hops < MAX_LINKS:
                            self.waiting[value].append((future, hops + 1))
                        elif not future.done():  # unknown: its partition restarted empty
                            future.set_result(value if kind == "caption" else None)
        except Exception as exc:  # a partition lost: the copies fail as their calls would
            for waiters in self.waiting.values():
                for future, _ in waiters:
                    if not future.done():
                        future.set_exception(exc)
            self.waiting.clear()
        finally:
            self.polling = None

    async def state(self) -> dict[str, Any]:
        total: dict[str, Any] = defaultdict(int)
        for s in await self._all("state"):
            for k, v in s.items():
                if k != "blocks":
                    total[k] += v
        return dict(total)
