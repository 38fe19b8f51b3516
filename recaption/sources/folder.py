"""A plain folder of images (at any depth), with optional `<name>.txt` alt text beside each.

The key is the image's path relative to the folder, without its extension, so
`cats/tabby.jpg` is `cats/tabby` and its alt text is `cats/tabby.txt`; the path is also
stored as the row's `url`.
"""

from __future__ import annotations

from collections.abc import Iterator

from recaption.records import Reason
from recaption.sources import Sample, Shard


def read_folder(shard: Shard) -> Iterator[Sample]:
    for relative in shard.members:
        path = shard.path / relative
        key = relative.rsplit(".", 1)[0]
        sample = Sample(key=key, shard=shard.id, url=relative)
        sidecar = path.with_suffix(".txt")
        try:
            if sidecar.is_file():
                sample.alt_text = sidecar.read_text(errors="replace").strip()
            sample.image = path.read_bytes()
        except OSError as exc:  # removed or unreadable since the listing
            sample.error = (Reason.missing_image, f"cannot read {relative}: {exc.strerror or exc}")
        yield sample
