"""The corpus, on disk or in a store: its layout, the shard writer, the manifest, the lock,
the committed set and where resume state lives. Every reader and writer of a corpus goes
through here.

    data/NNNNN.parquet       captioned rows of input shard NNNNN
    rejected/NNNNN.parquet   its other samples, each with a reason
    commits/NNNNN.json       its commit record: the ShardReport, written after both files
    manifest.json            config (redacted), versions, totals: a summary, rewritten every
                             few seconds while shards commit and at the end of a run
    .journal/NNNNN.jsonl     answers of an unfinished shard (journal.py)
    .journal/NNNNN.retry     a committed shard being recommitted (--retry-rejected)
    .batches/NNNNN.json      openai-batch: the ids of its batches (captioners/batch.py)
    .lock                    held by the run writing to the corpus

A shard's files are written under temporary names, in row groups as rows arrive (memory
stays bounded by the row group, not the shard), fsync'd, and renamed into place only when
the shard is complete; its commit record is written after that. A shard is committed
exactly when its record exists: a commit costs one small file (one PUT in a store), however
many shards came before, and opening a corpus is one pass over the records (`Committed`).
A corpus written before commit records listed the reports in `manifest.json` itself; it is
read as it is, and the first run on it writes a record for each of them.

A corpus in object storage (`output.path: s3://...`) is staged: the same files, the journal
and batch ids are written in a local staging folder, and a committed shard's two files are
then put whole into the store (an object appears complete or not at all) before the
manifest that lists them, which is put last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from recaption.errors import RunError
from recaption.records import (
    DATA_SCHEMA,
    REJECTED_SCHEMA,
    CaptionRecord,
    Manifest,
    Rejection,
    ShardReport,
    Totals,
    Usage,
)
from recaption.storage import filesystem

DATA_DIR = "data"
REJECTED_DIR = "rejected"
MANIFEST = "manifest.json"
COMMITS_DIR = "commits"
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

    def shard_files(self, folder: str, suffix: str = ".parquet") -> dict[str, str]:
        """Shard id -> path of each finished `folder/NNNNN.parquet` (data/, rejected/) or
        `commits/NNNNN.json`, from one listing."""
        base = f"{self.root}/{folder}" if self.fs is not None else str(self.local / folder)
        try:
            infos = self.arrow_fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        except OSError as exc:
            raise RunError(f"cannot list {self.path}/{folder}: {exc}") from None
        return {
            Path(i.path).stem: i.path
            for i in sorted(infos, key=lambda i: i.path)
            if i.type == pafs.FileType.File
            and i.path.endswith(suffix)
            and not Path(i.path).name.startswith(".")
        }

    def where(self, relative: str) -> str:
        """The path of a corpus file inside `arrow_fs`."""
        return f"{self.root}/{relative}" if self.fs is not None else str(self.local / relative)

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
        final = self.local / relative
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if self.fs is None:
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        else:
            self.publish(tmp, relative)

    # -- the manifest and the commit records -----------------------------------------------

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

    def write_manifest(self, manifest: Manifest, totals: Totals) -> None:
        manifest.updated_at = datetime.now(UTC)
        manifest.totals = totals.as_dict()
        self.write_text(MANIFEST, manifest.model_dump_json(indent=2))

    def commit(self, report: ShardReport) -> None:
        """The shard is committed: its record, written after both its files are in place."""
        self.write_text(f"{COMMITS_DIR}/{report.shard}.json", report.model_dump_json())

    def read_commit(self, shard: str) -> ShardReport | None:
        text = self.read_text(f"{COMMITS_DIR}/{shard}.json")
        return ShardReport.model_validate_json(text) if text is not None else None

    def commits(self, manifest: Manifest | None) -> Iterator[ShardReport]:
        """Every committed shard's report, once: its record, or for a corpus written before
        commit records, its entry in the manifest. Streamed: nothing is kept."""
        records = self.shard_files(COMMITS_DIR, ".json")
        paths, fs = list(records.values()), self.arrow_fs

        def read(path: str) -> ShardReport:
            with fs.open_input_stream(path) as fh:
                return ShardReport.model_validate_json(fh.read())

        # an object store answers each read in tens of ms: many at once, a chunk at a time
        with ThreadPoolExecutor(16 if self.fs is not None else 1) as pool:
            for start in range(0, len(paths), 256):
                yield from pool.map(read, paths[start : start + 256])
        for sid, report in (manifest.shards if manifest else {}).items():
            if sid not in records:
                yield report

    def migrate(self, manifest: Manifest) -> None:
        """A manifest that lists its shards (written before commit records): a record for
        each, after which the manifest no longer carries them."""
        for sid, report in manifest.shards.items():
            if not self.exists(f"{COMMITS_DIR}/{sid}.json"):
                self.commit(report)
        manifest.shards = {}

    # -- resume state --------------------------------------------------------------------------

    def journal_path(self, shard: str) -> Path:
        return journal_path(self.local, shard)

    def batch_state_path(self, shard: str) -> Path:
        return batch_state_path(self.local, shard)

    def journals(self) -> list[Path]:
        return sorted((self.local / JOURNAL_DIR).glob("*.jsonl"))

    def batch_states(self) -> list[Path]:
        return sorted((self.local / BATCHES_DIR).glob("*.json"))

    def retry_mark(self, shard: str) -> Path:
        """Present while a committed shard is being recommitted (`--retry-rejected`): the
        reasons asked again and the shard's report from before the recommit began."""
        return self.local / JOURNAL_DIR / f"{shard}.retry"

    def mark_retry(self, shard: str, reasons: frozenset[str]) -> ShardReport:
        """Start (or go on with) a recommit; returns the report it starts from."""
        path = self.retry_mark(shard)
        if path.exists():
            return ShardReport.model_validate(json.loads(path.read_text())["prior"])
        prior = self.read_commit(shard)
        if prior is None:
            raise RunError(f"shard {shard} has no commit record to recommit")
        mark = {"reasons": sorted(reasons), "prior": prior.model_dump(mode="json")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mark))
        os.replace(tmp, path)
        return prior

    def retries(self) -> dict[str, frozenset[str]]:
        """Recommits a stopped run left unfinished: shard id -> the reasons it asked."""
        found = {}
        for path in sorted((self.local / JOURNAL_DIR).glob("*.retry")):
            with contextlib.suppress(ValueError, KeyError, OSError):
                found[path.stem] = frozenset(json.loads(path.read_text())["reasons"])
        return found

    def resumable(self) -> set[str]:
        """Shards with resume state (a journal, batch ids): the unfinished ones, or ones a
        stopped run committed but did not clean up after. Bounded by the shards in flight."""
        return {p.stem for p in self.journals()} | {p.stem for p in self.batch_states()}

    def unwritten_cost(self) -> float:
        """What answers not yet in a committed shard cost: journaled answers, and finished
        batches read but not yet written (for the spend cap)."""
        cost = 0.0
        for path in self.journals():
            for line in path.read_bytes().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    cost += Usage.from_spent(json.loads(line)["spent"]).cost_usd
        return cost

    def forget(self, shard: str) -> None:
        """A committed shard's resume state is no longer needed: its journal; its batch ids
        move to `.batches/done/`, for the backend to delete the batches' files."""
        self.journal_path(shard).unlink(missing_ok=True)
        state = self.batch_state_path(shard)
        if state.exists():
            (state.parent / "done").mkdir(exist_ok=True)
            state.replace(state.parent / "done" / state.name)
        self.retry_mark(shard).unlink(missing_ok=True)

    def finished_batches(self) -> list[Path]:
        """Saved batch ids of committed shards, whose files the backend may delete (it
        removes each once done; the folder goes with the last)."""
        done = self.local / BATCHES_DIR / "done"
        found = sorted(done.glob("*.json"))
        if not found:
            with contextlib.suppress(OSError):
                done.rmdir()
        return found

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """One run at a time on this machine; an object store has no locks to take."""
        return corpus_lock(self.local)


