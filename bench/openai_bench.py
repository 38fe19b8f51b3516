"""How much of an API quota the `openai` captioner uses, and how it rides out a 429 storm.

Runs the real pipeline (Ray workers, the shared limiter actor, the SDK over HTTP) against
the loopback test server (tests/openai_server.py, in its own process) with 0.5 s median
latency, and reads the server's request log:

  rpm   quota 600 RPM, 1 worker and 4 workers: successful requests/min after the first
        minute / quota (target >= 0.99), share of requests answered 429 (target <= 0.5%)
  tpm   quota 300k TPM (the RPM quota out of reach): charged tokens/min / quota, same targets
  storm 4 workers at 600 RPM; the server refuses everything for 10 s with `retry-after: 10`:
        requests sent during the pause (target <= 2 per worker) and time from its end to
        the first second at full rate (target <= 2 s)
  cpu   the client's CPU time per request at full speed (worker processes, all threads)
  quantized  600 and 12,000 RPM (--quantized-rpm: the most this machine sustains, with the
        floor's 512-px JPEGs) enforced over half-second windows, as OpenAI may: quota use and
        429s
  floor client CPU per request at 15,000 RPM, where the client, not the quota, is the limit
        (4 workers, 50 ms latency, 512-px JPEGs sent
        as they came, with dedup and without, and 768-px ones re-encoded to 512), side by
        side with a bare asyncio + httpx loop doing only the floor work on the same images
        and server (target <= 1.5x); each over its steady middle (15 s after its first
        request to the 85th percentile), so that start-up (Ray's, each worker's imports) is
        not counted per request (recaption's whole run beside it); with dedup also per
        image (a copy sends no request); the shard pass's own timings per request beside it

    python bench/openai_bench.py                 # about 15 minutes
    python bench/openai_bench.py --seconds 70 --only rpm
    python bench/openai_bench.py --only floor [--floor-images 12000] [--floor-workers 2]
        [--floor-rpm 6000] [--floor-case pass-through --floor-case re-encode]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from recaption.config import load_config  # noqa: E402
from recaption.pipeline import run  # noqa: E402
from recaption.samples import write_samples  # noqa: E402

LATENCY_MS = 500
RPM = 600
TPM = 300_000


class Server:
    """tests/openai_server.py in a subprocess, so its CPU is not the client's."""

    def __init__(self, *args: str, latency_ms: float = LATENCY_MS):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.openai_server", "--latency-ms", str(latency_ms), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = self.proc.stdout.readline().strip()
        self.root = self.url.removesuffix("/v1")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.root}/_stats") as resp:
            return json.load(resp)

    def storm(self, seconds: float) -> None:
        req = urllib.request.Request(
            f"{self.root}/_storm", data=json.dumps({"seconds": seconds}).encode(), method="POST"
        )
        urllib.request.urlopen(req).close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def shards_for(images: int, workdir: Path) -> Path:
    """Sample shards of 100 URLs (a few are failed downloads, which send no request)."""
    out = workdir / f"shards-{images}"
    if not out.exists():
        write_samples(out, shards=max(4, -(-images // 100)), per_shard=100, seed=7)
    return out


def pipeline(server: Server, shards: Path, corpus: Path, workers: int, *extra: str):
    return load_config(
        ROOT / "pipelines/openai.yaml",
        [
            f"input.path={shards}",
            f"output.path={corpus}",
            f"captioner.base_url={server.url}",
            f"ray.workers={workers}",
            "limits.concurrency=32",
            "output.store_images=false",
            *extra,
        ],
    )


def quota_use(
    events: list[dict], per_s: float, tokens: bool, skip_s: float = 60, until: float = 1.0
) -> dict:
    """Quota used from `skip_s` past the first request to the last answer, or (`until` < 1)
    to the answer at that share of them: before the last shards drain, when fewer and fewer
    workers have images left to send."""
    ok = [e for e in events if e["status"] == 200]
    start = events[0]["t"] + skip_s  # past the start
    end = ok[int(len(ok) * until) - 1]["t"] if until < 1 else ok[-1]["t"] - 1.0
    window = [e for e in ok if start <= e["t"] < end]
    used = sum(e["charged_tokens"] for e in window) if tokens else len(window)
    return {
        "quota_use": used / ((end - start) * per_s),
        "share_429": sum(e["status"] == 429 for e in events) / len(events),
        "requests": len(events),
        "window_s": end - start,
    }


def cpu_per_request(summary) -> dict:
    """Worker processes' CPU (every thread, Ray's included) per request, and the share of it
    that is image preparation (decode, resize, re-encode)."""
    requests = sum(w["requests"] for w in summary.workers)
    cpu = sum(w["cpu_s"] for w in summary.workers)
    prepare = sum(r.timings["prepare_s"] for r in summary.finished)
    return {"cpu_ms_per_request": 1000 * cpu / requests, "prepare_ms": 1000 * prepare / requests}


def steady(workdir: Path, workers: int, seconds: float, kind: str) -> dict:
    if kind == "rpm":
        server, per_s, extra = Server("--rpm", str(RPM)), RPM / 60, [f"limits.rpm={RPM}"]
        images = int(seconds * per_s)
    else:  # TPM-bound: the RPM quota is 10x what the tokens allow
        server = Server("--rpm", str(RPM * 10), "--tpm", str(TPM))
        per_s, extra = TPM / 60, [f"limits.rpm={RPM * 10}", f"limits.tpm={TPM}"]
        images = int(seconds * per_s / 1200)  # ~1200 tokens charged per request
    corpus = workdir / f"corpus-{kind}-{workers}"
    try:
        summary = run(pipeline(server, shards_for(images, workdir), corpus, workers, *extra), False)
        stats = server.stats()
    finally:
        server.stop()
    return quota_use(stats["events"], per_s, tokens=kind == "tpm") | cpu_per_request(summary)


def storm(workdir: Path, workers: int, seconds: float) -> dict:
    server = Server("--rpm", str(RPM))
    corpus = workdir / f"corpus-storm-{workers}"

    def trigger() -> None:
        while not server.stats()["events"]:
            time.sleep(0.2)
        time.sleep(15)
        server.storm(10)

    timer = threading.Thread(target=trigger, daemon=True)
    timer.start()
    try:
        shards = shards_for(int(seconds * RPM / 60), workdir)
        run(pipeline(server, shards, corpus, workers, f"limits.rpm={RPM}"), False)
        stats = server.stats()
    finally:
        server.stop()
    start, end = stats["storms"][0]
    events = stats["events"]
    during = [e for e in events if start <= e["t"] < end]
    after = sorted(e["t"] for e in events if e["t"] >= end and e["status"] == 200)
    per_s = RPM / 60
    full = next(  # the first one-second window after the storm that runs at the quota
        (t - end for t in after if sum(t <= u < t + 1 for u in after) >= 0.9 * per_s), None
    )
    return {
        "sent_during_pause": len(during),
        "per_worker": len(during) / workers,
        "first_request_after_s": after[0] - end if after else None,
        "full_rate_after_s": full,
        "share_429_outside_storm": sum(
            e["status"] == 429 and not start <= e["t"] < end for e in events
        )
        / len(events),
    }


def quantized(workdir: Path, workers: int, seconds: float, rpm: int = RPM, side: int = 0) -> dict:
    """A server that enforces `rpm` over half-second windows, as OpenAI may; the client is
    told the per-minute quota only and learns the window from the 429s. `side`: 512-px JPEGs
    sent as they came (the floor's), so that the client's CPU does not bind first."""
    server = Server("--rpm", str(rpm), "--burst-s", "0.5")
    images = int(seconds * rpm / 60)
    try:
        if side:
            shards = sized_shards(workdir / f"floor-{side}-{images}", images, side)
            extra = [f"captioner.image.max_side={side}", "limits.concurrency=64"]
        else:
            shards, extra = shards_for(images, workdir), []
        corpus = workdir / f"corpus-q-{rpm}"
        run(pipeline(server, shards, corpus, workers, f"limits.rpm={rpm}", *extra), False)
        stats = server.stats()
    finally:
        server.stop()
    return quota_use(stats["events"], rpm / 60, tokens=False, skip_s=5, until=0.9) | {"rpm": rpm}


# --- the floor: client CPU per request, against a bare loop -----------------------------------

# high enough that the client is the limit: a pass-through run reaches ~14,000 of it here
FLOOR_RPM = 15_000
FLOOR_CASES = (  # dedup off beside the default: what looking for duplicates costs
    ("pass-through", 512, "dedup.mode=reuse"),
    ("pass-through, dedup off", 512, "dedup.mode=off"),
    ("pass-through, exact dedup only", 512, "dedup.near.enabled=false"),
    ("re-encode", 768, "dedup.mode=reuse"),
)


def sized_shards(out: Path, images: int, side: int) -> Path:
    """Shards of photographs and scenes, every image `side` px on its longest side."""
    from recaption.samples import WebImage, _load_photos, _photo_variant, write_shard
    from recaption.scenes import random_scene, render

    if out.exists():
        return out
    out.mkdir(parents=True)
    photos, rng = _load_photos(), random.Random(3)
    names = sorted(photos)
    for shard in range(-(-images // 500)):
        items = []
        for _ in range(min(500, images - shard * 500)):
            if rng.random() < 0.5:
                im = _photo_variant(photos[rng.choice(names)], rng)
            else:
                im = render(random_scene(rng))
            ratio = side / max(im.size)
            im = im.resize((max(1, round(im.width * ratio)), max(1, round(im.height * ratio))))
            items.append(WebImage(f"https://example.com/{rng.getrandbits(40):x}.jpg", "x", im))
        write_shard(out, shard, items)
    return out


class TreeCPU:
    """CPU seconds of a process and its descendants (for recaption: this process, Ray's
    raylet, GCS and workers), the server's excepted, as a series over time. Polled, since a
    process's time is gone once it exits."""

    def __init__(self, exclude: set[int], root: int | None = None):
        self.exclude, self.root, self.seen = exclude, root, {}
        self.series: list[tuple[float, float]] = []  # (time.monotonic(), CPU seconds so far)
        self.own = 0.0  # the polling thread's CPU: its walks of /proc are not the client's work
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(self.root)
            for proc in [top, *top.children(recursive=True)]:
                if proc.pid in self.exclude:
                    continue
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    cpu = t.user + t.system
                    if proc.pid == os.getpid():
                        cpu -= self.own
                    self.seen[(proc.pid, proc.create_time())] = cpu
        total = sum(v - self.start.get(k, 0.0) for k, v in self.seen.items())
        self.series.append((time.monotonic(), total))

    def _poll(self) -> None:
        while not self.stop.wait(0.25):
            self.own = time.thread_time()
            self._sample()

    def __enter__(self) -> TreeCPU:
        self.start: dict = {}
        self._sample()
        self.start = dict(self.seen)
        self.series = [(self.series[0][0], 0.0)]
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()
        self.cpu_s = self.series[-1][1]

    def at(self, when: float) -> float:
        """CPU seconds used by `when`, interpolated between the two samples around it."""
        times = [t for t, _ in self.series]
        i = min(max(bisect.bisect_left(times, when), 1), len(times) - 1)
        (t0, c0), (t1, c1) = self.series[i - 1], self.series[i]
        return c0 + (c1 - c0) * min(max((when - t0) / max(t1 - t0, 1e-9), 0.0), 1.0)


def middle_ms(cpu: TreeCPU, events: list[dict], started: float, settle_s: float = 15) -> float:
    """CPU ms per request in the run's steady middle: from `settle_s` after the first request
    (or the 20th percentile of the server's log, if later) to the 85th percentile. Start-up
    (Ray's, each worker's imports, which on 2 cores overlap the first workers' requests) and
    the tail, where workers drain their last shards, are not per-request costs."""
    times = sorted(started + e["t"] for e in events)
    a = max(int(len(times) * 0.2), bisect.bisect_left(times, times[0] + settle_s))
    b = int(len(times) * 0.85)
    if b - a < len(times) // 5:
        raise ValueError(f"too short a run for a steady window: {len(times)} requests")
    return 1000 * (cpu.at(times[b]) - cpu.at(times[a])) / (b - a)


def recaption_cpu(
    server: Server, shards: Path, corpus: Path, rpm: int, workers: int, *extra: str
) -> dict:
    cfg = pipeline(
        server, shards, corpus, workers, f"limits.rpm={rpm}", "captioner.image.max_side=512",
        *extra,
    )  # fmt: skip
    with TreeCPU({server.proc.pid}) as cpu:
        t0 = time.perf_counter()
        summary = run(cfg, False)
        wall = time.perf_counter() - t0
    stats = server.stats()
    requests = sum(w["requests"] for w in summary.workers)
    timings: Counter[str] = Counter()
    for report in summary.finished:
        timings.update(report.timings)
    return {
        "steady_ms": middle_ms(cpu, stats["events"], stats["started"]),
        "whole_run_ms": 1000 * cpu.cpu_s / requests,
        "requests": requests, "images": sum(r.samples for r in summary.finished),
        "wall_s": wall, "timings": timings, "events": stats["events"],
    }  # fmt: skip


def bare_cpu(server: Server, shards: Path, rpm: int, resize: bool) -> dict:
    """The bare loop in its own process, measured the same way (its tree, its window)."""
    before = len(server.stats()["events"])
    cmd = [sys.executable, str(ROOT / "bench/bare_client.py"), server.url, str(shards),
           "--rpm", str(rpm), *(["--resize", "512"] if resize else [])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with TreeCPU(set(), root=proc.pid) as cpu:
        out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"bench/bare_client.py failed ({proc.returncode})")
    stats = server.stats()
    events = stats["events"][before:]
    return json.loads(out) | {"steady_ms": middle_ms(cpu, events, stats["started"])}


def floor(
    workdir: Path, images: int, rpm: int = FLOOR_RPM, workers: int = 4, only: list | None = None
) -> dict:
    """recaption and the bare loop on the same images and server, each per request over its
    steady middle (recaption's whole run, start-up included, beside it)."""
    results = {}
    for case, side, dedup in FLOOR_CASES:
        if only and case not in only:
            continue
        shards = sized_shards(workdir / f"floor-{side}", images, side)
        server = Server("--rpm", str(rpm), latency_ms=50)
        name = case.replace(" ", "").replace(",", "-")
        try:
            ours = recaption_cpu(server, shards, workdir / f"floor-{name}", rpm, workers, dedup)
            bare = bare_cpu(server, shards, rpm, resize=side > 512)
        finally:
            server.stop()
        events = ours.pop("events")
        per_request = ours["steady_ms"]
        # with dedup a copy costs no request: per image is the like-for-like figure (the
        # bare loop sends one request an image)
        per_image = per_request * ours["requests"] / ours["images"]
        steps = {  # the per-request budget, as the shard pass times it (worker wall time)
            k.removesuffix("_s"): round(1000 * v / max(1, ours["requests"]), 3)
            for k, v in sorted(ours["timings"].items())
            if k in ("read_s", "prepare_s", "dedup_s", "write_s", "validate_s")
        }
        results[case] = {
            "recaption_cpu_ms": per_request,
            "bare_cpu_ms": bare["steady_ms"],
            "ratio": per_request / bare["steady_ms"],
            "recaption_cpu_ms_per_image": per_image,
            "ratio_per_image": per_image / bare["steady_ms"],
            "whole_run_ms": ours["whole_run_ms"],
            "bare_whole_run_ms": bare["cpu_ms_per_request"],
            "cores_per_10k_rpm": per_request / 1000 * 10_000 / 60,
            "duplicates_share": 1 - ours["requests"] / ours["images"],
            "rpm_reached": 60 * ours["requests"] / ours["wall_s"],
            "share_429": sum(e["status"] == 429 for e in events) / len(events),
            "per_request_ms": steps,
        }
        print(case, results[case], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=130, help="length of each steady run")
    parser.add_argument(
        "--only", choices=["rpm", "tpm", "storm", "quantized", "floor"], action="append"
    )
    parser.add_argument("--floor-images", type=int, default=12_000)
    parser.add_argument("--floor-rpm", type=int, default=FLOOR_RPM, help="the floor's quota")
    parser.add_argument("--floor-workers", type=int, default=4, help="the floor's ray.workers")
    parser.add_argument(
        "--floor-case", choices=[c[0] for c in FLOOR_CASES], action="append", help="default: all"
    )
    parser.add_argument(
        "--quantized-rpm", type=int, default=12_000, help="the most this machine sustains"
    )
    args = parser.parse_args()
    todo = args.only or ["rpm", "tpm", "storm", "quantized", "floor"]
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for kind in ("rpm", "tpm"):
            if kind in todo:
                for workers in (1, 4):
                    results[f"{kind}, {workers} worker(s)"] = steady(
                        workdir, workers, args.seconds, kind
                    )
                    print(kind, workers, results[f"{kind}, {workers} worker(s)"], flush=True)
        if "storm" in todo:
            results["storm, 4 workers"] = storm(workdir, 4, 40)
        if "quantized" in todo:
            results["rpm per 0.5 s, 4 workers"] = quantized(workdir, 4, 40)
            rpm = args.quantized_rpm
            results[f"{rpm} rpm per 0.5 s, 4 workers"] = quantized(workdir, 4, 40, rpm, 512)
        if "floor" in todo:
            figures_by_case = floor(
                workdir, args.floor_images, args.floor_rpm, args.floor_workers, args.floor_case
            )
            for case, figures in figures_by_case.items():
                results[f"floor, {case}"] = figures
    ray.shutdown()
    print()
    for name, figures in results.items():
        shown = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
        )
        print(f"{name:22s} {shown}")


if __name__ == "__main__":
    main()
