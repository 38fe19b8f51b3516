"""`recaption verify CORPUS --input SHARDS`: prove the corpus contract, or say what breaks it.

Per shard: both files present, readable, with the contract's schema; the manifest's counts
match the files; no key twice; and, given the input, every input key exactly once in
`data/` or `rejected/` (each repeat of a key inside a shard as one `duplicate_key` row).
The input is read as the run that made the corpus read it (format, columns, and a trial
run's `--shards/--limit/--fraction` selection, from the manifest's config).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from recaption.config import InputConfig
from recaption.corpus import DATA_DIR, REJECTED_DIR, CorpusStore
from recaption.records import DATA_SCHEMAS, REJECTED_SCHEMA, Manifest, Reason
from recaption.sources import Shard, input_shards, read_samples

REJECTED_SCHEMAS = {"1": REJECTED_SCHEMA, "2": REJECTED_SCHEMA}  # unchanged by schema 2


@dataclass
class Verdict:
    shards: int = 0
    captioned: int = 0
    rejected: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _keys(
    fs: pafs.FileSystem,
    path: str,
    schemas: dict[str, pa.Schema],
    verdict: Verdict,
    columns: list[str],
) -> list[dict] | None:
    """The file's `columns`; a schema other than one of `schemas` (by version) is a finding."""
    try:
        table = pq.read_table(path, filesystem=fs)
    except Exception as exc:  # any unreadable file is a finding, not a crash
        verdict.problems.append(f"{path}: unreadable: {exc}")
        return None
    meta = (table.schema.metadata or {}).get(b"recaption.schema_version", b"").decode()
    if meta not in schemas:
        verdict.problems.append(
            f"{path}: schema_version {meta or None!r}, expected one of {sorted(schemas)}"
        )
    elif not table.schema.equals(schemas[meta], check_metadata=False):
        verdict.problems.append(f"{path}: schema differs from the contract")
    return table.select([c for c in columns if c in table.column_names]).to_pylist()


def _input(manifest: Manifest, path: str, fmt: str) -> list[Shard]:
    """The input shards as the corpus's run selected them."""
    recorded = {**manifest.config.get("input", {}), "path": path}
    if fmt != "auto":
        recorded["format"] = fmt
    try:
        cfg = InputConfig.model_validate(recorded)
    except ValidationError:  # a manifest from elsewhere: read the input whole
        cfg = InputConfig(path=path, format=fmt)
    return input_shards(cfg)


def verify(
    corpus: str | Path, input_path: str | None = None, input_format: str = "auto"
) -> Verdict:
    verdict = Verdict()
    store = CorpusStore(corpus)
    manifest = store.load_manifest()
    if manifest is None:
        verdict.problems.append(f"{corpus}: no manifest.json")
        return verdict
    # per committed shard, its counts (from its commit record)
    counts = {r.shard: (r.captioned, r.rejected) for r in store.commits(manifest)}
    data_files, rejected_files = store.shard_files(DATA_DIR), store.shard_files(REJECTED_DIR)
    data_ids, rejected_ids = set(data_files), set(rejected_files)
    for sid in sorted(data_ids ^ rejected_ids):
        verdict.problems.append(f"shard {sid}: has only one of data/ and rejected/")
    for sid in sorted(set(counts) - (data_ids & rejected_ids)):
        verdict.problems.append(f"shard {sid}: committed but its files are missing")
    for sid in sorted((data_ids & rejected_ids) - set(counts)):
        verdict.notes.append(f"shard {sid}: files present but not committed (unfinished)")
    for journal in store.journals():
        verdict.notes.append(f"shard {journal.stem}: journal present (a run was interrupted)")

    expected: dict[str, Counter[str]] | None = None
    if input_path is not None:
        expected = {}
        for shard in _input(manifest, input_path, input_format):
            expected[shard.id] = Counter(sample.key for sample in read_samples(shard))
        for sid in sorted(set(expected) - set(counts)):
            verdict.problems.append(f"shard {sid}: in the input but not in the corpus")
        for sid in sorted(set(counts) - set(expected)):
            verdict.problems.append(f"shard {sid}: in the corpus but not in the input")

    for sid in sorted(set(counts) & data_ids & rejected_ids):
        verdict.shards += 1
        fs = store.arrow_fs
        data = _keys(fs, data_files[sid], DATA_SCHEMAS, verdict, ["key"])
        rejected = _keys(fs, rejected_files[sid], REJECTED_SCHEMAS, verdict, ["key", "reason"])
        if data is None or rejected is None:
            continue
        verdict.captioned += len(data)
        verdict.rejected += len(rejected)
        if (len(data), len(rejected)) != counts[sid]:
            verdict.problems.append(
                f"shard {sid}: files hold {len(data)} captioned + {len(rejected)} rejected, "
                f"the manifest says {counts[sid][0]} + {counts[sid][1]} (its commit record)"
            )
        first = Counter(r["key"] for r in data)
        first.update(r["key"] for r in rejected if r["reason"] != Reason.duplicate_key)
        repeats = Counter(r["key"] for r in rejected if r["reason"] == Reason.duplicate_key)
        twice = sorted(k for k, n in first.items() if n > 1)
        if twice:
            verdict.problems.append(
                f"shard {sid}: {len(twice)} keys appear twice, e.g. {twice[:3]}"
            )
        if expected is None or sid not in expected:
            continue
        inputs = expected[sid]
        missing = sorted(set(inputs) - set(first))
        extra = sorted(set(first) - set(inputs))
        if missing:
            verdict.problems.append(
                f"shard {sid}: {len(missing)} input keys in neither data/ nor rejected/, "
                f"e.g. {missing[:3]}"
            )
        if extra:
            verdict.problems.append(
                f"shard {sid}: {len(extra)} keys not in the input, e.g. {extra[:3]}"
            )
        wrong = sorted(k for k in set(inputs) | set(repeats) if repeats[k] != inputs[k] - 1)
        if wrong:
            verdict.problems.append(
                f"shard {sid}: duplicate_key rows do not match the repeats in the input for "
                f"{len(wrong)} keys, e.g. {wrong[:3]}"
            )
    return verdict
