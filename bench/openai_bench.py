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
  quantized  600 RPM enforced over half-second windows, as OpenAI may: quota use and 429s

    python bench/openai_bench.py                 # about 12 minutes
    python bench/openai_bench.py --seconds 70 --only rpm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

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

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.openai_server", "--latency-ms", str(LATENCY_MS), *args],
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


def quota_use(events: list[dict], per_s: float, tokens: bool, skip_s: float = 60) -> dict:
    ok = [e for e in events if e["status"] == 200]
    start, end = events[0]["t"] + skip_s, ok[-1]["t"] - 1.0  # past the start, before the tail
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


def quantized(workdir: Path, workers: int, seconds: float) -> dict:
    """A server that enforces 600 RPM over half-second windows (5 requests a bucket)."""
    server = Server("--rpm", str(RPM), "--burst-s", "0.5")
    try:
        shards = shards_for(int(seconds * RPM / 60), workdir)
        run(pipeline(server, shards, workdir / "corpus-q", workers, f"limits.rpm={RPM}"), False)
        stats = server.stats()
    finally:
        server.stop()
    return quota_use(stats["events"], RPM / 60, tokens=False, skip_s=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=130, help="length of each steady run")
    parser.add_argument("--only", choices=["rpm", "tpm", "storm", "quantized"], action="append")
    args = parser.parse_args()
    todo = args.only or ["rpm", "tpm", "storm", "quantized"]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
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
    ray.shutdown()
    print()
    for name, figures in results.items():
        shown = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
        )
        print(f"{name:22s} {shown}")


if __name__ == "__main__":
    main()
