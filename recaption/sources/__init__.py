"""Shard readers: turn an input folder into shards, and a shard into a stream of samples.

A reader never raises on bad samples: it yields a `Sample` carrying a read-stage error, so
that every key of the shard is accounted for downstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq

from recaption.records import Reason

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


class InputError(Exception):
    """The input root cannot be used at all; the message is one line for the user."""


@dataclass(frozen=True)
class Shard:
    id: str  # the file stem, e.g. "00012"; the output shard gets the same id
    path: Path
    format: Literal["webdataset", "parquet"]
    metadata: Path | None = None  # img2dataset's sibling NNNNN.parquet for a webdataset shard

    def expected_samples(self) -> int | None:
        """Rows in the shard's metadata parquet (from the footer, no data read), if any."""
        table = self.metadata if self.format == "webdataset" else self.path
        return pq.ParquetFile(table).metadata.num_rows if table else None


@dataclass
class Sample:
    key: str
    shard: str
    url: str | None = None
    alt_text: str | None = None
    image: bytes | None = None
    error: tuple[Reason, str] | None = None  # set when the sample failed at the read stage


def list_shards(root: str | Path, fmt: str = "auto") -> list[Shard]:
    root = Path(root)
    if not root.exists():
        raise InputError(f"input path does not exist: {root}")
    if not root.is_dir():
        raise InputError(f"input path is not a folder: {root}")
    try:
        names = {p.name: p for p in root.iterdir() if p.is_file()}
    except OSError as exc:
        raise InputError(f"cannot read input folder {root}: {exc.strerror or exc}") from None

    shards: list[Shard] = []
    tars = {p.stem: p for n, p in names.items() if n.endswith(".tar")}
    parquets = {p.stem: p for n, p in names.items() if n.endswith(".parquet")}
    if fmt in ("auto", "webdataset"):
        shards += [Shard(sid, p, "webdataset", parquets.get(sid)) for sid, p in tars.items()]
    if fmt in ("auto", "parquet"):
        # A parquet next to a tar of the same id is that tar's metadata, not a shard of its own.
        shards += [
            Shard(sid, p, "parquet")
            for sid, p in parquets.items()
            if fmt == "parquet" or sid not in tars
        ]
    if not shards:
        raise InputError(f"no shards (NNNNN.tar or NNNNN.parquet) found in {root}")
    return sorted(shards, key=lambda s: s.id)


def read_samples(shard: Shard) -> Iterator[Sample]:
    """Every sample of the shard, once; a key repeated inside the shard comes back as a
    `duplicate_key` error after its first occurrence."""
    if shard.format == "webdataset":
        from recaption.sources.webdataset import read_webdataset as reader
    else:
        from recaption.sources.parquet import read_parquet as reader
    seen: set[str] = set()
    for sample in reader(shard):
        if sample.key in seen:
            sample.error = (Reason.duplicate_key, "key already seen earlier in this shard")
            sample.image = None
        seen.add(sample.key)
        yield sample


def status_error(status: str | None, message: str | None) -> tuple[Reason, str] | None:
    """img2dataset's per-row status: anything but success is a failed download."""
    if status in (None, "success"):
        return None
    return Reason.download_failed, f"{status}: {message or 'no detail'}"
