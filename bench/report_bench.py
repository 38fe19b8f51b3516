"""`recaption report` on corpora of growing size: seconds and peak memory.

Synthetic corpora (each row a 2 KB JPEG, a ~100-word caption from a 5,000-word vocabulary,
alt text, objects, 1% repeated captions) of N and 10N rows are written once, then the
report is run on each in a fresh process. Printed: rows/s, peak RSS, and the RSS ratio
between the two sizes (bounded memory: close to 1, far from 10).

    python bench/report_bench.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from recaption.records import CaptionRecord, Manifest, arrow_schema  # noqa: E402

MEASURE = """
import json, resource, sys, time
from pathlib import Path
from recaption.report import write_report
t0 = time.perf_counter()
write_report(Path(sys.argv[1]), sample=200)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(root: Path, rows: int, per_shard: int = 10_000, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 200)).save(buf, "JPEG")
    image = buf.getvalue()
    schema = arrow_schema(CaptionRecord)
    (root / "data").mkdir(parents=True)
    (root / "rejected").mkdir()
    now = datetime.now(UTC)
    for shard in range(0, rows, per_shard):
        batch = []
        for i in range(shard, min(rows, shard + per_shard)):
            words = rng.choices(vocab, k=100) if rng.random() > 0.01 else ["stock"] * 100
            batch.append(
                {
                    "key": f"{i:09d}",
                    "shard": f"{shard // per_shard:05d}",
                    "url": None,
                    "alt_text": " ".join(rng.choices(vocab, k=5)),
                    "image": image,
                    "image_sha256": f"{i:064x}",
                    "width": 64,
                    "height": 48,
                    "caption": " ".join(words) + ".",
                    "caption_short": "A picture.",
                    "objects": rng.choices(vocab[:200], k=3),
                    "visible_text": [],
                    "style": "photograph",
                    "model": "m",
                    "backend": "b",
                    "prompt_version": "p",
                    "input_tokens": 850,
                    "output_tokens": 230,
                    "cost_usd": 0.0036,
                    "attempts": 1,
                    "latency_ms": 900.0,
                    "created_at": now,
                }
            )
        table = pa.Table.from_pylist(batch, schema=schema)
        sid = f"{shard // per_shard:05d}"
        pq.write_table(table, root / "data" / f"{sid}.parquet", row_group_size=256)
        pq.write_table(
            pa.table(
                {
                    "key": pa.array([], pa.string()),
                    "reason": pa.array([], pa.string()),
                    "stage": pa.array([], pa.string()),
                }
            ),
            root / "rejected" / f"{sid}.parquet",
        )
    manifest = Manifest(recaption_version="bench", created_at=now, updated_at=now, config={})
    (root / "manifest.json").write_text(manifest.model_dump_json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="report-bench-"))
    results = {}
    for rows in (args.rows, 10 * args.rows):
        corpus = work / f"c{rows}"
        t0 = time.perf_counter()
        write_corpus(corpus, rows)
        made = time.perf_counter() - t0
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(corpus)], capture_output=True, text=True, check=True
        )
        results[rows] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[rows]
        print(
            f"{rows:>8} rows (written in {made:.0f}s): report {r['seconds']:.1f}s, "
            f"{rows / r['seconds']:,.0f} rows/s, peak RSS {r['rss_mb']:.0f} MB"
        )
    small, big = results[args.rows], results[10 * args.rows]
    print(
        f"10x the rows: {big['seconds'] / small['seconds']:.1f}x the time, "
        f"{big['rss_mb'] / small['rss_mb']:.2f}x the peak memory"
    )


if __name__ == "__main__":
    main()
