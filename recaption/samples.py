"""`recaption samples DIR`: bundled sample web shards in img2dataset's exact layout.

Each shard is `NNNNN.tar` (`<key>.jpg`, `<key>.txt`, `<key>.json`), `NNNNN.parquet` (one row
per URL, img2dataset's columns, failed downloads included) and `NNNNN_stats.json`. Content:
real photographs that scikit-image ships, randomly cropped and resized, and procedural
scenes, each with alt text as vague, partial or wrong as real web alt text.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from recaption.errors import ConfigError
from recaption.scenes import SCENES, SceneStyle, alt_text, random_scene, render

# scikit-image sample -> alt texts a web page might carry for it (some wrong on purpose)
PHOTOS: dict[str, list[str]] = {
    "astronaut": [
        "astronaut",
        "NASA portrait",
        "woman in a space suit with a flag",
        "IMG_0412.JPG",
        "space",
    ],
    "chelsea": ["cat", "my cat Chelsea", "kitten", "dog", "Cute Cat Pictures Free Download HD"],
    "coffee": [
        "coffee",
        "cup of coffee on a saucer",
        "tea",
        "Best Espresso Beans 2024 | Buy Online",
        "morning",
    ],
    "rocket": ["rocket", "launch pad", "SpaceX Falcon 9", "IMG_2231.jpg", "space shuttle"],
    "camera": [
        "cameraman",
        "man with a camera",
        "black and white photo",
        "photographer",
        "IMG_0001",
    ],
    "coins": ["coins", "old money", "collection", "Buy Gold Coins Online", "image"],
    "hubble_deep_field": ["space", "galaxies", "stars", "Hubble Wallpaper 4K", "night sky"],
    "immunohistochemistry": ["microscope slide", "cells", "tissue sample", "IHC staining", "image"],
    "moon": ["moon", "lunar surface", "crater", "space", "full moon photo"],
    "page": ["document", "scanned page", "text", "page 1", "book"],
    "text": ["text", "sign", "handwriting", "image", "font sample"],
    "colorwheel": ["color wheel", "rainbow", "colors", "spectrum", "gradient"],
    "clock": ["clock", "wall clock", "time", "IMG_1130.jpg", "watch"],
    "brick": ["brick wall", "texture", "wall", "background texture free", "bricks"],
    "retina": ["eye", "retina scan", "fundus photo", "medical image", "eyeball"],
}
_FAILURES = ["HTTP Error 404: Not Found", "<urlopen error timed out>", "HTTP Error 403: Forbidden"]
_PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


def _load_photos() -> dict[str, Image.Image]:
    try:
        import skimage.data
    except ImportError:
        raise ConfigError(
            "recaption samples needs scikit-image for its photographs: pip install 'recaption[samples]'"
        ) from None
    photos = {}
    for name in PHOTOS:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        photos[name] = Image.fromarray(arr).convert("RGB")
    return photos


def _photo_variant(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop, flip and size, as the same picture appears on different pages."""
    w, h = photo.size
    scale = rng.uniform(0.75, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = rng.randint(320, 900)
    ratio = side / max(im.size)
    return im.resize(
        (max(1, round(im.width * ratio)), max(1, round(im.height * ratio))),
        Image.Resampling.LANCZOS,
    )


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000  # fixed: the same seed gives byte-identical shards
    tar.addfile(info, io.BytesIO(data))


@dataclass
class WebImage:
    """One URL of a shard, as img2dataset would have fetched it."""

    url: str
    caption: str | None  # the alt text
    image: Image.Image | None = None  # None: a failed download
    error: str | None = None
    quality: int = 90
    extra: dict = field(default_factory=dict)  # more fields for <key>.json (a scene's truth)


def write_shard(out: Path, shard: int, items: list[WebImage]) -> Path:
    """NNNNN.tar, NNNNN.parquet and NNNNN_stats.json in img2dataset's layout; keys are
    NNNNN + the item's index."""
    started = time.time()
    rows = []
    tar_path = out / f"{shard:05d}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, item in enumerate(items):
            key = f"{shard:05d}{i:04d}"
            if item.image is None:  # img2dataset keeps failed downloads in the parquet only
                rows.append(
                    {
                        "key": key,
                        "url": item.url,
                        "caption": item.caption,
                        "status": "failed_to_download",
                        "error_message": item.error,
                    }
                )
                continue
            buf = io.BytesIO()
            item.image.save(buf, "JPEG", quality=item.quality)
            data = buf.getvalue()
            row = {
                "key": key,
                "url": item.url,
                "caption": item.caption,
                "status": "success",
                "error_message": None,
                "width": item.image.width,
                "height": item.image.height,
                "original_width": item.image.width,
                "original_height": item.image.height,
                "exif": "{}",
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            rows.append(row)
            add_member(tar, f"{key}.jpg", data)
            if item.caption is not None:
                add_member(tar, f"{key}.txt", item.caption.encode())
            add_member(tar, f"{key}.json", json.dumps(row | item.extra).encode())
    pq.write_table(pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA), out / f"{shard:05d}.parquet")
    successes = sum(r["status"] == "success" for r in rows)
    errors = Counter(r["error_message"] for r in rows if r["status"] != "success")
    stats = {
        "count": len(rows),
        "successes": successes,
        "failed_to_download": len(rows) - successes,
        "failed_to_resize": 0,
        "duration": round(time.time() - started, 3),
        "start_time": started,
        "end_time": time.time(),
        "status_dict": {"success": successes, **errors},
    }
    (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=2))
    return tar_path


