"""img2dataset `webdataset` shards: NNNNN.tar (+ NNNNN.parquet metadata, + NNNNN_stats.json),
and its `files` shards: a folder NNNNN/ holding the same members as files.

The tar is streamed member by member (never extracted to disk, so a member named
`../../x.jpg` is only a key). Members of one sample are consecutive, as webdataset writes them.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from recaption.records import Reason
from recaption.sources.base import IMAGE_EXTENSIONS, Sample, Shard, status_error

_META_COLUMNS = ("key", "url", "caption", "status", "error_message")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def _load_metadata(shard: Shard) -> dict[str, dict]:
    if shard.metadata is None:
        return {}
    table = shard.parquet(shard.metadata)
    columns = [c for c in _META_COLUMNS if c in table.schema_arrow.names]
    if "key" not in columns:
        return {}
    rows = table.read(columns=columns).to_pylist()
    return {str(row["key"]): row for row in rows}


def _to_sample(shard: Shard, key: str, members: dict[str, bytes], meta: dict) -> Sample:
    info: dict = {}
    if "json" in members:
        try:
            info = json.loads(members["json"])
        except ValueError:
            info = {}
    alt = (
        members["txt"].decode("utf-8", "replace")
        if "txt" in members
        else info.get("caption", meta.get("caption"))
    )
    sample = Sample(key=key, shard=shard.id, url=info.get("url", meta.get("url")), alt_text=alt)
    image_ext = next((ext for ext in members if ext in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        sample.error = (Reason.missing_image, f"sample has {sorted(members)} but no image member")
    else:
        sample.image = members[image_ext]
    return sample


def _members(shard: Shard) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read) of each file of the shard, in order: a tar's members, or the files of a
    folder (img2dataset's `files` output, where a shard is the folder NNNNN/). `read` is
    called before the next member: a cut tar fails there, on the member it cuts."""
    if shard.format == "files":
        for path in shard.listdir():

            def read(path: Path = path) -> bytes:
                with shard.open(path) as fh:
                    return fh.read()

            yield path.name, read
        return
    with shard.open(stream=True) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read


def read_webdataset(shard: Shard) -> Iterator[Sample]:
    metadata = _load_metadata(shard)
    seen: set[str] = set()
    key: str | None = None  # the sample being gathered, if any
    members: dict[str, bytes] = {}

    def flush() -> Sample:
        seen.add(key)
        return _to_sample(shard, key, members, metadata.get(key, {}))

    try:
        for name, read in _members(shard):
            member_key, ext = split_member_name(name)
            if key is not None and (member_key != key or ext in members):
                yield flush()
                members = {}
            key = member_key
            members[ext] = read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        # The tar is cut or corrupt. Every sample before this one was yielded complete;
        # this one may be missing members, so it is rejected rather than guessed at.
        if key is not None:
            seen.add(key)
            url = metadata.get(key, {}).get("url")
            yield Sample(
                key=key,
                shard=shard.id,
                url=url,
                error=(Reason.truncated_member, f"tar ends inside this sample: {exc}"),
            )
        key = None
    if key is not None:
        yield flush()

    # Keys img2dataset listed but the tar does not hold: failed downloads, or lost to a cut.
    for meta_key, row in metadata.items():
        if meta_key in seen:
            continue
        error = status_error(row.get("status"), row.get("error_message")) or (
            Reason.missing_from_tar,
            "listed as downloaded in the shard parquet but absent from the tar",
        )
        yield Sample(
            key=meta_key,
            shard=shard.id,
            url=row.get("url"),
            alt_text=row.get("caption"),
            error=error,
        )
