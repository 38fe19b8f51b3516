"""What exactly-once costs, and what a kill costs.

journal   captions/s with and without the journal (`output.journal`), against the loopback
          test server at a quota high enough not to bind (no rate limit, 20 ms latency), one
          shard at a time in this process, runs interleaved; the ratio of medians (target:
          the journal < 3% slower)
kills     `kill -9` of the `recaption run` process at random moments during a run against
          the test server (2 workers x limits.concurrency 8, 150 ms latency), re-run, N
          times; then a final run. Repeated paid calls per kill: successful requests for an
          image already answered (bound: what was in flight, 2 x 8), and `recaption verify`.

    python bench/resume_bench.py [--kills 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kill_run import kill_after, run_argv  # noqa: E402
from openai_server import OpenAIServer, repeated_successes  # noqa: E402

from recaption.captioners import make_captioner  # noqa: E402
from recaption.config import load_config  # noqa: E402
from recaption.samples import write_samples  # noqa: E402
from recaption.shard import process_shard  # noqa: E402
from recaption.sources import list_shards  # noqa: E402
from recaption.verify import verify  # noqa: E402


def journal_overhead(workdir: Path, repeats: int) -> dict:
    shards = workdir / "shards-journal"
    write_samples(shards, shards=1, per_shard=300, seed=3)
    shard = list_shards(str(shards))[0]
    rates: dict[bool, list[float]] = {True: [], False: []}
    with OpenAIServer(latency_ms=20) as server:
        for i in range(repeats):
            for journal in (True, False):
                corpus = workdir / f"corpus-journal-{journal}-{i}"
                cfg = load_config(
                    ROOT / "pipelines/openai.yaml",
                    [
                        f"captioner.base_url={server.url}",
                        f"output.path={corpus}",
                        f"output.journal={str(journal).lower()}",
                        "limits.concurrency=32",
                    ],
                )
                captioner = make_captioner(cfg)
                t0 = time.perf_counter()
                report = process_shard(shard, cfg, captioner)
                rates[journal].append(report.captioned / (time.perf_counter() - t0))
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    return {"with_journal": on, "without": off, "slowdown": 1 - on / off}


def kills(workdir: Path, n: int) -> dict:
    shards = workdir / "shards-kill"
    write_samples(shards, shards=4, per_shard=150, seed=5)
    corpus = workdir / "corpus-kill"
    rng = random.Random(1)
    killed = 0
    with OpenAIServer(latency_ms=150) as server:
        argv = run_argv(
            ROOT / "pipelines/openai.yaml",
            [
                f"input.path={shards}",
                f"output.path={corpus}",
                f"captioner.base_url={server.url}",
                "limits.concurrency=8",
                "ray.workers=2",
            ],
        )
        while killed < n and kill_after(argv, server, rng.randint(5, 30)):
            killed += 1
        final = subprocess.run(argv, capture_output=True, text=True)
        events = list(server.events)
    total = repeated_successes(events)
    verdict = verify(corpus, str(shards))
    totals = json.loads((corpus / "manifest.json").read_text())["totals"]
    return {
        "captioned": totals["captioned"],
        "rejected_by_reason": totals["rejected_by_reason"],
        "kills": killed,
        "repeated_paid_calls": total,
        "per_kill": total / max(1, killed),
        "bound_per_kill": 2 * 8,
        "requests": len(events),
        "final_exit": final.returncode,
        "verify_ok": verdict.ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        journal = journal_overhead(Path(tmp), args.repeats)
        print(
            f"journal: {journal['with_journal']:.1f} captions/s with, {journal['without']:.1f} "
            f"without: {journal['slowdown']:+.1%} slower (median of {args.repeats} each)"
        )
        killed = kills(Path(tmp), args.kills)
        print(
            f"kills: {killed['kills']} kill -9s, {killed['repeated_paid_calls']} repeated paid "
            f"calls ({killed['per_kill']:.1f} per kill, bound {killed['bound_per_kill']}), "
            f"{killed['requests']} requests for {killed['captioned']} captions "
            f"(rejected: {killed['rejected_by_reason']}); final run exit {killed['final_exit']}, "
            f"verify {'OK' if killed['verify_ok'] else 'FAILED'}"
        )


if __name__ == "__main__":
    main()
