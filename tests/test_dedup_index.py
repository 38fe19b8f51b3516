"""The duplicate index: exact copies exactly, near copies found, distinct images never merged."""

from __future__ import annotations

import asyncio
import io
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from recaption.config import ImageConfig
from recaption.dedup import Claim, DedupIndex, Fingerprint, SharedIndex, fingerprint
from recaption.dedup.index import TAIL_MAX
from recaption.dedup.shared import FLUSH_S, RECENT_S, Recent
from recaption.images import prepare
from recaption.samples import _load_photos
from recaption.scenes import SAMPLES, SCENES, random_scene, render

CFG = ImageConfig()


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _fit(im: Image.Image, side: int = 512) -> Image.Image:
    im = im.copy()
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def _near_copy(im: Image.Image, rng: random.Random, how: str) -> bytes:
    """A resized, re-encoded or few-px-cropped copy (or all three)."""
    w, h = im.size
    if how in ("crop", "all"):
        c = [rng.randint(1, 6) for _ in range(4)]
        im = im.crop((c[0], c[1], w - c[2], h - c[3]))
    if how in ("resize", "all"):
        s = rng.uniform(0.4, 0.9)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
    return _jpeg(im, rng.randint(55, 95) if how in ("quality", "all") else 90)


@pytest.fixture(scope="module")
def corpus():
    """(distinct, exact, near): (key, prepared) lists; exact and near carry their original."""
    rng = random.Random(7)
    pictures = [_fit(p) for p in _load_photos().values()]
    pictures += [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in pictures]
    pictures += [render(random_scene(rng, SAMPLES)) for _ in range(150)]
    pictures += [render(random_scene(rng, SCENES)) for _ in range(150)]
    distinct = [(f"d{i}", prepare(_jpeg(p), CFG)) for i, p in enumerate(pictures)]
    exact = [(f"e{i}", prepare(distinct[i][1].data, CFG), f"d{i}") for i in range(0, 330, 5)]
    near = []
    for i in range(30):  # the photos and their mirror images
        for k, how in enumerate(("resize", "quality", "crop", "all")):
            near.append((f"n{i}-{k}", prepare(_near_copy(pictures[i], rng, how), CFG), f"d{i}"))
    return distinct, exact, near


def test_fingerprint_passed_through_and_decoded_agree(corpus):
    distinct, _, _ = corpus
    _, image = distinct[0]
    assert image.passed_through and image.decoded is None
    again = prepare(image.data, ImageConfig(reencode="always"))
    a, b = fingerprint(image), fingerprint(again)
    assert image.decoded is None  # hashing did not decode the image
    assert (a.phash ^ b.phash).bit_count() <= 4 and a.near_ok == b.near_ok


def test_exact_near_and_distinct(corpus):
    distinct, exact, near = corpus
    fps = {key: fingerprint(im) for key, im, *_ in distinct + exact + near}
    index = DedupIndex()
    claims = dict(zip(fps, index.claim(list(fps.items())), strict=True))

    merged = [k for k, _ in distinct if claims[k].kind != "new"]
    assert not merged, f"distinct images matched: {[(k, claims[k]) for k in merged]}"
    assert all(claims[k] == Claim("exact", orig) for k, _, orig in exact)
    eligible = [(k, orig) for k, _, orig in near if fps[orig].near_ok]
    found = sum(claims[k].kind == "near" and claims[k].original == orig for k, orig in eligible)
    assert len(eligible) >= 80 and found >= 0.99 * len(eligible), (found, len(eligible))
    # a near copy never claims a wrong original
    assert all(claims[k].original in (None, orig) for k, _, orig in near)

    # the threshold's margin, on the photos: distinct pairs far above, copies below
    photo = np.array([fps[f"d{i}"].phash for i in range(30)], dtype=np.uint64)
    apart = np.bitwise_count(photo[:, None] ^ photo[None, :])[np.triu_indices(30, 1)]
    copies = [(fps[k].phash ^ fps[o].phash).bit_count() for k, _, o in near]
    assert apart.min() > index.max_distance >= np.percentile(copies, 99)


def test_reclaim_is_idempotent():
    index = DedupIndex()
    a, b = _fp(1, 0xF0F0), _fp(2, 0xF0F1)
    first = index.claim([("a", a), ("b", b), ("c", a)])
    assert first == [Claim("new"), Claim("near", "a", 1), Claim("exact", "a")]
    assert index.claim([("a", a), ("b", b), ("c", a)]) == first  # a resumed run


def test_rejected_original_hands_over():
    index = DedupIndex()
    fp = _fp(1, 0xABCD)
    assert index.claim([("a", fp), ("b", fp)]) == [Claim("new"), Claim("exact", "a")]
    index.answered("a", None)
    assert index.caption_state("a") == ("rejected", None)  # b asks itself
    assert index.claim([("c", fp)]) == [Claim("new")]  # the next claimer is the original
    index.answered("c", {"caption": "x"})
    assert index.claim([("d", fp)]) == [Claim("exact", "c")]
    assert index.caption_of("d") is None and index.caption_of("c") == {"caption": "x"}


