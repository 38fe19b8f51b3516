"""`recaption download URLS DIR`: URL lists to web shards, with img2dataset underneath.

URLS is a .txt file of URLs (one per line), or a table (.parquet, .csv, .tsv, .jsonl,
.json, optionally .gz) with a URL column and an alt-text column. DIR gets img2dataset's
`webdataset` output, which `recaption run` reads as it is: NNNNN.tar, NNNNN.parquet (every
URL of the shard with its download status) and NNNNN_stats.json. A URL that failed to
download stays in the shard parquet with its status, and the run accounts for it as a
`rejected/` row with reason `download_failed`, so the corpus manifest matches the URL list.

Settings a recaption job wants: webdataset output, the alt text kept as `caption` (its
`.txt` member), sha256 of each image, no resizing unless asked (the pipeline prepares
images itself), re-runs that skip finished shards (img2dataset's incremental mode).
img2dataset pins old webdataset/albumentations/pandas, so it is an optional extra:
`pip install 'recaption[download]'`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")


def input_format(urls: Path) -> str:
    """img2dataset's `input_format` from the file name: urls.txt, laion.parquet, x.csv.gz."""
    name = urls.name.lower()
    gz = name.endswith(".gz")
    stem = name.removesuffix(".gz")
    ext = stem.rsplit(".", 1)[-1] if "." in stem else ""
    if ext not in FORMATS:
        raise ValueError(
            f"{urls}: cannot tell the format from the name; use .txt (one URL a line), "
            ".parquet, .csv, .tsv, .json or .jsonl (optionally .gz)"
        )
    if ext == "parquet" and gz:
        raise ValueError(f"{urls}: a parquet file is compressed inside; drop the .gz")
    return f"{ext}.gz" if gz else ext


def download(
    urls: Path,
    out: Path,
    url_col: str = "url",
    caption_col: str | None = "caption",
    image_size: int | None = None,
    processes: int = 1,
    threads: int = 32,
    per_shard: int = 10_000,
    timeout_s: int = 10,
    retries: int = 0,
    distributor: str = "multiprocessing",
) -> dict[str, Any]:
    """Run img2dataset; return its counts summed over the shards' stats files."""
    if not urls.is_file():
        raise FileNotFoundError(f"no URL list at {urls}")
    fmt = input_format(urls)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
    try:
        from img2dataset import download as img2dataset_download
    except ImportError:
        raise ImportError(
            "recaption download needs img2dataset: pip install 'recaption[download]'"
        ) from None
    out.mkdir(parents=True, exist_ok=True)
    img2dataset_download(
        url_list=str(urls),
        output_folder=str(out),
        input_format=fmt,
        output_format="webdataset",
        url_col=url_col,
        caption_col=None if fmt.startswith("txt") else caption_col,
        image_size=image_size or 256,
        resize_mode="keep_ratio" if image_size else "no",
        resize_only_if_bigger=True,
        skip_reencode=True,  # keep the original bytes where no resize is asked for
        encode_format="jpg",
        compute_hash="sha256",
        processes_count=processes,
        thread_count=threads,
        number_sample_per_shard=per_shard,
        timeout=timeout_s,
        retries=retries,
        distributor=distributor,
        enable_wandb=False,
        incremental_mode="incremental",
    )
    return summarize(out)


def summarize(out: Path) -> dict[str, Any]:
    """img2dataset's per-shard stats, summed: what was asked, fetched and why the rest failed."""
    totals: dict[str, Any] = {"shards": 0, "count": 0, "successes": 0, "failed": {}}
    for path in sorted(out.glob("*_stats.json")):
        stats = json.loads(path.read_text())
        totals["shards"] += 1
        totals["count"] += stats.get("count", 0)
        totals["successes"] += stats.get("successes", 0)
        for kind in ("failed_to_download", "failed_to_resize"):
            if stats.get(kind):
                totals["failed"][kind] = totals["failed"].get(kind, 0) + stats[kind]
        for status, n in (stats.get("status_dict") or {}).items():
            if status != "success":
                errors = totals.setdefault("errors", {})
                errors[status] = errors.get(status, 0) + n
    return totals
