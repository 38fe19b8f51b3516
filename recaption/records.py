"""The data contracts: the caption a captioner fills, the rows of the corpus, the manifest.

These pydantic models are the single source of truth. The Parquet schemas are derived
from them (`arrow_schema`) and `schemas/*.json` is generated from them (`write_json_schemas`).
"""

from __future__ import annotations

import json
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

# Bump when a column is added, removed or changes meaning; stored in each Parquet file's metadata.
SCHEMA_VERSION = "2"  # 2: duplicate_of, duplicate_kind, image_phash


class Stage(StrEnum):
    read = "read"
    decode = "decode"
    caption = "caption"
    validate = "validate"


class Reason(StrEnum):
    """Why a sample is in `rejected/`. Short, stable, groupable."""

    # read: the shard itself
    missing_image = "missing_image"  # metadata (.json/.txt) without an image member
    truncated_member = "truncated_member"  # the tar ends inside this sample
    missing_from_tar = (
        "missing_from_tar"  # listed as downloaded in the shard parquet, not in the tar
    )
    duplicate_key = "duplicate_key"  # a repeat of a key already seen in this shard
    download_failed = "download_failed"  # img2dataset recorded a failed download
    # decode: the image bytes
    empty_file = "empty_file"
    not_an_image = "not_an_image"
    truncated_image = "truncated_image"
    too_many_pixels = "too_many_pixels"
    decode_error = "decode_error"
    # caption: the backend
    caption_error = "caption_error"  # a backend error of no other kind
    refusal = "refusal"  # the model declined, after captioner.refusal_retries retries
    bad_request = "bad_request"  # HTTP 400: the server will not take this image
    forbidden = "forbidden"  # HTTP 403
    server_error = "server_error"  # 5xx, 408, 409, timeouts, dropped connections: out of retries
    rate_limited = "rate_limited"  # still 429 after every retry
    batch_failed = "batch_failed"  # openai-batch: expired, failed or missing in every batch tried
    # validate: the caption
    schema_invalid = "schema_invalid"
    empty = "empty"
    too_short = "too_short"
    too_long = "too_long"
    repetition = "repetition"
    truncated_output = "truncated_output"
    wrong_language = "wrong_language"
    # caption, with dedup.mode=reject: the picture is already in the corpus under another key
    duplicate_image = "duplicate_image"


@dataclass
class Usage:
    """What one image's attempts cost, and what came back to each. One value for every
    carrier: a caption, a failure, a journal line, a shard."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0  # HTTP attempts (or model calls), retries included
    outcomes: Counter[str] = field(default_factory=Counter)  # requests and what came back

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd
        self.attempts += other.attempts
        self.outcomes.update(other.outcomes)

    def spent(self) -> dict[str, float]:
        """Tokens and cost, as the journal keeps them."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
        }

    @classmethod
    def from_spent(cls, spent: dict[str, float]) -> Usage:
        cost = spent.get("cost_usd", spent.get("cost_micro_usd", 0) / 1e6)  # older journals
        return cls(int(spent.get("input_tokens", 0)), int(spent.get("output_tokens", 0)), cost)


class Metered:
    """Read access to `usage` under the names rows and reports use."""

    usage: Usage

    @property
    def input_tokens(self) -> int:
        return self.usage.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.usage.output_tokens

    @property
    def cost_usd(self) -> float:
        return self.usage.cost_usd

    @property
    def attempts(self) -> int:
        return self.usage.attempts


class Caption(BaseModel):
    """What a captioner (pixel analyzer or VLM) must produce for one image.

    This is also the structured-output schema sent to VLMs, so every field is required
    and descriptions are written for the model.
    """

    model_config = ConfigDict(extra="forbid")

    caption: str = Field(
        description="A dense, factual description of the image in about 100 words: subjects, "
        "their attributes, positions and relations, setting, colours, lighting, style, any text."
    )
    caption_short: str = Field(description="One sentence summarising the image.")
    objects: list[str] = Field(description="The distinct visible objects, short noun phrases.")
    visible_text: list[str] = Field(
        description="Legible text in the image, verbatim; empty if none."
    )
    style: str = Field(description="The medium or style: photograph, illustration, graphic, ...")


class CaptionRecord(BaseModel):
    """One row of `data/NNNNN.parquet`."""

    key: str
    shard: str
    url: str | None
    alt_text: str | None
    image: bytes | None = Field(
        description="The prepared image (re-encoded), if output.store_images"
    )
    image_sha256: str = Field(description="sha256 of the prepared image bytes")
    width: int
    height: int
    caption: str
    caption_short: str
    objects: list[str]
    visible_text: list[str]
    style: str
    model: str
    backend: str
    prompt_version: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    attempts: int
    latency_ms: float
    created_at: datetime
    # dedup.mode=reuse: the first occurrence's key and caption, at no cost (exact: the same
    # prepared bytes; near: a resized, re-encoded or slightly cropped copy). None: captioned
    duplicate_of: str | None = None
    duplicate_kind: str | None = None  # exact | near
    # the perceptual hashes near duplicates are found by, "phash:dhash" in hex (None: an image
    # too flat for them, matched exactly only); kept so later runs (dedup.against) match it
    image_phash: str | None = None


class Rejection(BaseModel):
    """One row of `rejected/NNNNN.parquet`: an input sample that is not in `data/`, and why."""

    key: str
    shard: str
    url: str | None
    stage: Stage
    reason: Reason
    detail: str
    attempts: int = 0


