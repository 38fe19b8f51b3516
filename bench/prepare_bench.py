"""CPU per image of `recaption.images.prepare`, measured side by side in one run (~1 minute).

    .venv/bin/python bench/prepare_bench.py [--images 64] [--rounds 25]

1. 512-px conforming JPEGs (what img2dataset writes at --image_size 512): `reencode: auto`
   (sent as they came) against `reencode: always` (decode + re-encode) and against the floor,
   a bare loop that only hashes (sha256) and base64-encodes the bytes;
2. 1024-px JPEGs (too big, so re-encoded either way): `prepare` against a bare Pillow
   draft + resize + encode + hash loop.

Each figure is process CPU time per image, the median over rounds; the variants take turns
within each round so drift on a shared machine hits them alike. Every variant also
base64-encodes what it would send, since each request pays for that.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from recaption.config import ImageConfig
from recaption.images import prepare

# offline ones; the 1024-px images are upscaled from the smaller photographs
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")


def web_jpegs(n: int, side: int, seed: int = 0) -> list[bytes]:
    """Random crops of scikit-image's photographs, longest side `side`, quality 80-95."""
    import skimage.data

    rng = random.Random(seed)
    photos = [Image.fromarray(np.asarray(getattr(skimage.data, p)())) for p in PHOTOS]
    out = []
    for i in range(n):
        im = photos[i % len(photos)].convert("RGB")
        scale = rng.uniform(0.7, 1.0)
        cw, ch = int(im.width * scale), int(im.height * scale)
        x, y = rng.randint(0, im.width - cw), rng.randint(0, im.height - ch)
        im = im.crop((x, y, x + cw, y + ch))
        ratio = side / max(im.size)
        im = im.resize((round(im.width * ratio), round(im.height * ratio)), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(80, 95), progressive=rng.random() < 0.3)
        out.append(buf.getvalue())
    return out


def floor(data: bytes) -> None:
    hashlib.sha256(data).hexdigest()
    base64.b64encode(data)


def bare_resize(data: bytes, max_side: int = 512, quality: int = 90) -> None:
    im = Image.open(io.BytesIO(data))
    scale = max_side / max(im.size)
    im.draft("RGB", (round(im.width * scale), round(im.height * scale)))
    im = im.convert("RGB")
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    floor(buf.getvalue())


def preparing(cfg: ImageConfig) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        base64.b64encode(prepare(data, cfg).data)

    return run


def measure(
    variants: dict[str, tuple[Callable[[bytes], None], list[bytes]]], rounds: int
) -> dict[str, float]:
    """Median over rounds of CPU seconds per image, for each variant."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn, images in variants.values():  # warm up: imports, codecs, caches
        for data in images[:4]:
            fn(data)
    for _ in range(rounds):
        for name, (fn, images) in variants.items():
            t0 = time.process_time()
            for data in images:
                fn(data)
            times[name].append((time.process_time() - t0) / len(images))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64, help="images of each size")
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()

    auto, always = ImageConfig(), ImageConfig(reencode="always")
    small, big = web_jpegs(args.images, 512), web_jpegs(args.images, 1024, seed=1)
    sent_as_is = sum(prepare(d, auto).passed_through for d in small)
    assert not any(prepare(d, auto).passed_through for d in big)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.images} images of each size, {args.rounds} rounds, median CPU ms per image"
    )
    print(f"512-px JPEGs sent as they came with reencode=auto: {sent_as_is}/{len(small)}")
    print(
        f"mean bytes: 512-px {np.mean([len(d) for d in small]) / 1e3:.0f} kB, "
        f"1024-px {np.mean([len(d) for d in big]) / 1e3:.0f} kB"
    )

    ms = {
        name: s * 1e3
        for name, s in measure(
            {
                "512 auto": (preparing(auto), small),
                "512 always": (preparing(always), small),
                "512 floor": (floor, small),
                "1024 prepare": (preparing(auto), big),
                "1024 bare": (bare_resize, big),
            },
            args.rounds,
        ).items()
    }
    print()
    print("512-px conforming JPEGs (prepare + base64 of what is sent)")
    print(f"  reencode=auto (pass-through)   {ms['512 auto']:8.3f} ms")
    print(f"  reencode=always (re-encode)    {ms['512 always']:8.3f} ms")
    print(f"  floor: sha256 + base64 only    {ms['512 floor']:8.3f} ms")
    print(f"  always / auto                  {ms['512 always'] / ms['512 auto']:8.1f} x")
    print(f"  auto / floor                   {ms['512 auto'] / ms['512 floor']:8.2f} x")
    print("1024-px JPEGs (re-encoded either way)")
    print(f"  prepare                        {ms['1024 prepare']:8.3f} ms")
    print(f"  bare draft+resize+encode+hash  {ms['1024 bare']:8.3f} ms")
    print(f"  prepare / bare                 {ms['1024 prepare'] / ms['1024 bare']:8.2f} x")


if __name__ == "__main__":
    main()