def test_a_claim_carries_the_caption_of_an_answered_original():
    index = DedupIndex()
    a, near = _fp(1, 0xF0F0), _fp(2, 0xF0F1)
    assert index.claim([("a", a)]) == [Claim("new")]
    pending = index.claim([("b", a)])[0]
    assert pending == Claim("exact", "a") and pending.caption is None  # b waits for it
    index.answered_many([("a", {"caption": "x"})])
    exact, close = index.claim([("c", a), ("d", near)])
    assert (exact, close) == (Claim("exact", "a"), Claim("near", "a", 1))
    assert exact.caption == close.caption == {"caption": "x"}  # no wait, no poll
    # exact matching only: a partition settles a claim in one call, no near round
    exact_only = DedupIndex(near=False)
    assert exact_only.claim_exact([("a", a), ("b", a)]) == [Claim("new"), Claim("exact", "a")]


def test_seed_and_caption_through_links():
    index = DedupIndex()
    index.seed([("old", _fp(1, 0xFF00), {"caption": "earlier corpus"})])
    assert index.claim([("x", _fp(2, 0xFF01)), ("y", _fp(1, 0xFF00))]) == [
        Claim("near", "old", 1),
        Claim("exact", "old"),
    ]
    assert index.caption_of("x") == {"caption": "earlier corpus"}
    assert index.state()["seeded"] == 1


def _fp(n: int, phash: int, near_ok: bool = True):
    from recaption.dedup import Fingerprint

    return Fingerprint(f"{n:064x}", phash, phash, near_ok)


def _random_items(n: int, seed: int) -> list:
    """Originals, exact copies and 1-3-bit near copies, shuffled."""
    rng = random.Random(seed)
    base = [_fp(rng.getrandbits(200), rng.getrandbits(64)) for _ in range(n)]
    items = [(f"o{i}", fp) for i, fp in enumerate(base)]
    items += [(f"x{i}", base[i]) for i in range(0, n, 4)]
    for i in range(0, n, 3):
        flip = sum(1 << b for b in rng.sample(range(64), rng.randint(1, 3)))
        items.append((f"n{i}", _fp(rng.getrandbits(200), base[i].phash ^ flip)))
    return items


def test_shared_actors_match_local(ray_cluster):
    items = _random_items(300, seed=3)
    local = DedupIndex().claim(items)
    shared = SharedIndex.start(3, name_prefix="test-dedup")
    try:
        got = []
        for i in range(0, len(items), 32):
            got += asyncio.run(shared.claim(items[i : i + 32]))
        assert got == local
        assert asyncio.run(shared.claim(items[:50])) == local[:50]  # idempotent
        assert asyncio.run(shared.state())["exact"] == sum(c.kind == "exact" for c in local)
    finally:
        shared.shutdown()


def test_recent_links_near_copies_of_new_originals_and_forgets_rejected_ones():
    recent = Recent(max_distance=10)
    base = 0xF0F0_1234_5678_9ABC

    def near(n: int, bits: int):  # another image (sha) whose phash is `bits` off
        return _fp(n, base ^ bits)

    assert recent.check([("a", near(1, 0))]) == [None]  # the first: an original
    assert recent.check([("a", near(1, 0))]) == [None]  # a retried claim stays one
    assert recent.check([("b", near(2, 0b11))]) == [(2, "a", None)]
    assert recent.check([("c", near(3, 0b1)), ("d", near(4, 0b111))]) == [
        (1, "a", None),
        (3, "a", None),
    ]
    recent.forget(["a"])  # answered without a caption
    assert recent.check([("e", near(5, 0b11))]) == [None]  # the next copy is the original
    assert recent.check([("f", near(6, 0))]) == [(2, "e", None)]
    recent.since -= RECENT_S  # a generation later its entries are still found ...
    assert recent.check([("g", near(7, 0b11))]) == [(0, "e", None)]
    recent.since -= RECENT_S  # ... and two generations later they are gone
    assert recent.check([("h", near(8, 0b11))]) == [None]


def test_near_copies_claimed_at_once_on_workers_are_paid_once(ray_cluster):
    """Each original and a 2-bit near copy of it claimed at the same moment by two worker
    processes, against three partitions: exactly one of each pair is new, the other links to
    it (without the Recent arbiter about a quarter of the pairs were both new)."""
    import ray

    @ray.remote(num_cpus=0)
    class Claimer:
        def __init__(self, index: SharedIndex):
            self.index = index

        def run(self, items: list, batch: int) -> list[Claim]:
            async def go():
                out = []
                for i in range(0, len(items), batch):
                    out += await self.index.claim(items[i : i + batch])
                return out

            return asyncio.run(go())

    rng = random.Random(5)
    shared = SharedIndex.start(3, name_prefix="test-dedup-race")
    workers = [Claimer.remote(shared) for _ in range(3)]
    try:
        base = [_fp(rng.getrandbits(200), rng.getrandbits(64)) for _ in range(240)]
        share: list[list] = [[] for _ in workers]
        for i, fp in enumerate(base):
            copy = Fingerprint(f"{rng.getrandbits(256):064x}", fp.phash ^ 0b101, fp.dhash)
            share[i % 3].append((f"o{i}", fp))
            share[(i + 1) % 3].append((f"n{i}", copy))
        ray.get([w.run.remote([], 8) for w in workers])  # started, so the claims overlap
        results = ray.get([w.run.remote(s, 8) for w, s in zip(workers, share, strict=True)])
        got = {
            k: c
            for s, r in zip(share, results, strict=True)
            for (k, _), c in zip(s, r, strict=True)
        }
        for i in range(len(base)):
            a, b = got[f"o{i}"], got[f"n{i}"]
            assert sorted([a.kind, b.kind]) == ["near", "new"], (i, a, b)
            assert (b.original, a.original) in ((f"o{i}", None), (None, f"n{i}"))
        assert asyncio.run(shared.state())["new"] == len(base)
    finally:
        for w in workers:
            ray.kill(w)
        shared.shutdown()