class ShardReport(BaseModel):
    """What one input shard became: its commit record, `commits/NNNNN.json`, written once
    both its files are in place."""

    shard: str
    source: str
    samples: int
    captioned: int
    rejected: int
    rejected_by_reason: dict[str, int] = {}
    truncated: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0  # every paid attempt, rejected images' included
    requests: int = 0  # API requests sent, retries included
    request_outcomes: dict[str, int] = {}  # rate_limited, http_503, refusal, ... counts
    resumed: int = 0  # rows taken from the journal of an interrupted run: no new call
    duplicates: dict[str, int] = {}  # exact / near duplicates, not sent to the captioner
    saved_usd: float = 0.0  # what their first occurrences cost: the captions not paid twice
    backend: str = ""  # the captioner that wrote this shard (rows carry theirs too)
    model: str = ""
    prompt_version: str = ""
    timings: dict[str, float] = {}
    peak_rss_mb: float = 0.0
    worker: str = ""
    finished_at: datetime


class Manifest(BaseModel):
    """`manifest.json`: how the corpus was made and what is in it, in sum. Rewritten every few
    seconds while a run commits shards and at its end; the per-shard reports are the commit
    records in `commit_records`."""

    schema_version: str = SCHEMA_VERSION
    recaption_version: str
    created_at: datetime
    updated_at: datetime
    config: dict[str, typing.Any]
    versions: dict[str, str] = {}
    commit_records: str = "commits/"  # one ShardReport per committed shard, NNNNN.json
    # corpora written before commit records listed every shard's report here; read, never
    # written (a run moves them to commit records)
    shards: dict[str, ShardReport] = {}
    totals: dict[str, typing.Any] = {}


@dataclass
class Totals:
    """What committed shards add up to, kept as they commit (O(1) per shard)."""

    shards: int = 0
    samples: int = 0
    captioned: int = 0
    rejected: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    truncated_shards: set[str] = field(default_factory=set)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    requests: int = 0
    request_outcomes: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    saved_usd: float = 0.0

    def add(self, report: ShardReport, sign: int = 1) -> None:
        """Count a shard in (`sign=-1`: out, when a recommit replaces its report)."""
        self.shards += sign
        self.samples += sign * report.samples
        self.captioned += sign * report.captioned
        self.rejected += sign * report.rejected
        self.rejected_by_reason.update({k: sign * n for k, n in report.rejected_by_reason.items()})
        if report.truncated:
            (self.truncated_shards.add if sign > 0 else self.truncated_shards.discard)(report.shard)
        self.input_tokens += sign * report.input_tokens
        self.output_tokens += sign * report.output_tokens
        self.cost_usd += sign * report.cost_usd
        self.requests += sign * report.requests
        self.request_outcomes.update({k: sign * n for k, n in report.request_outcomes.items()})
        self.duplicates.update({k: sign * n for k, n in report.duplicates.items()})
        self.saved_usd += sign * report.saved_usd

    def as_dict(self) -> dict[str, typing.Any]:
        return {
            "shards": self.shards,
            "samples": self.samples,
            "captioned": self.captioned,
            "rejected": self.rejected,
            "rejected_by_reason": {k: n for k, n in sorted(self.rejected_by_reason.items()) if n},
            "truncated_shards": sorted(self.truncated_shards),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "requests": self.requests,
            "request_outcomes": {k: n for k, n in sorted(self.request_outcomes.items()) if n},
            "duplicates": {k: n for k, n in sorted(self.duplicates.items()) if n},
            "saved_usd": round(self.saved_usd, 6),
        }


# --- Parquet schemas derived from the models ---------------------------------------------

_ARROW_TYPES: dict[typing.Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    bytes: pa.binary(),
    datetime: pa.timestamp("us", tz="UTC"),
    Stage: pa.string(),
    Reason: pa.string(),
}


def _arrow_type(annotation: typing.Any) -> tuple[pa.DataType, bool]:
    """(arrow type, nullable) for a field annotation."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _arrow_type(inner[0])[0], True
    if typing.get_origin(annotation) is list:
        return pa.list_(_arrow_type(args[0])[0]), False
    return _ARROW_TYPES[annotation], False


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    fields = []
    for name, info in model.model_fields.items():
        dtype, nullable = _arrow_type(info.annotation)
        fields.append(pa.field(name, dtype, nullable=nullable))
    return pa.schema(fields, metadata={"recaption.schema_version": SCHEMA_VERSION})


DATA_SCHEMA = arrow_schema(CaptionRecord)
# data files of schema 1 (before dedup) are read as they are: the same less the new columns
_DEDUP_COLUMNS = ("duplicate_of", "duplicate_kind", "image_phash")
DATA_SCHEMAS = {
    "2": DATA_SCHEMA,
    "1": pa.schema([f for f in DATA_SCHEMA if f.name not in _DEDUP_COLUMNS]),
}
REJECTED_SCHEMA = arrow_schema(Rejection)


# --- JSON Schema files (schemas/*.json) ----------------------------------------------------

JSON_SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "caption": Caption,
    "caption_record": CaptionRecord,
    "rejection": Rejection,
    "manifest": Manifest,
    "shard_report": ShardReport,  # a commit record, commits/NNNNN.json
}


def json_schemas() -> dict[str, str]:
    """File name -> JSON text, exactly as written to schemas/."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True)
        + "\n"
        for name, model in JSON_SCHEMA_MODELS.items()
    }


def write_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
