"""Writing the corpus: one data and one rejected Parquet file per shard, and the manifest.

A shard's files are written under temporary names, in row groups as rows arrive (memory
stays bounded by the row group, not the shard), fsync'd, and renamed into place only
when the shard is complete. The manifest is replaced atomically after that.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recaption.records import DATA_SCHEMA, REJECTED_SCHEMA, CaptionRecord, Manifest, Rejection

DATA_DIR = "data"
REJECTED_DIR = "rejected"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PartWriter:
    """Row-grouped Parquet writer to `.NAME.tmp`, renamed to NAME on commit."""

    def __init__(self, final: Path, schema: pa.Schema, row_group_size: int):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")
        self.schema = schema
        self.row_group_size = row_group_size
        self.rows: list[dict] = []
        self.count = 0
        final.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def commit(self) -> None:
        self.flush()
        self.writer.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardWriter:
    def __init__(self, corpus: Path, shard: str, row_group_size: int = 256):
        self.data = _PartWriter(corpus / DATA_DIR / f"{shard}.parquet", DATA_SCHEMA, row_group_size)
        self.rejected = _PartWriter(
            corpus / REJECTED_DIR / f"{shard}.parquet", REJECTED_SCHEMA, row_group_size
        )

    def add(self, record: CaptionRecord) -> None:
        self.data.add(record.model_dump())

    def reject(self, rejection: Rejection) -> None:
        self.rejected.add(rejection.model_dump(mode="json"))

    def commit(self) -> None:
        self.data.commit()
        self.rejected.commit()
        _fsync_dir(self.data.final.parent)
        _fsync_dir(self.rejected.final.parent)

    def abort(self) -> None:
        self.data.abort()
        self.rejected.abort()


def load_manifest(corpus: Path) -> Manifest | None:
    path = corpus / MANIFEST
    return Manifest.model_validate_json(path.read_text()) if path.exists() else None


def write_manifest(corpus: Path, manifest: Manifest) -> None:
    manifest.updated_at = datetime.now(UTC)
    shards = manifest.shards.values()
    by_reason: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for report in shards:
        by_reason.update(report.rejected_by_reason)
        outcomes.update(report.request_outcomes)
    manifest.totals = {
        "shards": len(manifest.shards),
        "samples": sum(r.samples for r in shards),
        "captioned": sum(r.captioned for r in shards),
        "rejected": sum(r.rejected for r in shards),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "truncated_shards": sorted(r.shard for r in shards if r.truncated),
        "input_tokens": sum(r.input_tokens for r in shards),
        "output_tokens": sum(r.output_tokens for r in shards),
        "cost_usd": round(sum(r.cost_usd for r in shards), 6),
        "requests": sum(r.requests for r in shards),
        "request_outcomes": dict(sorted(outcomes.items())),
    }
    tmp = corpus / f".{MANIFEST}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, corpus / MANIFEST)