def test_shared_caption_waits_and_times_out(ray_cluster):
    shared = SharedIndex.start(2, name_prefix="test-dedup-wait")

    async def run():
        fp = _fp(9, 0x1234)
        await shared.claim([("a", fp), ("b", fp)])
        assert await shared.caption("a", timeout_s=0.2) is None  # not answered: times out
        await asyncio.sleep(FLUSH_S + 0.2)  # the next poll drops the timed-out copy and ends
        assert not shared.waiting and shared.polling is None
        waiting = [asyncio.create_task(shared.caption("a", timeout_s=10)) for _ in range(3)]
        # another worker's handle (as unpickled there) knows nothing of this worker's answers
        elsewhere = pickle.loads(pickle.dumps(shared))
        theirs = asyncio.create_task(elsewhere.caption("a", timeout_s=10))
        await asyncio.sleep(0.2)
        await shared.answered("a", {"caption": "hello"})
        # copies waiting in the worker that answered get it at once, without a round trip
        assert await asyncio.gather(*waiting) == [{"caption": "hello"}] * 3
        assert shared.outbox  # the partition hears of it within FLUSH_S, with the others
        assert await theirs == {"caption": "hello"}  # polled from the partition
        assert not shared.outbox and not elsewhere.waiting
        copy = (await shared.claim([("c", fp)]))[0]
        assert copy == Claim("exact", "a") and copy.caption == {"caption": "hello"}
        # a fresh handle knows nothing yet and still finds it
        other = pickle.loads(pickle.dumps(shared))
        assert await other.caption("a", 3) == {"caption": "hello"}
        # an original answered without a caption is forgotten by Recent as by its partition
        lone = _fp(21, 0xABCD_EF01_2345_6789)
        assert (await shared.claim([("r", lone)]))[0].kind == "new"
        await shared.answered("r", None)
        shared.flush()
        assert (await shared.claim([("s", _fp(22, lone.phash ^ 0b11))]))[0].kind == "new"

    try:
        asyncio.run(run())
    finally:
        shared.shutdown()


def test_near_lookup_finds_what_a_scan_finds():
    """The vectorised multi-index against a brute-force scan, across tail merges, with
    planted copies at every distance around the threshold and forgotten originals."""
    rng = random.Random(11)
    index = DedupIndex(max_distance=10)
    stored = [
        (f"s{i}", rng.getrandbits(64), rng.getrandbits(64))
        for i in range(2 * TAIL_MAX + TAIL_MAX // 2)
    ]
    for i in range(0, len(stored), 500):  # claims of 500 cross the tail's merges
        index.claim(
            [
                (k, Fingerprint(f"{n:064x}", p, d))
                for n, (k, p, d) in enumerate(stored[i : i + 500], i)
            ]
        )
    forgotten = {k for k, _, _ in rng.sample(stored, 200)}
    for key in forgotten:
        index.answered(key, None)

    def flip(x: int, bits: int) -> int:
        for b in rng.sample(range(64), bits):
            x ^= 1 << b
        return x

    queries = []
    for _ in range(400):
        _, p, d = rng.choice(stored)
        queries.append((flip(p, rng.randint(0, 13)), flip(d, rng.randint(0, 12)), True))
    queries += [(rng.getrandbits(64), rng.getrandbits(64), True) for _ in range(100)]
    queries.append((stored[0][1], stored[0][2], False))  # not trusted for near matching
    found = index.near_lookup(queries)
    for (p, d, ok), hit in zip(queries, found, strict=True):
        scan = min(
            (
                ((p ^ sp).bit_count(), key)
                for key, sp, sd in stored
                if key not in forgotten
                and (p ^ sp).bit_count() <= 10
                and (d ^ sd).bit_count() <= 10
            ),
            default=None,
        )
        assert (hit[:2] if hit else None) == (scan if ok else None)
    assert sum(h is not None for h in found) > 150  # the planted copies within reach


def test_near_copies_inside_one_batch_link_to_the_first():
    index = DedupIndex()
    a, b, c = _fp(1, 0xF0F0), _fp(2, 0xF0F3), _fp(3, 0xF0F0 ^ (1 << 40))
    assert index.claim([("a", a), ("b", b), ("c", c)]) == [
        Claim("new"),
        Claim("near", "a", 2),
        Claim("near", "a", 1),
    ]
