"""The duplicate index of one process (or one partition): exact by sha, near by multi-index.

Near search is multi-index hashing over the 64-bit phash: split into `m` blocks; a hash within
distance d of a stored one has, by pigeonhole, some block within floor(d/m) bits of the stored
block, so probing those few block values finds every candidate; candidates are then checked on
the full phash and dhash. Memory per entry is kept small: the sha as 32 raw bytes, hashes in
`array('Q')`, block buckets as `array('I')` of entry numbers, captions as zlib'd JSON.
"""

from __future__ import annotations

import json
import zlib
from array import array
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal

from recaption.dedup.fingerprint import Fingerprint

# entry states
PENDING = 0  # registered by claim_exact, near search not settled yet (partitioned claims)
WAITING = 1  # an original, not answered yet
LINKED = 2  # a near duplicate of another original (its exact copies follow the link)
ANSWERED = 3
REJECTED = 4  # answered without a caption: forgotten, the next claimer becomes the original
EXPECTED_ENTRIES = 1_000_000  # what a partition is sized for when choosing the block split
CANDIDATE_COST = 0.25  # a candidate's check, per dict probe (measured: a set update, two popcounts)


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


def block_split(max_distance: int, expected: int = EXPECTED_ENTRIES) -> int:
    """The number of blocks that makes a lookup cheapest: probes (dict lookups) plus the
    candidates they return in a table of `expected` uniformly spread hashes."""

    def cost(m: int) -> float:
        bits, radius = 64 // m, max_distance // m
        probes = m * sum(len(list(combinations(range(bits), r))) for r in range(radius + 1))
        return probes * (1 + CANDIDATE_COST * expected / 2**bits)

    return min(range(2, min(max_distance, 8) + 2), key=cost) if max_distance else 1


class MultiIndex:
    """Entry numbers by phash block, for the Hamming search."""

    def __init__(self, max_distance: int):
        self.m = block_split(max_distance)
        self.width = 64 // self.m  # the last block takes the remaining bits
        widths = [self.width] * (self.m - 1) + [64 - self.width * (self.m - 1)]
        self.shifts = [64 - sum(widths[: i + 1]) for i in range(self.m)]
        self.masks = [(1 << w) - 1 for w in widths]
        radius = max_distance // self.m
        # every XOR pattern of at most `radius` bits inside each block
        self.probes = [
            [
                sum(1 << b for b in bits)
                for r in range(radius + 1)
                for bits in combinations(range(w), r)
            ]
            for w in widths
        ]
        self.tables: list[dict[int, array]] = [{} for _ in range(self.m)]

    def _blocks(self, phash: int) -> list[int]:
        return [(phash >> s) & k for s, k in zip(self.shifts, self.masks, strict=True)]

    def add(self, idx: int, phash: int) -> None:
        for table, value in zip(self.tables, self._blocks(phash), strict=True):
            bucket = table.get(value)
            if bucket is None:
                table[value] = bucket = array("I")
            bucket.append(idx)

    def remove(self, idx: int, phash: int) -> None:
        for table, value in zip(self.tables, self._blocks(phash), strict=True):
            bucket = table.get(value)
            if bucket is not None and idx in bucket:
                bucket.remove(idx)

    def candidates(self, phash: int) -> set[int]:
        found: set[int] = set()
        for table, value, probes in zip(self.tables, self._blocks(phash), self.probes, strict=True):
            get = table.get
            for p in probes:
                bucket = get(value ^ p)
                if bucket:
                    found.update(bucket)
        return found


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
        out = []
        for key, fp in items:
            done = self.claim_exact([(key, fp)])[0]
            if done is None:
                hit = self.near_lookup([(fp.phash, fp.dhash, fp.near_ok)], exclude=key)[0]
                done = self.settle([(key, fp.phash, fp.near_ok, hit)])[0]
            out.append(done)
        return out

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

    def seed(self, items: list[tuple[str, Fingerprint, dict]]) -> None:
        for key, fp, caption in items:
            if key in self.by_key or fp.digest in self.by_sha:
                continue
            idx = self._register(key, fp, ANSWERED)
            self.captions[idx] = pack(caption)
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

    def near_lookup(
        self, queries: list[tuple[int, int, bool]], exclude: str | None = None
    ) -> list[Hit | None]:
        """The nearest stored original within max_distance on both hashes, as (distance,
        key, its caption if answered), for each (phash, dhash, near_ok) query."""
        if not self.near:
            return [None] * len(queries)
        out: list[tuple[int, str] | None] = []
        for phash, dhash, ok in queries:
            best = None
            if ok:
                for idx in self.multi.candidates(phash):
                    d = _popcount(self.phash[idx] ^ phash)
                    if (
                        d > self.max_distance
                        or _popcount(self.dhash[idx] ^ dhash) > self.max_distance
                    ):
                        continue
                    if self.keys[idx] == exclude:
                        continue
                    if best is None or (d, self.keys[idx]) < best[:2]:
                        best = (d, self.keys[idx], idx)
            out.append(None if best is None else (*best[:2], self._caption_now(best[2])))
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
        if self.status[idx] != LINKED:
            self.multi.remove(idx, self.phash[idx])
        self.status[idx] = REJECTED
        self.links.pop(idx, None)
        # by_key keeps it: a duplicate waiting on this key learns it was rejected
        self.by_sha.pop(self.digests[idx], None)
        self.counts["rejected"] += 1
