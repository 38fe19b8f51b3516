"""The duplicate index of one process (or one partition): exact by sha, near by multi-index.

Near search is multi-index hashing over the 64-bit phash: split into `m` blocks; a hash within
distance d of a stored one has, by pigeonhole, some block within floor(d/m) bits of the stored
block, so probing those few block values finds every candidate; candidates are then checked on
the full phash and dhash. Probes and checks run in numpy, a claim batch at a time: in Python a
lookup cost ~0.7 ms at 100k entries and grew with the table (~8,000 candidates at a million).
Memory per entry is kept small: the sha as 32 raw bytes, hashes in `array('Q')`, the blocks as
direct-address tables of entry numbers, captions as zlib'd JSON.
"""

from __future__ import annotations

import json
import zlib
from array import array
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal

import numpy as np

from recaption.dedup.fingerprint import Fingerprint

# entry states
PENDING = 0  # registered by claim_exact, near search not settled yet (partitioned claims)
WAITING = 1  # an original, not answered yet
LINKED = 2  # a near duplicate of another original (its exact copies follow the link)
ANSWERED = 3
REJECTED = 4  # answered without a caption: forgotten, the next claimer becomes the original
EXPECTED_ENTRIES = 1_000_000  # what a partition is sized for when choosing the block split
MAX_BLOCK_BITS = 20  # a block's table has 2**bits + 1 offsets: 4 MiB at 20 bits
TAIL_MAX = 4096  # entries scanned directly before they are merged into the block tables


@dataclass(frozen=True)
class Claim:
    kind: Literal["new", "exact", "near"]
    original: str | None = None  # key of the first occurrence (None for "new")
    distance: int = 0  # Hamming distance (phash) for near
    # the original's caption when it was answered already: no call to wait for it
    caption: dict | None = field(default=None, compare=False)


NEW = Claim("new")
Hit = tuple[int, str, dict | None]  # a near match: (distance, original key, its caption)


def pack(caption: dict) -> bytes:
    return zlib.compress(json.dumps(caption, separators=(",", ":")).encode(), 6)


def unpack(blob: bytes) -> dict:
    return json.loads(zlib.decompress(blob))


def _popcount(x: int) -> int:
    return x.bit_count()


def is_near(a: Fingerprint, b: Fingerprint, max_distance: int) -> bool:
    return (
        _popcount(a.phash ^ b.phash) <= max_distance
        and _popcount(a.dhash ^ b.dhash) <= max_distance
    )


def link_within(
    items: list[tuple[str, Fingerprint]], fresh: list[int], hits: list[Hit | None], d: int
) -> None:
    """Near copies inside one claim batch (which the lookup, made before the batch settles,
    cannot see): a later one becomes a duplicate of an earlier one that is new."""
    originals: list[tuple[str, Fingerprint]] = []
    for j, i in enumerate(fresh):
        key, fp = items[i]
        if hits[j] is not None or not fp.near_ok:
            continue
        match = next((o for o in originals if is_near(o[1], fp, d)), None)
        if match is None:
            originals.append((key, fp))
        else:
            hits[j] = (_popcount(match[1].phash ^ fp.phash), match[0], None)


