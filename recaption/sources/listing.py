"""The input as shards: list an input root, narrow it to a selection, read a shard's
samples. A reader never raises on bad samples: it yields a `Sample` carrying a read-stage
error, so that every key of the shard is accounted for downstream.

The input may be a local folder or any URI `storage.filesystem` opens (`s3://`, `gs://`,
`hf://` ...); a remote shard carries its filesystem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow.fs as pafs

from recaption.config import InputConfig
from recaption.errors import InputError
from recaption.records import Reason
from recaption.sources.base import IMAGE_EXTENSIONS, Columns, Sample, Shard
from recaption.storage import filesystem


def _entries(
    fs: pafs.FileSystem | None, root: str, recursive: bool = False
) -> list[tuple[Path, bool]]:
    """(path, is_dir) below `root`."""
    if fs is None:
        base = Path(root)
        found = base.rglob("*") if recursive else base.iterdir()
        return [(p, p.is_dir()) for p in found]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
    return [(Path(i.path), i.type == pafs.FileType.Directory) for i in infos]


def list_shards(
    root: str | Path,
    fmt: str = "auto",
    columns: Columns | None = None,
    images_per_shard: int = 10_000,
) -> list[Shard]:
    """The input's shards, sorted by id. `auto` finds img2dataset output (NNNNN.tar,
    NNNNN.parquet, NNNNN/ folders) and, failing that, a plain folder of images."""
    try:
        fs, base = filesystem(str(root))
    except ValueError as exc:
        raise InputError(f"cannot open input {root}: {exc}") from None
    try:
        if fs is None and not Path(base).exists():
            raise InputError(f"input path does not exist: {root}")
        if fs is None and not Path(base).is_dir():
            raise InputError(f"input path is not a folder: {root}")
        if fs is not None and fs.get_file_info(base).type != pafs.FileType.Directory:
            raise InputError(f"input path is not a folder (or does not exist): {root}")
        entries = _entries(fs, base)
    except OSError as exc:
        raise InputError(f"cannot read input folder {root}: {exc.strerror or exc}") from None
    files = {p.name: p for p, is_dir in entries if not is_dir}
    tars = {p.stem: p for n, p in files.items() if n.endswith(".tar")}
    parquets = {p.stem: p for n, p in files.items() if n.endswith(".parquet")}
    # img2dataset `files` output: NNNNN/ beside NNNNN.parquet
    folders = {
        p.name: p for p, is_dir in entries if is_dir and (fmt == "files" or p.name in parquets)
    }

    shards: list[Shard] = []
    if fmt in ("auto", "webdataset"):
        shards += [Shard(sid, p, "webdataset", parquets.get(sid), fs=fs) for sid, p in tars.items()]
    if fmt in ("auto", "files"):
        shards += [Shard(sid, p, "files", parquets.get(sid), fs=fs) for sid, p in folders.items()]
    if fmt in ("auto", "parquet"):
        # A parquet beside a tar or folder of the same id is its metadata, not a shard.
        shards += [
            Shard(sid, p, "parquet", columns=columns or Columns(), fs=fs)
            for sid, p in parquets.items()
            if fmt == "parquet" or (sid not in tars and sid not in folders)
        ]
    if fmt == "folder" or (fmt == "auto" and not shards):
        shards = _image_folder_shards(fs, base, images_per_shard)
    if not shards:
        raise InputError(f"no shards (NNNNN.tar, NNNNN.parquet, NNNNN/) or images found in {root}")
    return sorted(shards, key=lambda s: s.id)


def _image_folder_shards(fs: pafs.FileSystem | None, root: str, per_shard: int) -> list[Shard]:
    """A plain folder of images, at any depth, cut into shards of `per_shard` in path order
    (so a re-run over the same folder makes the same shards)."""
    base = Path(root)
    images = sorted(
        path.relative_to(base).as_posix()
        for path, is_dir in _entries(fs, root, recursive=True)
        if not is_dir and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )
    return [
        Shard(
            f"{i // per_shard:05d}",
            base,
            "folder",
            members=tuple(images[i : i + per_shard]),
            fs=fs,
        )
        for i in range(0, len(images), per_shard)
    ]


def read_samples(shard: Shard) -> Iterator[Sample]:
    """Every sample of the shard, once; a key repeated inside the shard comes back as a
    `duplicate_key` error after its first occurrence."""
    if shard.format in ("webdataset", "files"):
        from recaption.sources.webdataset import read_webdataset as reader
    elif shard.format == "folder":
        from recaption.sources.folder import read_folder as reader
    else:
        from recaption.sources.parquet import read_parquet as reader
    seen: set[str] = set()
    for n, sample in enumerate(reader(shard)):
        if shard.take is not None and n >= shard.take:
            break
        if shard.fraction is not None and _share(shard.id, sample.key) >= shard.fraction:
            continue
        if sample.key in seen:
            sample.error = (Reason.duplicate_key, "key already seen earlier in this shard")
            sample.image = None
        seen.add(sample.key)
        yield sample


def _share(shard: str, key: str) -> float:
    """A key's place in [0, 1), the same on every run and machine."""
    digest = hashlib.blake2b(f"{shard}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def input_shards(cfg: InputConfig) -> list[Shard]:
    """The shards `cfg` asks for: listed, then narrowed by `shards`, `limit`, `fraction`."""
    columns = Columns(cfg.image_col, cfg.caption_col, cfg.key_col, cfg.url_col)
    shards = list_shards(cfg.path, cfg.format, columns, cfg.images_per_shard)
    if cfg.shards:
        wanted = _positions(str(cfg.shards), len(shards))
        shards = [s for i, s in enumerate(shards) if i in wanted]
    if cfg.fraction is not None:
        shards = [replace(s, fraction=cfg.fraction) for s in shards]
    if cfg.limit is not None:
        left, limited = cfg.limit, []
        for shard in shards:
            if left <= 0:
                break
            n = shard.expected_samples()
            if n is None:  # a tar without its parquet: count by reading
                n = sum(1 for _ in read_samples(shard))
            limited.append(replace(shard, take=left) if left < n else shard)
            left -= n
        shards = limited
    if not shards:
        raise InputError(f"input.shards={cfg.shards!r} selects none of {cfg.path}'s shards")
    return shards


def _positions(spec: str, count: int) -> set[int]:
    """ "0-9,12" -> {0, ..., 9, 12}: positions in the sorted shard list."""
    wanted: set[int] = set()
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            wanted.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise InputError(
            f'input.shards={spec!r}: expected positions like "0-9" or "0,3,7-8"'
        ) from None
    if not wanted or max(wanted) >= count:
        raise InputError(f"input.shards={spec!r}: the input has {count} shards (0-{count - 1})")
    return wanted
