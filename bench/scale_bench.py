"""Scale: what a commit costs as the corpus grows, what opening a big corpus costs, and what
the driver spends per shard over thousands of shards. Ratios measured side by side.

    python bench/scale_bench.py [--sizes 1000,10000,100000] [--shards 5000] [--workers 2]

1. commit cost at N committed shards: one commit record (what a commit writes now) and,
   for comparison, the whole-manifest rewrite of the layout before commit records;
2. opening an N-shard corpus (`Committed.read`, the one pass every reader makes): seconds,
   and peak RSS in a fresh process;
3. the driver on a real local Ray, the analyzer on 1-pixel images: driver CPU-ms per shard,
   and its RSS after the first tenth of the shards vs at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recaption.corpus import COMMITS_DIR, CorpusStore
from recaption.records import Manifest, ShardReport


def report(i: int) -> ShardReport:
    """A commit record as a 10,000-image shard against the OpenAI API writes it."""
    return ShardReport(
        shard=f"{i:05d}",
        source=f"s3://bucket/laion/{i:05d}.tar",
        samples=10_000,
        captioned=9_420,
        rejected=580,
        rejected_by_reason={
            "download_failed": 540,
            "refusal": 12,
            "too_short": 20,
            "bad_request": 8,
        },
        input_tokens=12_400_000,
        output_tokens=1_410_000,
        cost_usd=36.08,
        requests=9_512,
        request_outcomes={"rate_limited": 61, "http_503": 9, "refusal": 14},
        backend="openai",
        model="gpt-4.1",
        prompt_version="dense-v1",
        timings={"read_s": 3.1, "prepare_s": 21.7, "caption_s": 45_000.0, "write_s": 1.9},
        peak_rss_mb=612.4,
        worker="node-17:4242",
        finished_at=datetime.now(UTC),
    )


def fill(corpus: Path, n: int) -> None:
    """N commit records, written plainly (their fsyncs are not what is measured)."""
    folder = corpus / COMMITS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    text = report(0).model_dump_json()
    for i in range(n):
        (folder / f"{i:05d}.json").write_text(text.replace('"00000"', f'"{i:05d}"', 1))


def commit_cost(sizes: list[int], work: Path) -> None:
    print("# 1. one commit at N shards already committed (median of 200, sizes interleaved)")
    stores = {}
    for n in sizes:
        fill(work / f"commit-{n}", n)
        stores[n] = CorpusStore(work / f"commit-{n}")
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for round_ in range(10):  # round-robin, so that the machine's drift hits every size alike
        for n in sizes:
            for k in range(20):
                r = report(n + round_ * 20 + k)
                t0 = time.perf_counter()
                stores[n].commit(r)
                times[n].append(time.perf_counter() - t0)
    record_kb = len(report(0).model_dump_json()) / 1024
    print(f"{'N':>8}  {'record ms':>9}  {'record KB':>9}  {'old: manifest ms':>16}  {'old MB':>7}")
    for n in sizes:
        # the layout before: every commit rewrote a manifest listing every shard
        old = Manifest(
            recaption_version="0",
            created_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
            config={},
            shards={f"{i:05d}": report(i) for i in range(n)},
        )
        old_times = []
        for _ in range(3 if n > 10_000 else 10):
            t0 = time.perf_counter()
            text = old.model_dump_json(indent=2)
            (work / f"commit-{n}" / "old-manifest.json").write_text(text)
            old_times.append(time.perf_counter() - t0)
        print(
            f"{n:>8}  {statistics.median(times[n]) * 1000:>9.2f}  {record_kb:>9.2f}  "
            f"{statistics.median(old_times) * 1000:>16.1f}  {len(text) / 1e6:>7.1f}"
        )
        del old
    lo, hi = min(sizes), max(sizes)
    ratio = statistics.median(times[hi]) / statistics.median(times[lo])
    print(f"commit time at {hi} / at {lo} shards: {ratio:.2f}x (target <= 1.5); bytes: 1.00x")


# VmHWM, not ru_maxrss: a forked child inherits its parent's ru_maxrss
OPEN = """
import sys, time
from recaption.corpus import Committed, CorpusStore
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = hwm()
store = CorpusStore(sys.argv[1])
t0 = time.perf_counter()
found = Committed.read(store, store.load_manifest())
seconds = time.perf_counter() - t0
print(len(found.ids), round(seconds, 3), round(hwm(), 1), round(hwm() - base, 1))
"""


def open_cost(sizes: list[int], work: Path) -> None:
    print("\n# 2. opening an N-shard corpus: one pass over the commit records, a fresh process")
    print(f"{'N':>8}  {'seconds':>8}  {'peak RSS MB':>11}  {'of which the pass':>17}")
    for n in sizes:
        corpus = work / f"commit-{n}"
        out = subprocess.run(
            [sys.executable, "-c", OPEN, str(corpus)], capture_output=True, text=True, check=True
        ).stdout.split()
        print(
            f"{int(out[0]):>8}  {float(out[1]):>8.2f}  {float(out[2]):>11.1f}  {float(out[3]):>17.1f}"
        )


def tiny_shards(root: Path, n: int) -> None:
    """N web shards of one 1-pixel JPEG each, with alt text."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with tarfile.open(root / f"{i:05d}.tar", "w") as tar:
            for name, data in ((f"{i:05d}0000.jpg", jpeg), (f"{i:05d}0000.txt", b"a red dot")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def driver_cost(shards: int, workers: int, work: Path) -> None:
    import ray

    from recaption.config import load_config
    from recaption.pipeline import run

    print(f"\n# 3. the driver over {shards} one-image shards, {workers} workers, a real local Ray")
    root, corpus = work / "tiny", work / "tiny-corpus"
    tiny_shards(root, shards)
    cfg = load_config(
        "pipelines/default.yaml",
        [
            f"input.path={root}",
            f"output.path={corpus}",
            f"ray.workers={workers}",
            "captioner.ocr=never",
            "captioner.faces=false",
            "validation.min_words=1",
        ],
    )
    ray.init(
        address="local",
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    samples: list[tuple[int, float, float]] = []  # (shards committed, rss MB, driver cpu s)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            done = len(os.listdir(corpus / COMMITS_DIR)) if (corpus / COMMITS_DIR).exists() else 0
            ru = resource.getrusage(resource.RUSAGE_SELF)
            samples.append((done, rss_mb(), ru.ru_utime + ru.ru_stime))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    summary = run(cfg, show_progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    ray.shutdown()
    assert len(summary.finished) == shards, summary.lines()
    tenth = next(s for s in samples if s[0] >= shards // 10)
    end = samples[-1]
    cpu_ms = (end[2] - tenth[2]) * 1000 / max(1, end[0] - tenth[0])
    print(f"{shards} shards in {seconds:.1f}s ({shards / seconds:.1f} shards/s)")
    print(f"driver CPU per shard (after the first tenth): {cpu_ms:.2f} ms")
    print(
        f"driver RSS: {tenth[1]:.1f} MB at {tenth[0]} shards, {end[1]:.1f} MB at {end[0]}: "
        f"{end[1] / tenth[1]:.3f}x (target <= 1.2)"
    )
    totals = json.loads((corpus / "manifest.json").read_text())["totals"]
    print(f"manifest totals: {totals['shards']} shards, {totals['samples']} samples")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--shards", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-driver", action="store_true")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = Path(tmp)
        commit_cost(sizes, work)
        open_cost(sizes, work)
        if not args.skip_driver:
            driver_cost(args.shards, args.workers, work)


if __name__ == "__main__":
    main()
