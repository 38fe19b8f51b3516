"""What the readers produce: shards, samples, and the columns of a parquet table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recaption.records import Reason

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class Columns:
    """Which column of a parquet table is which (Hugging Face datasets name them as they
    like); None: found by the usual names."""

    image: str | None = None  # binary, or a struct with a `bytes` field
    caption: str | None = None  # the alt text
    key: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Shard:
    id: str  # the file stem, e.g. "00012"; the output shard gets the same id
    path: Path  # the tar, parquet or folder
    format: Literal["webdataset", "files", "parquet", "folder"]
    metadata: Path | None = None  # img2dataset's sibling NNNNN.parquet (webdataset, files)
    columns: Columns = Columns()  # parquet
    members: tuple[str, ...] = ()  # folder: this shard's images, relative to `path`
    take: int | None = None  # input.limit: read only this many samples
    fraction: float | None = None  # input.fraction: keep this share of keys (by hash)
    fs: Any = field(default=None, compare=False)  # a remote shard's pyarrow filesystem

    def open(self, path: Path | None = None, stream: bool = False) -> BinaryIO:
        """A file of the shard (its own path by default), local or remote. `stream`: read
        front to back only (a tar), which object stores serve without seeking."""
        target = str(path or self.path)
        if self.fs is None:
            return open(target, "rb")
        return self.fs.open_input_stream(target) if stream else self.fs.open_input_file(target)

    def listdir(self) -> list[Path]:
        """The files of a folder shard (img2dataset `files`), sorted."""
        if self.fs is None:
            return sorted(p for p in self.path.iterdir() if p.is_file())
        infos = self.fs.get_file_info(pafs.FileSelector(str(self.path)))
        return sorted(Path(i.path) for i in infos if i.type == pafs.FileType.File)

    def parquet(self, path: Path | None = None) -> pq.ParquetFile:
        return pq.ParquetFile(str(path or self.path), filesystem=self.fs)

    @property
    def table(self) -> Path | None:
        """The parquet with a row per sample: the shard itself, or img2dataset's metadata."""
        if self.format == "parquet":
            return self.path
        return self.metadata if self.format in ("webdataset", "files") else None

    def expected_samples(self) -> int | None:
        """Samples in the shard, from its metadata (a parquet footer) or listing; None if
        only reading it would tell (a tar without its parquet)."""
        if self.format == "folder":
            return len(self.members)
        return self.parquet(self.table).metadata.num_rows if self.table else None


@dataclass
class Sample:
    key: str
    shard: str
    url: str | None = None
    alt_text: str | None = None
    image: bytes | None = None
    # (reason, detail) when the sample failed at the read stage; the shard pass rejects it
    error: tuple[Reason, str] | None = None


def status_error(status: str | None, message: str | None) -> tuple[Reason, str] | None:
    """img2dataset's per-row status: anything but success is a failed download."""
    if status in (None, "success"):
        return None
    return Reason.download_failed, f"{status}: {message or 'no detail'}"