def warm_writer() -> None:
    """pyarrow imports pandas at its first table (~1 s of CPU): a worker pays that at its
    start, not at its first row group, on the event loop, with requests in flight."""
    pa.Table.from_pylist([], schema=DATA_SCHEMA)


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


@dataclass
class Committed:
    """The committed set, from one pass over the commit records: the shard ids, what they
    add up to, the captioners that wrote them, and the shards `pick` chose. Per shard only
    its id is kept."""

    ids: set[str] = field(default_factory=set)
    totals: Totals = field(default_factory=Totals)
    captioners: dict[tuple[str, str, str], str] = field(default_factory=dict)  # -> a shard
    picked: set[str] = field(default_factory=set)

    @classmethod
    def read(
        cls,
        store: CorpusStore,
        manifest: Manifest | None,
        pick: Callable[[ShardReport], bool] | None = None,
    ) -> Committed:
        found = cls()
        for report in store.commits(manifest):
            found.add(report)
            if pick is not None and pick(report):
                found.picked.add(report.shard)
        return found

    def add(self, report: ShardReport, replaces: ShardReport | None = None) -> None:
        """A shard committed (or, with `replaces`, recommitted)."""
        if replaces is not None:
            self.totals.add(replaces, -1)
        self.ids.add(report.shard)
        self.totals.add(report)
        if report.backend:
            identity = (report.backend, report.model, report.prompt_version)
            self.captioners.setdefault(identity, report.shard)