def block_split(max_distance: int, expected: int = EXPECTED_ENTRIES) -> int:
    """The number of blocks that makes a lookup cheapest: probes plus the candidates they
    return in a table of `expected` uniformly spread hashes (both one vector element)."""

    def cost(m: int) -> float:
        bits, radius = 64 // m, max_distance // m
        probes = m * sum(len(list(combinations(range(bits), r))) for r in range(radius + 1))
        return probes * (1 + expected / 2**bits)

    fits = [m for m in range(2, 17) if 64 - 64 // m * (m - 1) <= MAX_BLOCK_BITS]
    return min(fits, key=cost)


class MultiIndex:
    """Entry numbers by phash block, for the Hamming search.

    Block b is a direct-address table: the entries whose block value is v are
    `ids[b][starts[b][v]:starts[b][v + 1]]`. New entries wait in a short tail that every
    lookup scans whole; at TAIL_MAX they are merged in (a copy of the table, no sort)."""

    def __init__(self, max_distance: int):
        self.m = block_split(max_distance)
        width = 64 // self.m  # the last block takes the remaining bits
        widths = [width] * (self.m - 1) + [64 - width * (self.m - 1)]
        self.shifts = [np.uint64(64 - sum(widths[: i + 1])) for i in range(self.m)]
        self.masks = [np.uint64((1 << w) - 1) for w in widths]
        radius = max_distance // self.m
        # every XOR pattern of at most `radius` bits inside each block
        self.probes = [
            np.array(
                [
                    sum(1 << b for b in bits)
                    for r in range(radius + 1)
                    for bits in combinations(range(w), r)
                ],
                dtype=np.uint64,
            )
            for w in widths
        ]
        self.starts = [np.zeros((1 << w) + 1, dtype=np.int64) for w in widths]
        self.ids = [np.zeros(0, dtype=np.int32) for _ in widths]  # entries < 2**31 a partition
        self.tail, self.tail_phash = array("q"), array("Q")
        self.size = 0

    def add(self, idx: int, phash: int) -> None:
        self.tail.append(idx)
        self.tail_phash.append(phash)
        self.size += 1
        if len(self.tail) >= TAIL_MAX:
            self._merge()

    def _merge(self) -> None:
        ids, phash = np.array(self.tail, dtype=np.int32), np.array(self.tail_phash, np.uint64)
        for b in range(self.m):
            values = ((phash >> self.shifts[b]) & self.masks[b]).astype(np.int64)
            order = np.argsort(values, kind="stable")
            # each new entry goes to the end of its value's run
            self.ids[b] = np.insert(self.ids[b], self.starts[b][values[order] + 1], ids[order])
            counts = np.bincount(values, minlength=len(self.starts[b]) - 1)
            self.starts[b][1:] += np.cumsum(counts)
        self.tail, self.tail_phash = array("q"), array("Q")

    def candidates(self, phash: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, entry number) pairs that may lie within the radius of the
        queries' phashes: the block tables' probes plus the whole tail. Pairs may repeat."""
        n = len(phash)
        pos, found = [], []
        for b in range(self.m):
            values = ((phash >> self.shifts[b]) & self.masks[b])[:, None] ^ self.probes[b][None]
            values = values.ravel().astype(np.int64)
            lo, hi = self.starts[b][values], self.starts[b][values + 1]
            counts = hi - lo
            total = int(counts.sum())
            if not total:
                continue
            # the runs lo[i]..hi[i] laid end to end
            at = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(total)
            found.append(self.ids[b][at])
            pos.append(np.repeat(np.arange(n).repeat(len(self.probes[b])), counts))
        if self.tail:
            found.append(np.tile(np.array(self.tail, dtype=np.int64), n))
            pos.append(np.arange(n).repeat(len(self.tail)))
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(pos), np.concatenate(found)


class DedupIndex:
    """The run's duplicate index in one process; each partition actor holds one.

    `claim` is atomic per item and in order. The partition primitives (`claim_exact`,
    `near_lookup`, `settle`) are what `SharedIndex` composes across partitions."""

    def __init__(self, max_distance: int = 10, near: bool = True):
        self.max_distance = max_distance
        self.near = near
        self.by_sha: dict[bytes, int] = {}
        self.by_key: dict[str, int] = {}
        self.keys: list[str] = []
        self.digests: list[bytes] = []
        self.phash = array("Q")
        self.dhash = array("Q")
        self.status = bytearray()
        self.links: dict[int, tuple[str, int]] = {}  # near duplicate -> (original key, distance)
        self.captions: dict[int, bytes] = {}
        self.multi = MultiIndex(max_distance)
        self.counts = {"new": 0, "exact": 0, "near": 0, "seeded": 0, "rejected": 0}

    # --- one process ----------------------------------------------------------------------

    def claim(self, items: list[tuple[str, Fingerprint]]) -> list[Claim]:
        """The three rounds a partitioned claim makes, in one process."""
        out = self.claim_exact(items)
        fresh = [i for i, c in enumerate(out) if c is None]
        if fresh:
            fps = [items[i][1] for i in fresh]
            hits = self.near_lookup([(fp.phash, fp.dhash, fp.near_ok) for fp in fps])
            link_within(items, fresh, hits, self.max_distance)
            settled = self.settle(
                [
                    (items[i][0], fp.phash, fp.near_ok, h)
                    for i, fp, h in zip(fresh, fps, hits, strict=True)
                ]
            )
            for i, c in zip(fresh, settled, strict=True):
                out[i] = c
        return out  # type: ignore[return-value]

    def answered(self, key: str, caption: dict | None) -> None:
        idx = self.by_key.get(key)
        if idx is None or self.status[idx] == REJECTED:
            return
        if caption is not None:
            self.captions[idx] = pack(caption)
            self.status[idx] = ANSWERED
            self.links.pop(idx, None)
            return
        self._forget(idx)

    def answered_many(self, items: list[tuple[str, dict | None]]) -> None:
        """`answered` for a batch: a worker sends its answers a few times a second."""
        for key, caption in items:
            self.answered(key, caption)

    def seed(self, items: list[tuple[str, Fingerprint, dict | bytes]]) -> None:
        """Originals answered before (a caption, or one `pack`ed by the reader)."""
        for key, fp, caption in items:
            if key in self.by_key or fp.digest in self.by_sha:
                continue
            idx = self._register(key, fp, ANSWERED)
            self.captions[idx] = caption if isinstance(caption, bytes) else pack(caption)
            if self.near and fp.near_ok:
                self.multi.add(idx, fp.phash)
            self.counts["seeded"] += 1

    def state(self) -> dict[str, Any]:
        return {
            "originals": self.counts["new"] + self.counts["seeded"] - self.counts["rejected"],
            **self.counts,
            "entries": len(self.keys),
            "captions": len(self.captions),
            "caption_bytes": sum(map(len, self.captions.values())),
            "blocks": self.multi.m,
        }

    def caption_state(self, key: str) -> tuple[str, Any]:
        """("caption", dict) | ("rejected", None) | ("pending", None) | ("link", original)
        | ("unknown", None): what a duplicate of `key` may reuse now."""
        idx = self.by_key.get(key)
        if idx is None:
            return ("unknown", None)
        st = self.status[idx]
        if st == ANSWERED:
            return ("caption", unpack(self.captions[idx]))
        if st == REJECTED:
            return ("rejected", None)
        if st == LINKED:
            return ("link", self.links[idx][0])
        return ("pending", None)

    def caption_states(self, keys: list[str]) -> list[tuple[str, Any]]:
        """`caption_state` of each key: a worker's waiting copies are polled together."""
        return [self.caption_state(key) for key in keys]

    def caption_of(self, key: str) -> dict | None:
        """The caption a duplicate of `key` reuses, following near links; None if none yet."""
        for _ in range(8):  # a link points at an original, which may itself be answered
            kind, value = self.caption_state(key)
            if kind != "link":
                return value if kind == "caption" else None
            key = value
        return None

    # --- partition primitives -------------------------------------------------------------

    def claim_exact(self, items: list[tuple[str, Fingerprint]]) -> list[Claim | None]:
        """Per item: its final Claim (a re-claim, or an exact copy of this partition's sha),
        or None: registered here as the sha's owner, the near search is the caller's."""
        out: list[Claim | None] = []
        for key, fp in items:
            idx = self.by_key.get(key)
            if idx is not None and self.status[idx] != REJECTED:
                out.append(self._previous(idx))
                continue
            owner = self.by_sha.get(fp.digest)
            if owner is not None:
                self.counts["exact"] += 1
                out.append(Claim("exact", self.keys[owner], caption=self._caption_now(owner)))
                continue
            if not self.near:  # exact only: nothing to search, the claim is settled here
                self._register(key, fp, WAITING)
                self.counts["new"] += 1
                out.append(NEW)
                continue
            self._register(key, fp, PENDING)
            out.append(None)
        return out

    def near_lookup(self, queries: list[tuple[int, int, bool]]) -> list[Hit | None]:
        """The nearest stored original within max_distance on both hashes, as (distance,
        key, its caption if answered), for each (phash, dhash, near_ok) query."""
        out: list[Hit | None] = [None] * len(queries)
        asked = [j for j, q in enumerate(queries) if q[2]]
        if not self.near or not asked or not self.multi.size:
            return out
        qp = np.array([queries[j][0] for j in asked], dtype=np.uint64)
        qd = np.array([queries[j][1] for j in asked], dtype=np.uint64)
        pos, idx = self.multi.candidates(qp)
        # views of the growing arrays, dropped before anything appends to them
        phash, dhash = np.frombuffer(self.phash, np.uint64), np.frombuffer(self.dhash, np.uint64)
        status = np.frombuffer(self.status, np.uint8)
        d = np.bitwise_count(phash[idx] ^ qp[pos])
        near = (d <= self.max_distance) & (
            np.bitwise_count(dhash[idx] ^ qd[pos]) <= self.max_distance
        )
        near &= status[idx] != REJECTED  # a forgotten original stays in the tables, unused
        del phash, dhash, status
        best: dict[int, tuple[int, str, int]] = {}
        for p, i, dist in zip(
            pos[near].tolist(), idx[near].tolist(), d[near].tolist(), strict=True
        ):
            hit = (dist, self.keys[i], i)
            if p not in best or hit[:2] < best[p][:2]:
                best[p] = hit
        for p, (dist, key, i) in best.items():
            out[asked[p]] = (dist, key, self._caption_now(i))
        return out

    def settle(self, items: list[tuple[str, int, bool, Hit | None]]) -> list[Claim]:
        """Finish claims registered by claim_exact: (key, phash, near_ok, nearest or None)."""
        out = []
        for key, phash, ok, hit in items:
            idx = self.by_key.get(key)
            if idx is None or self.status[idx] != PENDING:  # settled already (a retried call)
                out.append(self._previous(idx) if idx is not None else NEW)
                continue
            if hit is not None:
                self.status[idx] = LINKED
                self.links[idx] = (hit[1], hit[0])
                self.counts["near"] += 1
                out.append(Claim("near", hit[1], hit[0], hit[2]))
                continue
            self.status[idx] = WAITING
            if self.near and ok:
                self.multi.add(idx, phash)
            self.counts["new"] += 1
            out.append(NEW)
        return out

    # --- entries --------------------------------------------------------------------------

    def _register(self, key: str, fp: Fingerprint, status: int) -> int:
        idx = len(self.keys)
        digest = fp.digest
        self.keys.append(key)
        self.digests.append(digest)
        self.phash.append(fp.phash)
        self.dhash.append(fp.dhash)
        self.status.append(status)
        self.by_key[key] = idx
        self.by_sha[digest] = idx
        return idx

    def _caption_now(self, idx: int) -> dict | None:
        """The caption a copy of entry `idx` reuses, if there is one yet (through links)."""
        return self.caption_of(self.keys[idx])

    def _previous(self, idx: int) -> Claim | None:
        st = self.status[idx]
        if st == LINKED:
            original, distance = self.links[idx]
            return Claim("near", original, distance)
        if st == PENDING:  # its claim never settled (the claimer died): search again
            return None
        return NEW

    def _forget(self, idx: int) -> None:
        """An original that got no caption: its fingerprint is free for the next claimer."""
        self.status[idx] = REJECTED  # near_lookup skips it
        self.links.pop(idx, None)
        # by_key keeps it: a duplicate waiting on this key learns it was rejected
        self.by_sha.pop(self.digests[idx], None)
        self.counts["rejected"] += 1
