"""The corpus, on disk or in a store: its layout, the shard writer, the manifest, the lock,
the committed set and where resume state lives. Every reader and writer of a corpus goes
through here.

    data/NNNNN.parquet       captioned rows of input shard NNNNN
    rejected/NNNNN.parquet   its other samples, each with a reason
    manifest.json            config (redacted), totals, versions, a report per shard
    .journal/NNNNN.jsonl     answers of an unfinished shard (journal.py)
    .batches/NNNNN.json      openai-batch: the ids of its batches (captioners/batch.py)
    .lock                    held by the run writing to the corpus

A shard's files are written under temporary names, in row groups as rows arrive (memory
stays bounded by the row group, not the shard), fsync'd, and renamed into place only when
the shard is complete; the manifest records it after that. A shard is committed when the
manifest lists it and both its files exist.

A corpus in object storage (`output.path: s3://...`) is staged: the same files, the journal
and batch ids are written in a local staging folder, and a committed shard's two files are
then put whole into the store (an object appears complete or not at all) before the
manifest that lists them, which is put last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from recaption.errors import RunError
from recaption.records import DATA_SCHEMA, REJECTED_SCHEMA, CaptionRecord, Manifest, Rejection
from recaption.storage import filesystem

DATA_DIR = "data"
REJECTED_DIR = "rejected"
MANIFEST = "manifest.json"
LOCK = ".lock"
JOURNAL_DIR = ".journal"
BATCHES_DIR = ".batches"


def journal_path(local: Path, shard: str) -> Path:
    return local / JOURNAL_DIR / f"{shard}.jsonl"


def batch_state_path(local: Path, shard: str) -> Path:
    return local / BATCHES_DIR / f"{shard}.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def corpus_lock(local: Path) -> Iterator[None]:
    """One run at a time per corpus. The OS drops the lock when the holder dies, even by
    `kill -9`, so a crashed run never leaves a stale lock behind."""
    try:
        fh = open(local / LOCK, "a+")  # noqa: SIM115 - held for the block below
    except OSError as exc:
        raise RunError(f"cannot write to {local}: {exc.strerror or exc}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunError(
                f"{local} is in use by another recaption run ({holder}); wait for it or stop it"
            ) from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield


class CorpusStore:
    """Where a corpus lives. `local` is the folder written directly: the corpus itself, or
    for a corpus in object storage the staging folder (resume state, files being written)."""

    def __init__(self, path: str | Path, staging: str | Path | None = None):
        self.path = str(path)
        try:
            self.fs, self.root = filesystem(self.path)
        except ValueError as exc:
            raise RunError(f"cannot open {self.path}: {exc}") from None
        if self.fs is None:
            self.local = Path(self.root)
        elif staging:
            self.local = Path(staging)
        else:  # the same folder for the same corpus on every node and every run
            digest = hashlib.sha256(self.path.split("?")[0].encode()).hexdigest()[:16]
            self.local = Path("~/.cache/recaption/staging").expanduser() / digest

    # -- files ---------------------------------------------------------------------------------

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem for reading the corpus's files (by `shard_files` paths)."""
        return self.fs or pafs.LocalFileSystem()

    def shard_files(self, folder: str) -> dict[str, str]:
        """Shard id -> path of each finished `folder/NNNNN.parquet` (data/ or rejected/)."""
        base = f"{self.root}/{folder}" if self.fs is not None else str(self.local / folder)
        try:
            infos = self.arrow_fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        except OSError as exc:
            raise RunError(f"cannot list {self.path}/{folder}: {exc}") from None
        return {
            Path(i.path).stem: i.path
            for i in sorted(infos, key=lambda i: i.path)
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not Path(i.path).name.startswith(".")
        }

    def exists(self, relative: str) -> bool:
        if self.fs is None:
            return (self.local / relative).exists()
        return self.fs.get_file_info(f"{self.root}/{relative}").type == pafs.FileType.File

    def publish(self, staged: Path, relative: str) -> None:
        """Put a finished local file into the store whole, then drop the local copy."""
        if self.fs is None:
            return  # it is in place already
        with (
            open(staged, "rb") as src,
            self.fs.open_output_stream(f"{self.root}/{relative}") as dst,
        ):
            shutil.copyfileobj(src, dst, 8 << 20)
        staged.unlink()

    def read_text(self, relative: str) -> str | None:
        if not self.exists(relative):
            return None
        if self.fs is None:
            return (self.local / relative).read_text()
        with self.fs.open_input_stream(f"{self.root}/{relative}") as fh:
            return fh.read().decode()

    def write_text(self, relative: str, text: str) -> None:
        """Replace a file whole: rename on disk, one put in a store."""
        tmp = self.local / f".{relative}.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if self.fs is None:
            os.replace(tmp, self.local / relative)
        else:
            self.publish(tmp, relative)

    # -- the manifest and the committed set ----------------------------------------------------

    def load_manifest(self) -> Manifest | None:
        """None for a corpus not written yet; a damaged manifest is the user's to see."""
        try:
            text = self.read_text(MANIFEST)
            return Manifest.model_validate_json(text) if text is not None else None
        except (ValidationError, UnicodeDecodeError, OSError) as exc:
            why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise RunError(
                f"{self.path}/{MANIFEST} is damaged or not a recaption manifest ({why}); "
                "restore it, or write to a new output folder"
            ) from None

    def write_manifest(self, manifest: Manifest) -> None:
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
        self.write_text(MANIFEST, manifest.model_dump_json(indent=2))

    def committed(self, manifest: Manifest) -> set[str]:
        """Shards on record whose two files are both in place."""
        return {
            sid
            for sid in manifest.shards
            if self.exists(f"{DATA_DIR}/{sid}.parquet")
            and self.exists(f"{REJECTED_DIR}/{sid}.parquet")
        }

    # -- resume state --------------------------------------------------------------------------

    def journal_path(self, shard: str) -> Path:
        return journal_path(self.local, shard)

    def batch_state_path(self, shard: str) -> Path:
        return batch_state_path(self.local, shard)

    def journals(self) -> list[Path]:
        return sorted((self.local / JOURNAL_DIR).glob("*.jsonl"))

    def batch_states(self) -> list[Path]:
        return sorted((self.local / BATCHES_DIR).glob("*.json"))

    def forget(self, shard: str) -> None:
        """A committed shard's resume state is no longer needed: its journal and batch ids."""
        self.journal_path(shard).unlink(missing_ok=True)
        self.batch_state_path(shard).unlink(missing_ok=True)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """One run at a time on this machine; an object store has no locks to take."""
        return corpus_lock(self.local)


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
    def __init__(self, corpus: CorpusStore, shard: str, row_group_size: int = 256):
        self.store = corpus
        self.names = (f"{DATA_DIR}/{shard}.parquet", f"{REJECTED_DIR}/{shard}.parquet")
        self.data = _PartWriter(corpus.local / self.names[0], DATA_SCHEMA, row_group_size)
        self.rejected = _PartWriter(corpus.local / self.names[1], REJECTED_SCHEMA, row_group_size)

    def add(self, record: CaptionRecord) -> None:
        self.data.add(record.model_dump())

    def reject(self, rejection: Rejection) -> None:
        self.rejected.add(rejection.model_dump(mode="json"))

    def commit(self) -> None:
        self.data.commit()
        self.rejected.commit()
        _fsync_dir(self.data.final.parent)
        _fsync_dir(self.rejected.final.parent)
        for part, name in zip((self.data, self.rejected), self.names, strict=True):
            self.store.publish(part.final, name)

    def abort(self) -> None:
        self.data.abort()
        self.rejected.abort()
