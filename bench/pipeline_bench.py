"""Offline pipeline benchmark (issue: the spine). Prints figures measured side by side in one run.

    .venv/bin/python bench/pipeline_bench.py [--shards 8] [--per-shard 64] [--workers 2]

1. images/s of `recaption run` (analyzer, local Ray) over the sample shards, OCR gated and off,
   and OCR gated with ONNX Runtime's own thread pools (a thread per core in every worker)
   instead of the worker's CPUs;
2. the pipeline's non-captioner work per image (read + prepare + validate + write, from the
   workers' own timings) against a bare decode + resize + encode loop over the same images;
3. the workers' peak RSS with 1 shard against 8 shards (memory must not grow with the corpus).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from recaption.samples import write_samples

RECAPTION = str(Path(sys.executable).parent / "recaption")


def run_cli(
    shards: Path, corpus: Path, *overrides: str, env: dict[str, str] | None = None
) -> tuple[float, dict]:
    args = [
        RECAPTION,
        "run",
        "--pipeline",
        "pipelines/default.yaml",
        "--input",
        str(shards),
        "--output",
        str(corpus),
        "--quiet",
    ]
    for o in overrides:
        args += ["--set", o]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=env)
    manifest = json.loads((corpus / "manifest.json").read_text())
    # the per-shard reports: one commit record each
    manifest["shards"] = {p.stem: json.loads(p.read_text()) for p in (corpus / "commits").iterdir()}
    return time.perf_counter() - t0, manifest


def bare_decode_resize_encode(shards: Path, max_side: int = 512) -> tuple[int, float]:
    """What any pipeline must do at least: decode, resize, re-encode each image."""
    n, seconds = 0, 0.0
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                data = tar.extractfile(member).read()
                t0 = time.perf_counter()
                im = Image.open(io.BytesIO(data))
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                im.convert("RGB").save(buf, "JPEG", quality=90)
                seconds += time.perf_counter() - t0
                n += 1
    return n, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recaption-bench-"))
    try:
        shards = work / "shards"
        write_samples(shards, shards=args.shards, per_shard=args.per_shard, seed=0)
        one = work / "one"
        one.mkdir()
        for name in ("00000.tar", "00000.parquet"):
            shutil.copy(shards / name, one / name)

        print(f"# {args.shards} shards x {args.per_shard} URLs, ray.workers={args.workers}")
        # OMP_NUM_THREADS set but empty: Ray leaves it alone and the analyzer does not size
        # ONNX Runtime's pools, which then take a thread per core (the old behaviour)
        ort_default = os.environ | {"OMP_NUM_THREADS": ""}
        runs = (
            ("ocr=auto", [], None),
            ("ocr=auto, ORT's own threads", [], ort_default),
            ("ocr=never", ["captioner.ocr=never"], None),
        )
        for i, (label, extra, env) in enumerate(runs):
            wall, manifest = run_cli(
                shards, work / f"corpus-{i}", f"ray.workers={args.workers}", *extra, env=env
            )
            samples = manifest["totals"]["samples"]
            shard_reports = manifest["shards"].values()
            busy = sum(r["timings"]["total_s"] for r in shard_reports)
            print(
                f"pipeline {label:28s}: {samples / wall:6.1f} images/s wall (incl. Ray start), "
                f"{samples / busy * args.workers:6.1f} images/s in workers"
            )
        # One worker alone on the machine, so its timings and the bare loop compete for nothing.
        _, m1 = run_cli(one, work / "rss1", "ray.workers=1", "captioner.ocr=never")
        _, m8 = run_cli(shards, work / "rss8", "ray.workers=1", "captioner.ocr=never")
        n, bare = bare_decode_resize_encode(shards)
        reports = list(m8["shards"].values())
        prepared = sum(r["captioned"] for r in reports)  # images that went through every stage
        stage = {k: sum(r["timings"].get(k, 0.0) for r in reports) for k in reports[0]["timings"]}
        # the stages' own seconds: a shard's total_s is its wall time, and a worker drains one
        # shard while it reads the next, so totals overlap (total - caption over-counts)
        non_caption = sum(
            stage.get(k, 0.0) for k in ("read_s", "prepare_s", "validate_s", "write_s")
        )
        per_pipeline, per_bare = non_caption / prepared, bare / n
        print(
            "stages (1 worker)    : "
            + ", ".join(f"{k} {v / prepared * 1000:.2f}" for k, v in stage.items())
            + " ms/image"
        )
        print(
            f"non-captioner work   : {per_pipeline * 1000:6.2f} ms/image (read+prepare+validate+write)"
        )
        print(f"bare decode+resize+enc: {per_bare * 1000:6.2f} ms/image")
        print(f"ratio                : {per_pipeline / per_bare:6.2f}x   (target <= 1.5x)")
        print(f"duplicate search     : {stage.get('dedup_s', 0.0) / prepared * 1000:6.2f} ms/image")
        print(f"analyzer (ocr=never) : {stage['caption_s'] / prepared * 1000:6.2f} ms/image")
        rss1 = max(r["peak_rss_mb"] for r in m1["shards"].values())
        rss8 = max(r["peak_rss_mb"] for r in reports)
        print(
            f"worker peak RSS      : 1 shard {rss1:.0f} MB, {len(reports)} shards {rss8:.0f} MB, "
            f"ratio {rss8 / rss1:.2f}x   (target <= 1.2x)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