def write_samples(
    out: Path, shards: int = 2, per_shard: int = 64, seed: int = 0, photo_share: float = 0.5
) -> list[Path]:
    """Write `shards` shards of `per_shard` URLs each (a few of them failed downloads); a
    `photo_share` of the images are photographs, the rest procedural scenes."""
    out.mkdir(parents=True, exist_ok=True)
    photos = _load_photos() if photo_share > 0 else {}
    names = sorted(photos)
    rng = random.Random(seed)
    written = []
    for shard in range(shards):
        items = []
        for i in range(per_shard):
            url = f"https://images.example.com/{rng.getrandbits(40):010x}.jpg"
            if i % 16 == 7:
                caption = rng.choice(["photo", "image", None])
                items.append(WebImage(url, caption, error=rng.choice(_FAILURES)))
                continue
            if rng.random() < photo_share:
                name = rng.choice(names)
                image, caption = _photo_variant(photos[name], rng), rng.choice(PHOTOS[name])
            else:
                scene = random_scene(rng)
                image, caption = render(scene), alt_text(scene, rng)
            items.append(WebImage(url, caption, image, quality=rng.randint(75, 95)))
        written.append(write_shard(out, shard, items))
    return written


def write_scenes(
    out: Path, n: int, per_shard: int = 1000, seed: int = 0, style: SceneStyle = SCENES
) -> list[Path]:
    """`n` procedural scenes as web shards, each `<key>.json` carrying its ground truth
    under "scene", and `truth.jsonl` beside them: {"key", "alt_text", **truth} a line."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    with open(out / "truth.jsonl", "w") as truth_lines:
        for shard in range(-(-n // per_shard)):
            items = []
            for i in range(min(per_shard, n - shard * per_shard)):
                scene = random_scene(rng, style)
                url = f"https://scenes.example.com/{rng.getrandbits(40):010x}.jpg"
                alt, truth = alt_text(scene, rng), scene.truth()
                items.append(WebImage(url, alt, render(scene), extra={"scene": truth}))
                record = {"key": f"{shard:05d}{i:04d}", "alt_text": alt, **truth}
                truth_lines.write(json.dumps(record) + "\n")
            written.append(write_shard(out, shard, items))
    return written
