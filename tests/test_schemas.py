from pathlib import Path

from recaption.records import DATA_SCHEMA, REJECTED_SCHEMA, json_schemas

# The corpus contract in DESIGN.md: downstream trainers depend on these names.
DATA_COLUMNS = [
    "key",
    "shard",
    "url",
    "alt_text",
    "image",
    "image_sha256",
    "width",
    "height",
    "caption",
    "caption_short",
    "objects",
    "visible_text",
    "style",
    "model",
    "backend",
    "prompt_version",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "attempts",
    "latency_ms",
    "created_at",
    # added in the second round (dedup)
    "duplicate_of",
    "duplicate_kind",
    "image_phash",
]
REJECTED_COLUMNS = ["key", "shard", "url", "stage", "reason", "detail", "attempts"]


def test_parquet_columns_match_the_contract():
    assert DATA_SCHEMA.names == DATA_COLUMNS
    assert REJECTED_SCHEMA.names == REJECTED_COLUMNS
    assert DATA_SCHEMA.metadata[b"recaption.schema_version"]


def test_schema_files_are_in_sync_with_the_models():
    folder = Path(__file__).parent.parent / "schemas"
    expected = json_schemas()
    on_disk = {p.name: p.read_text() for p in folder.glob("*.json")}
    assert on_disk == expected, "schemas/ is stale: run `make schemas`"
