"""A plain folder of images (at any depth), with optional `<name>.txt` alt text beside each.

The key is the image's path relative to the folder, without its extension, so
`cats/tabby.jpg` is `cats/tabby` and its alt text is `cats/tabby.txt`; the path is also
stored as the row's `url`.
"""

from __future__ import annotations

from collections.abc import Iterator

from recaption.records import Reason
from recaption.sources.base import Sample, Shard


def read_folder(shard: Shard) -> Iterator[Sample]:
    for relative in shard.members:
        path = shard.path / relative
        sample = Sample(key=relative.rsplit(".", 1)[0], shard=shard.id, url=relative)
        try:
            with shard.open(path) as fh:
                sample.image = fh.read()
        except OSError as exc:  # removed or unreadable since the listing
            sample.error = (Reason.missing_image, f"cannot read {relative}: {exc.strerror or exc}")
            yield sample
            continue
        try:
            with shard.open(path.with_suffix(".txt")) as fh:
                sample.alt_text = fh.read().decode("utf-8", "replace").strip()
        except OSError:
            pass  # no sidecar: no alt text
        yield sample
