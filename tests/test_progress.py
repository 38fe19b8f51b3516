"""Progress that suits where it goes: plain lines at a fixed interval in a log (a pipe, a file,
`ray job submit`), the tqdm bar on a terminal (a real pty), nothing with --quiet."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from recaption.cli import build_parser
from recaption.errors import ConfigError
from recaption.progress import ProgressStyle, progress_line, span

RECAPTION = str(Path(sys.executable).parent / "recaption")
LINE = re.compile(
    r"^recaption: progress (\S+): shards (\d+)/(\d+), images ([\d,]+)(/[\d,]+)?, [\d.]+ img/s, "
    r"rejected [\d,]+( \(committed: [^)]*\))?(, [\d,]+ req/min, [\d,]+ tok/min, \$[\d.,]+)?, "
    r"ETA \S+$"
)


def seconds(text: str) -> float:
    """span()'s text back to seconds: 12s, 4m05s, 3h20m."""
    parts = re.findall(r"(\d+)([dhms])", text)
    return sum(int(n) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def test_a_progress_line_says_where_the_run_stands():
    counts = {"samples": 1200, "rejected": 30, "requests": 600, "cost_usd": 1.5}
    counts |= {"input_tokens": 900_000, "output_tokens": 100_000}
    line = progress_line(counts, (3, 10), {"refusal": 4, "too_short": 20}, 120.0, 4000)
    assert line == (
        "progress 2m00s: shards 3/10, images 1,200/4,000, 10.0 img/s, "
        "rejected 30 (committed: too_short 20, refusal 4), 300 req/min, 500,000 tok/min, "
        "$1.5000, ETA 4m40s"
    )
    assert LINE.match(f"recaption: {line}")
    # no total counted yet: the ETA comes from the shards; nothing done yet: no ETA
    assert progress_line({"samples": 10}, (2, 8), {}, 60.0, None).endswith("ETA 3m00s")
    assert progress_line({}, (0, 8), {}, 5.0, None).endswith("ETA -")
    assert progress_line({"samples": 5}, (8, 8), {}, 5.0, 5).endswith("ETA 0s")
    assert [span(s) for s in (0, 59.4, 61, 3600, 90061)] == ["0s", "59s", "1m01s", "1h00m", "1d01h"]


def test_progress_styles():
    assert ProgressStyle.of(True) == ProgressStyle("bar", 30.0)  # as run() always drew it
    assert ProgressStyle.of(False).mode == "off"
    assert ProgressStyle.of("lines", 5) == ProgressStyle("lines", 5)
    for bad in (("sparkles", None), ("lines", 0)):
        with pytest.raises(ConfigError):
            ProgressStyle.of(*bad)
    # a 10-minute run logs at most 25 progress lines by default: one each 30 s, and the last
    args = build_parser().parse_args(["run", "--pipeline", "default"])
    assert args.progress == "auto" and 600 / args.progress_every + 1 <= 25


def run_argv(shards: Path, corpus: Path, cluster: str, *extra: str) -> list[str]:
    return [
        *(RECAPTION, "run", "--pipeline", "default", "--input", str(shards)),
        *("--output", str(corpus), "--set", f"ray.address={cluster}"),
        *("--set", "ray.workers=1", *extra),
    ]


def test_a_log_gets_a_plain_line_every_n_seconds(ray_cluster, sample_shards, tmp_path):
    every = 0.5
    argv = run_argv(sample_shards, tmp_path / "corpus", ray_cluster, "--progress-every", str(every))
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # pipes, no tty
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("recaption: progress")]
    assert lines and all(LINE.match(line) for line in lines), lines
    assert "\r" not in result.stdout + result.stderr and "img/s]" not in result.stderr  # no bar
    assert len(lines) <= wall / every + 2  # one per interval, and the last as the run ends
    reported = [seconds(LINE.match(line).group(1)) for line in lines]
    assert reported == sorted(reported)
    last = LINE.match(lines[-1])
    assert last.group(2) == last.group(3) == "2" and last.group(4) == "48"  # all done
    # the summary follows the last line
    assert result.stdout.splitlines()[len(lines)].startswith("recaption: shards: 2 done")


def read_pty(fd: int, proc: subprocess.Popen, timeout: float) -> str:
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out.decode(errors="replace")


def test_a_terminal_gets_the_bar(ray_cluster, sample_shards, tmp_path):
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a window
    argv = run_argv(sample_shards, tmp_path / "corpus", ray_cluster)
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        screen = read_pty(parent, proc, timeout=300)
        assert proc.wait(timeout=60) == 0, screen[-3000:]
    finally:
        os.close(parent)
        if proc.poll() is None:
            proc.kill()
    assert "\r" in screen and re.search(r"\d+/48 \[", screen), screen[-2000:]  # tqdm's bar
    assert "recaption: progress" not in screen
    assert "recaption: shards: 2 done" in screen
