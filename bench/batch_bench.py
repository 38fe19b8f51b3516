"""The Batch API at its queue quota: a job many times the enqueued-token quota, against the
loopback Batch API (tests/batch_api.py) with batches that take `--turnaround` seconds.

    python bench/batch_bench.py [--shards 20] [--per-shard 20] [--turnaround 5] [--workers 2]

The quota is two shards' tokens. Ideal wall time = job tokens / quota x turnaround (the
queue always full, nothing else taking time); the run is timed from its first batch to its
end (Ray's start-up is not the queue's). Prints wall / ideal (target <= 1.3) and the most
the queue held / the quota (target <= 1.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from openai_server import OpenAIServer  # noqa: E402

from recaption.config import load_config  # noqa: E402
from recaption.pipeline import run  # noqa: E402
from recaption.samples import write_samples  # noqa: E402

KEY = "fake-bench-key"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=20)
    p.add_argument("--turnaround", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeline", action="store_true", help="print each batch's times")
    args = p.parse_args()
    os.environ["OPENAI_API_KEY"] = KEY
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        shards, corpus = Path(tmp) / "shards", Path(tmp) / "corpus"
        write_samples(shards, shards=args.shards, per_shard=args.per_shard, seed=2)
        with OpenAIServer(api_key=KEY) as server:
            api = server.batch_api
            api.turnaround_s = args.turnaround
            cfg = lambda *extra: load_config(  # noqa: E731
                "pipelines/openai-batch.yaml",
                [
                    f"input.path={shards}",
                    f"output.path={corpus}",
                    f"captioner.base_url={server.url}",
                    "captioner.batch.poll_s=0.05",
                    "captioner.batch.poll_max_s=0.25",
                    f"ray.workers={args.workers}",
                    *extra,
                ],
            )
            # a shard's tokens, as the queue counts them: one probe shard, no quota
            probe = load_config(
                "pipelines/openai-batch.yaml",
                [
                    f"input.path={shards}",
                    f"output.path={Path(tmp) / 'probe'}",
                    f"captioner.base_url={server.url}",
                    "captioner.batch.poll_s=0.05",
                    "input.shards=0",
                ],
            )
            api.turnaround_s = 0.0
            run(probe, show_progress=False)
            shard_tokens = max(b["_tokens"] for b in api.batches.values())
            api.batches.clear()
            api.turnaround_s = args.turnaround
            api.enqueued_limit = quota = 2 * shard_tokens
            api.peak_enqueued = 0
            t0 = time.monotonic()
            summary = run(cfg(f"captioner.batch.max_enqueued_tokens={quota}"), show_progress=False)
            end = time.monotonic()
            batches = list(api.batches.values())
        assert len(summary.finished) == args.shards and not summary.failed, summary.lines()
        first = min(b["_created"] for b in batches)
        job = sum(b["_tokens"] for b in batches if b["_fate"] != "token_limit")
        refused = sum(b["_fate"] == "token_limit" for b in batches)
        ideal = job / quota * args.turnaround
        wall = end - first
        print(
            f"{args.shards} shards x {args.per_shard} images, {len(batches)} batches, "
            f"{job:,} input tokens through a queue of {quota:,} (2 shards), "
            f"batches take {args.turnaround:g}s"
        )
        print(f"run: {end - t0:.1f}s in all, {wall:.1f}s from its first batch to its end")
        print(f"ideal: {job:,} / {quota:,} x {args.turnaround:g}s = {ideal:.1f}s")
        print(f"wall / ideal: {wall / ideal:.2f} (target <= 1.3)")
        print(
            f"most enqueued / quota: {api.peak_enqueued / quota:.3f} (target <= 1.0); "
            f"batches refused for the quota: {refused}"
        )
        if args.timeline:  # when each batch was created and seen to end, from the first
            for b in sorted(batches, key=lambda b: b["_created"]):
                ended = b.get("_ended", end) - first
                print(f"  {b['_created'] - first:6.2f}s -> {ended:6.2f}s  {b['_tokens']:>7,}")


if __name__ == "__main__":
    main()
