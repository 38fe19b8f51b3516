"""img2dataset `parquet` shards: one NNNNN.parquet per shard with the image bytes in a column."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.records import Reason
from recaption.sources import IMAGE_EXTENSIONS, Sample, Shard, status_error

_BATCH_ROWS = 64  # bounded memory: one batch of image bytes at a time


def image_column(schema: pa.Schema) -> str | None:
    """img2dataset names the bytes column after the encode format (`jpg` by default)."""
    for name in (*IMAGE_EXTENSIONS, "image"):
        if name in schema.names:
            dtype = schema.field(name).type
            if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
                return name
    return None


def read_parquet(shard: Shard) -> Iterator[Sample]:
    table = pq.ParquetFile(shard.path)
    schema = table.schema_arrow
    column = image_column(schema)
    index = 0
    for batch in table.iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            key = str(row["key"]) if row.get("key") is not None else f"{shard.id}{index:04d}"
            index += 1
            sample = Sample(
                key=key, shard=shard.id, url=row.get("url"), alt_text=row.get("caption")
            )
            error = status_error(row.get("status"), row.get("error_message"))
            if error is None and (column is None or row.get(column) is None):
                error = (Reason.missing_image, "row has no image bytes")
            if error:
                sample.error = error
            else:
                sample.image = row[column]
            yield sample
