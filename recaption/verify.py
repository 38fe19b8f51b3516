"""`recaption verify CORPUS --input SHARDS`: prove the corpus contract, or say what breaks it.

Per shard: both files present, readable, with the contract's schema; the manifest's counts
match the files; no key twice; and, given the input, every input key exactly once in
`data/` or `rejected/` (each repeat of a key inside a shard as one `duplicate_key` row).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from recaption.journal import JOURNAL_DIR
from recaption.records import DATA_SCHEMA, REJECTED_SCHEMA, Reason
from recaption.sinks import DATA_DIR, REJECTED_DIR, load_manifest
from recaption.sources import list_shards, read_samples


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


def _keys(path: Path, schema, verdict: Verdict, columns: list[str]) -> list[dict] | None:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # any unreadable file is a finding, not a crash
        verdict.problems.append(f"{path}: unreadable: {exc}")
        return None
    if not table.schema.equals(schema, check_metadata=False):
        verdict.problems.append(f"{path}: schema differs from the contract")
    meta = (table.schema.metadata or {}).get(b"recaption.schema_version")
    expected = schema.metadata[b"recaption.schema_version"]
    if meta != expected:
        verdict.problems.append(
            f"{path}: schema_version {meta and meta.decode()!r}, expected {expected.decode()!r}"
        )
    return table.select([c for c in columns if c in table.column_names]).to_pylist()


def verify(corpus: Path, input_path: str | None = None, input_format: str = "auto") -> Verdict:
    verdict = Verdict()
    manifest = load_manifest(corpus)
    if manifest is None:
        verdict.problems.append(f"{corpus}: no manifest.json")
        return verdict
    data_ids = {p.stem for p in (corpus / DATA_DIR).glob("*.parquet")}
    rejected_ids = {p.stem for p in (corpus / REJECTED_DIR).glob("*.parquet")}
    for sid in sorted(data_ids ^ rejected_ids):
        verdict.problems.append(f"shard {sid}: has only one of data/ and rejected/")
    for sid in sorted(set(manifest.shards) - (data_ids & rejected_ids)):
        verdict.problems.append(f"shard {sid}: in the manifest but its files are missing")
    for sid in sorted((data_ids & rejected_ids) - set(manifest.shards)):
        verdict.notes.append(f"shard {sid}: files present but not in the manifest (unfinished)")
    for journal in sorted((corpus / JOURNAL_DIR).glob("*.jsonl")):
        verdict.notes.append(f"shard {journal.stem}: journal present (a run was interrupted)")

    expected: dict[str, Counter[str]] | None = None
    if input_path is not None:
        expected = {}
        for shard in list_shards(input_path, input_format):
            expected[shard.id] = Counter(sample.key for sample in read_samples(shard))
        for sid in sorted(set(expected) - set(manifest.shards)):
            verdict.problems.append(f"shard {sid}: in the input but not in the corpus")
        for sid in sorted(set(manifest.shards) - set(expected)):
            verdict.problems.append(f"shard {sid}: in the corpus but not in the input")

    for sid in sorted(set(manifest.shards) & data_ids & rejected_ids):
        verdict.shards += 1
        data = _keys(corpus / DATA_DIR / f"{sid}.parquet", DATA_SCHEMA, verdict, ["key"])
        rejected = _keys(
            corpus / REJECTED_DIR / f"{sid}.parquet", REJECTED_SCHEMA, verdict, ["key", "reason"]
        )
        if data is None or rejected is None:
            continue
        report = manifest.shards[sid]
        verdict.captioned += len(data)
        verdict.rejected += len(rejected)
        if (len(data), len(rejected)) != (report.captioned, report.rejected):
            verdict.problems.append(
                f"shard {sid}: files hold {len(data)} captioned + {len(rejected)} rejected, "
                f"the manifest says {report.captioned} + {report.rejected}"
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
