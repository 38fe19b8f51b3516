"""What a run shows while it runs and returns when it ends: its progress and the
`RunSummary`. Both are O(1) per shard: the summary keeps the ids of the shards it committed
and reads their reports back from the corpus only when asked.

Progress is a tqdm bar on a terminal, and in a log (`ray job submit`, CI, `> run.log`) one
plain line every `every_s` seconds: a week-long run logs a few thousand lines, not millions
of bar refreshes."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TextIO, overload

import ray
from tqdm import tqdm

from recaption.corpus import CorpusStore
from recaption.errors import ConfigError
from recaption.records import ShardReport, Totals
from recaption.sources import Shard


class Finished(Sequence[ShardReport]):
    """The shards a run committed, in order, as ids; each report is read from its commit
    record when asked for, so a 100,000-shard run holds a few bytes per shard."""

    def __init__(self, store: CorpusStore):
        self.store = store
        self.ids: list[str] = []

    def append(self, shard: str) -> None:
        self.ids.append(shard)

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> ShardReport: ...
    @overload
    def __getitem__(self, i: slice) -> list[ShardReport]: ...
    def __getitem__(self, i: int | slice) -> ShardReport | list[ShardReport]:
        if isinstance(i, slice):
            return [self._read(sid) for sid in self.ids[i]]
        return self._read(self.ids[i])

    def __iter__(self) -> Iterator[ShardReport]:
        return (self._read(sid) for sid in self.ids)

    def _read(self, shard: str) -> ShardReport:
        report = self.store.read_commit(shard)
        assert report is not None, f"shard {shard} was committed by this run"
        return report


@dataclass
class RunSummary:
    corpus: str
    shards: int
    skipped: int
    finished: Finished
    totals: Totals = field(default_factory=Totals)  # of the shards this run committed
    failed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # shards waiting on their batches
    spent: str | None = None  # set when the run stopped at the spend cap: how to go on
    seconds: float = 0.0
    workers: list[dict[str, float]] = field(default_factory=list)  # their last progress()

    @property
    def samples(self) -> int:
        return self.totals.samples

    def lines(self) -> list[str]:
        t = self.totals
        reasons = Counter({k: n for k, n in t.rejected_by_reason.items() if n})
        rate = t.samples / self.seconds if self.seconds else 0.0
        out = [
            f"shards: {len(self.finished)} done, {self.skipped} already done, {len(self.failed)} failed "
            f"(of {self.shards})",
            f"samples: {t.samples} -> {t.captioned} captioned, {sum(reasons.values())} rejected"
            + (f" ({', '.join(f'{k} {v}' for k, v in reasons.most_common())})" if reasons else ""),
            f"speed: {rate:.1f} images/s over {self.seconds:.1f}s",
            f"corpus: {self.corpus}",
        ]
        out += [f"failed shard {sid}: {err}" for sid, err in sorted(self.failed.items())]
        if self.pending:
            out.append(
                f"waiting: {len(self.pending)} shards have batches running "
                f"(e.g. {min(self.pending)}: {self.pending[min(self.pending)]})"
            )
        if self.spent:
            out.append(self.spent)
        return out


Mode = Literal["auto", "bar", "lines", "off"]
MODES: tuple[Mode, ...] = ("auto", "bar", "lines", "off")


@dataclass(frozen=True)
class ProgressStyle:
    """How a run shows its progress. `bar`: tqdm on stderr; `lines`: one plain line on stdout
    every `every_s` seconds; `off`; `auto`: the bar when stdout and stderr are both terminals,
    lines otherwise (a log file, a pipe, `ray job submit`, a notebook)."""

    mode: Mode = "auto"
    every_s: float = 30.0

    @classmethod
    def of(cls, show: bool | str | ProgressStyle, every_s: float | None = None) -> ProgressStyle:
        """`run(cfg, show_progress=...)` takes a bool (True: the bar, as it always was;
        False: none), a mode name or a style."""
        if isinstance(show, ProgressStyle):
            style = show
        elif isinstance(show, bool):
            style = cls("bar" if show else "off")
        elif show in MODES:
            style = cls(show)
        else:
            raise ConfigError(f"progress {show!r}: one of {', '.join(MODES)}")
        if every_s is not None:
            style = replace(style, every_s=every_s)
        if not style.every_s > 0:
            raise ConfigError(f"--progress-every {style.every_s}: must be more than 0 seconds")
        return style

    def resolve(self) -> Mode:
        if self.mode != "auto":
            return self.mode
        return "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"


def span(seconds: float) -> str:
    """12s, 4m05s, 3h20m, 2d04h: a duration at the precision a log reader wants."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def progress_line(
    counts: Mapping[str, float],
    shards: tuple[int, int],
    reasons: Mapping[str, int],
    elapsed: float,
    total: int | None,
) -> str:
    """One line of a run's log: `counts`, the workers' summed progress(); `shards`, (done,
    to do) in this run; `reasons`, rejections of the shards this run committed; `total`, the
    images to do (None while not yet counted)."""
    done_shards, todo_shards = shards
    images = int(counts.get("samples", 0))
    rate = images / elapsed if elapsed > 0 else 0.0
    parts = [
        f"shards {done_shards}/{todo_shards}",
        f"images {images:,}" + (f"/{total:,}" if total else ""),
        f"{rate:.1f} img/s",
    ]
    rejected = f"rejected {int(counts.get('rejected', 0)):,}"
    named = Counter({k: n for k, n in reasons.items() if n})
    if named:
        rejected += f" (committed: {', '.join(f'{k} {n:,}' for k, n in named.most_common())})"
    parts.append(rejected)
    if counts.get("requests"):  # a metered API: what the quota and the bill are doing
        minutes = elapsed / 60
        tokens = counts.get("input_tokens", 0) + counts.get("output_tokens", 0)
        parts += [
            f"{counts['requests'] / minutes:,.0f} req/min",
            f"{tokens / minutes:,.0f} tok/min",
            f"${counts.get('cost_usd', 0.0):,.4f}",
        ]
    eta = None
    if done_shards >= todo_shards:
        eta = 0.0
    elif total and rate > 0:
        eta = max(0, total - images) / rate
    elif done_shards:
        eta = (todo_shards - done_shards) * elapsed / done_shards
    parts.append(f"ETA {span(eta) if eta is not None else '-'}")
    return f"progress {span(elapsed)}: " + ", ".join(parts)


