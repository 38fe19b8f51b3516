"""Shared fixtures: one real local Ray per test session, sample shards, hostile shards."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recaption.samples import add_member, write_samples


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray, started once; the pipeline uses an initialised Ray as it is."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_samples(out, shards=2, per_shard=24, seed=1)
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Three shards of 40 URLs for the API runs: enough to kill things in the middle of."""
    out = tmp_path_factory.mktemp("api-shards")
    write_samples(out, shards=3, per_shard=40, seed=11)
    return out


# --- image bytes ----------------------------------------------------------------------------


def jpeg_bytes(size=(96, 64), color=(200, 40, 40), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, color)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(buf, "JPEG", **save)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A real PNG whose IHDR claims width x height (a decompression bomb's header)."""
    data = bytearray(png_bytes(Image.new("RGB", (8, 8), (1, 2, 3))))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


# --- shards ---------------------------------------------------------------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


def write_metadata(path: Path, rows: list[dict]) -> None:
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def scene_jpeg() -> bytes:
    im = Image.new("RGB", (256, 256), (245, 245, 245))
    im.paste((210, 35, 35), (30, 30, 90, 90))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture()
def hostile_shards(tmp_path) -> tuple[Path, dict[str, set[str]]]:
    """Shards full of what the web produces, and the keys each shard holds."""
    root = tmp_path / "hostile"
    root.mkdir()
    good = scene_jpeg()
    good_json = json.dumps({"url": "https://e.example/0.jpg", "caption": "from json"}).encode()
    cmyk = jpeg_bytes(mode="CMYK")
    deep = png_bytes(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)))
    rgba = png_bytes(Image.new("RGBA", (40, 40), (0, 0, 255, 90)))
    write_tar(
        root / "00000.tar",
        [
            ("000000000.jpg", good),
            ("000000000.txt", b"red square"),
            ("000000000.json", good_json),
            ("000000001.jpg", b""),  # zero bytes
            ("000000002.jpg", good[: len(good) // 2]),  # truncated image
            (
                "000000003.jpg",
                b"<!DOCTYPE html><html><body>404</body></html>",
            ),  # HTML saved as .jpg
            ("000000004.png", png_header_claiming(60000, 60000)),  # bomb header
            ("000000005.json", good_json),  # metadata without image
            ("000000006.jpg", cmyk),
            ("000000007.png", deep),  # 16-bit greyscale
            ("000000008.png", rgba),  # alpha
            ("000000000.jpg", good),  # repeat of a key
            ("../../escape.jpg", good),
            ("../../escape.txt", b"path traversal"),
        ],
    )
    keys0 = {f"00000000{i}" for i in range(9)} | {"../../escape"}

    members = []
    for i in range(6):
        members += [(f"00001000{i}.jpg", good), (f"00001000{i}.txt", f"sample {i}".encode())]
    write_tar(root / "00001.tar", members)
    with tarfile.open(root / "00001.tar") as tar:
        member = tar.getmember("000010003.jpg")
        cut = member.offset_data + member.size // 2  # the tar ends inside sample 3's image
    (root / "00001.tar").write_bytes((root / "00001.tar").read_bytes()[:cut])
    write_metadata(
        root / "00001.parquet",
        [
            {
                "key": f"00001000{i}",
                "url": f"https://e.example/{i}.jpg",
                "caption": None,
                "status": "success",
                "error_message": None,
            }
            for i in range(6)
        ]
        + [
            {
                "key": "000010006",
                "url": "https://e.example/6.jpg",
                "caption": "x",
                "status": "failed_to_download",
                "error_message": "HTTP Error 404",
            }
        ],
    )
    keys1 = {f"00001000{i}" for i in range(7)}
    return root, {"00000": keys0, "00001": keys1}
