"""Corpus statistics in one streaming pass, in bounded memory, for `recaption report`.

What the recaptioning literature reports about a caption corpus: words per caption (alt
text against each new caption field), vocabulary size, the share of images with visible
text, the duplicate-caption rate across distinct images, rejection rates by reason, tokens
and cost per image, throughput over time, the most frequent objects and words.

Memory does not grow with the corpus: word and token counts are exact histograms over
small integers, vocabulary and top items are Apache DataSketches (HLL, frequent items),
and duplicates are measured on a sample of the caption-hash space (see `DuplicateSample`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import datasketches as ds
import pyarrow as pa

TEXT_FIELDS = ("alt_text", "caption", "caption_short")
STOPWORDS = frozenset(
    "a an the and or of in on at to with by for from is are was were be its it this that as "
    "into over under near their his her there which while who whose has have one two three "
    "some other each about than then also very not no".split()
)
_WORD = re.compile(r"[a-z][a-z'-]+")


class Histogram:
    """Exact counts of small integers (words per caption, tokens per image)."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def add(self, value: int) -> None:
        self.counts[value] += 1

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    @property
    def total(self) -> int:
        return sum(value * count for value, count in self.counts.items())

    def quantile(self, q: float) -> float:
        """The smallest value with at least q of the counts at or below it."""
        if not self.counts:
            return 0.0
        target, seen = q * self.n, 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= target:
                return float(value)
        return float(max(self.counts))

    def summary(self) -> dict[str, float]:
        n = self.n
        mean = self.total / n if n else 0.0
        return {
            "n": n,
            "mean": round(mean, 2),
            "median": self.quantile(0.5),
            "p5": self.quantile(0.05),
            "p95": self.quantile(0.95),
        }


class DuplicateSample:
    """The share of images whose caption is also another image's, measured on the captions
    whose hash falls under a threshold. The threshold halves whenever the sample is full,
    so every copy of a caption is in the sample or none is, and the rate on the sample
    estimates the corpus's without holding every caption."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self.threshold = 1 << 64
        self.groups: dict[int, set[bytes]] = {}  # caption hash -> image hashes (8 bytes)
        self.rows: Counter[int] = Counter()  # caption hash -> rows

    def add(self, caption: str, image_sha256: str) -> None:
        h = int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "big")
        if h >= self.threshold:
            return
        self.groups.setdefault(h, set()).add(bytes.fromhex(image_sha256[:16]))
        self.rows[h] += 1
        while len(self.groups) > self.capacity:
            self.threshold //= 2
            for key in [k for k in self.groups if k >= self.threshold]:
                del self.groups[key], self.rows[key]

    def summary(self) -> dict[str, float]:
        rows = sum(self.rows.values())
        repeated = sum(self.rows[h] for h, images in self.groups.items() if len(images) > 1)
        return {
            "rate": round(repeated / rows, 4) if rows else 0.0,
            "sampled_rows": rows,
            "sampled_share": round(self.threshold / (1 << 64), 6),
        }


class CorpusStats:
    """Fed the rows of data/ and record batches of rejected/; `summary()` is report.json's
    body."""

    def __init__(self, top: int = 30):
        self.top = top
        self.words = {field: Histogram() for field in TEXT_FIELDS}
        self.empty: Counter[str] = Counter()
        self.vocab = {field: ds.hll_sketch(14) for field in ("alt_text", "caption")}
        self.top_words = ds.frequent_strings_sketch(12)
        self.top_objects = ds.frequent_strings_sketch(12)
        self.duplicates = DuplicateSample()
        self.tokens = {"input": Histogram(), "output": Histogram()}
        self.cost_usd = 0.0
        self.with_text = 0
        self.captioned = 0
        self.bin_s = 1  # throughput bins: seconds, widened to minutes for long runs
        self.per_bin: Counter[int] = Counter()
        self.captioners: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.stages: Counter[str] = Counter()

    def add_data(self, rows: list[dict[str, Any]]) -> None:
        """Rows of data/, as dicts (the report converts each row group once)."""
        for row in rows:
            self.captioned += 1
            for field in TEXT_FIELDS:
                text = row.get(field) or ""
                self.words[field].add(len(text.split()))
                if not text.strip():
                    self.empty[field] += 1
            for field, sketch in self.vocab.items():
                for word in _WORD.findall((row.get(field) or "").lower()):
                    sketch.update(word)
                    if field == "caption" and word not in STOPWORDS:
                        self.top_words.update(word)
            for obj in row.get("objects") or []:
                self.top_objects.update(obj.strip().lower())
            if row.get("visible_text"):
                self.with_text += 1
            self.duplicates.add(row["caption"], row["image_sha256"])
            self.tokens["input"].add(row.get("input_tokens") or 0)
            self.tokens["output"].add(row.get("output_tokens") or 0)
            self.cost_usd += row.get("cost_usd") or 0.0
            created: datetime | None = row.get("created_at")
            if created is not None:
                self.per_bin[int(created.timestamp()) // self.bin_s] += 1
                if len(self.per_bin) > 20_000 and self.bin_s == 1:  # bounded: per minute now
                    self.bin_s = 60
                    minutes: Counter[int] = Counter()
                    for second, n in self.per_bin.items():
                        minutes[second // 60] += n
                    self.per_bin = minutes
            self.captioners[f"{row['backend']}/{row['model']}/{row['prompt_version']}"] += 1

    def add_rejected(self, batch: pa.RecordBatch) -> None:
        for reason, stage in zip(
            batch.column("reason").to_pylist(), batch.column("stage").to_pylist(), strict=True
        ):
            self.rejected[reason] += 1
            self.stages[stage] += 1

    def summary(self) -> dict[str, Any]:
        rejected = sum(self.rejected.values())
        samples = self.captioned + rejected
        words = {}
        for field, hist in self.words.items():
            words[field] = hist.summary() | {
                "empty_share": round(self.empty[field] / hist.n, 4) if hist.n else 0.0
            }
        top = ds.frequent_items_error_type.NO_FALSE_NEGATIVES
        return {
            "counts": {"samples": samples, "captioned": self.captioned, "rejected": rejected},
            "captioners": dict(self.captioners.most_common()),
            "words": words,
            "vocabulary": {f: round(s.get_estimate()) for f, s in self.vocab.items()},
            "visible_text_share": round(self.with_text / self.captioned, 4)
            if self.captioned
            else 0.0,
            "duplicate_captions": self.duplicates.summary(),
            "rejections": {
                "by_reason": dict(self.rejected.most_common()),
                "rate_by_reason": {
                    r: round(n / samples, 4) for r, n in self.rejected.most_common()
                },
                "by_stage": dict(self.stages.most_common()),
            },
            "usage": {
                "input_tokens": self.tokens["input"].total,
                "output_tokens": self.tokens["output"].total,
                "cost_usd": round(self.cost_usd, 6),
                "cost_per_1k_images": round(1000 * self.cost_usd / self.captioned, 4)
                if self.captioned
                else 0.0,
                "input_tokens_per_image": self.tokens["input"].summary(),
                "output_tokens_per_image": self.tokens["output"].summary(),
            },
            "throughput": {
                "bin_seconds": self.bin_s,
                "captions": {
                    datetime.fromtimestamp(b * self.bin_s, UTC).isoformat(timespec="seconds"): n
                    for b, n in sorted(self.per_bin.items())
                },
            },
            "top_objects": [
                [item, int(n)] for item, n, *_ in self.top_objects.get_frequent_items(top)
            ][: self.top],
            "top_words": [[item, int(n)] for item, n, *_ in self.top_words.get_frequent_items(top)][
                : self.top
            ],
        }
