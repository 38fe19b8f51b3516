"""img2dataset `parquet` shards: one NNNNN.parquet per shard with the image bytes in a column."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from recaption.records import Reason
from recaption.sources.base import IMAGE_EXTENSIONS, Sample, Shard, status_error

_BATCH_ROWS = 64  # bounded memory: one batch of image bytes at a time


def image_column(schema: pa.Schema, name: str | None = None) -> str | None:
    """The image bytes column: `name`, or as img2dataset names it after the encode format
    (`jpg` by default), or `image`. Binary, or a struct with a `bytes` field (Hugging Face
    datasets' Image feature)."""
    for candidate in [name] if name else (*IMAGE_EXTENSIONS, "image", "img"):
        if candidate in schema.names:
            dtype = schema.field(candidate).type
            if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
                return candidate
            if pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0:
                return candidate
    return None


def _column(schema: pa.Schema, name: str | None, usual: tuple[str, ...]) -> str | None:
    if name:
        return name if name in schema.names else None
    return next((c for c in usual if c in schema.names), None)


def read_parquet(shard: Shard) -> Iterator[Sample]:
    table = shard.parquet()
    schema = table.schema_arrow
    names = shard.columns
    column = image_column(schema, names.image)
    caption = _column(schema, names.caption, ("caption", "alt_text", "alt", "text", "TEXT"))
    key_col = _column(schema, names.key, ("key",))
    url_col = _column(schema, names.url, ("url", "URL"))
    index = 0
    for batch in table.iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            key = row.get(key_col) if key_col else None
            key = str(key) if key is not None else f"{shard.id}{index:04d}"
            index += 1
            sample = Sample(
                key=key,
                shard=shard.id,
                url=row.get(url_col) if url_col else None,
                alt_text=row.get(caption) if caption else None,
            )
            image = row.get(column) if column else None
            if isinstance(image, dict):  # {"bytes": ..., "path": ...}
                image = image.get("bytes")
            error = status_error(row.get("status"), row.get("error_message"))
            if error is None and image is None:
                error = (Reason.missing_image, "row has no image bytes")
            if error:
                sample.error = error
            else:
                sample.image = image
            yield sample