class Progress:
    """A run's progress in the style asked for. The driver calls `update` every loop (twice a
    second at most); workers are asked for their counts only when something is shown: each
    bar refresh, or each line every `every_s` seconds."""

    def __init__(self, shards: list[Shard], style: ProgressStyle, out: TextIO | None = None):
        self.mode = style.resolve()
        self.every_s = style.every_s
        self.out = out or sys.stdout
        self.bar = tqdm(unit="img", disable=self.mode != "bar", dynamic_ncols=True, file=sys.stderr)
        self.total: int | None = None
        self.counts: Counter[str] = Counter()
        self.next_at = time.monotonic() + self.every_s
        self.last: tuple[list[Any], RunSummary, float, float] | None = None
        if self.mode != "off":  # a footer read per shard: minutes for 80,000 shards in a store
            threading.Thread(
                target=self._count, args=(shards,), daemon=True, name="recaption-total"
            ).start()

    def _count(self, shards: list[Shard]) -> None:
        with contextlib.suppress(Exception):  # a tar without its parquet: no total
            self.total = sum(s.expected_samples() for s in shards)
            self.bar.total = self.total

    def _fetch(self, workers: list[Any], timeout: float = 5) -> bool:
        with contextlib.suppress(Exception):  # progress is best effort, never a failure
            done: Counter[str] = Counter()
            for counts in ray.get([w.progress.remote() for w in workers], timeout=timeout):
                done.update(counts)
            self.counts = done
            return True
        return False

    def update(self, workers: list[Any], summary: RunSummary, elapsed: float) -> None:
        if self.mode == "off":
            return
        self.last = (workers, summary, elapsed, time.monotonic())
        if self.mode == "lines":
            if time.monotonic() >= self.next_at and self._fetch(workers):
                self._line(summary, elapsed)
                self.next_at = time.monotonic() + self.every_s
            return
        if not self._fetch(workers):
            return
        done = self.counts
        self.bar.update(max(0, int(done["samples"]) - self.bar.n))
        postfix = {
            "shards": f"{len(summary.finished)}/{summary.shards - summary.skipped}",
            "rejected": done["rejected"],
        }
        if done["requests"]:  # a metered API: show what the quota and the bill are doing
            minutes = elapsed / 60
            postfix["req/min"] = f"{done['requests'] / minutes:.0f}"
            postfix["tok/min"] = f"{(done['input_tokens'] + done['output_tokens']) / minutes:.0f}"
            postfix["$"] = f"{done['cost_usd']:.4f}"
        self.bar.set_postfix(postfix)

    def _line(self, summary: RunSummary, elapsed: float) -> None:
        shards = (len(summary.finished), summary.shards - summary.skipped)
        reasons = summary.totals.rejected_by_reason
        line = progress_line(self.counts, shards, reasons, elapsed, self.total)
        print(f"recaption: {line}", file=self.out, flush=True)

    def close(self) -> None:
        """The bar ends; a log gets its last line, with the counts as the run ends."""
        self.bar.close()
        if self.mode == "lines" and self.last is not None:
            workers, summary, elapsed, at = self.last
            self._fetch(workers, timeout=2)
            self._line(summary, elapsed + time.monotonic() - at)


def progress_bar(shards: list[Shard], show: bool | str | ProgressStyle) -> Progress:
    """The run's progress (the name from when it was a bar only); the images to do are
    counted in the background while the run goes on."""
    return Progress(shards, ProgressStyle.of(show))


def show_progress(bar: Progress, workers: list[Any], summary: RunSummary, elapsed: float) -> None:
    bar.update(workers, summary, elapsed)
