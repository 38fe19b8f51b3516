"""`recaption status CORPUS`: where a run stands, running or stopped, from what it leaves in
the corpus. Nothing is asked of the run itself, and nothing is written.

- committed: one pass over the commit records (`Committed.read`), keeping only the records
  of the last `window_min` minutes, for the rate;
- in progress: the journals (answered keys, what they cost), batch states (the batches'
  status as last recorded) and recommit marks of unfinished shards; in an object-store
  corpus these live in the staging folder of the node running each shard (`--staging`);
- the total and the start: `config.run` in the manifest, written when a run starts;
- running or not: whether the corpus lock (`.lock`) is held, from /proc/locks, else from
  its holder's pid on this host.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import socket
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recaption.corpus import LOCK, Committed, CorpusStore
from recaption.errors import RunError
from recaption.progress import span
from recaption.records import ShardReport, Usage

WINDOW_MIN = 10.0  # the rate and the ETA are over the commits of the last minutes


class _Recent:
    """Commit times and sizes within `window_s` of the latest seen, in one pass over records
    read in any order: memory is bounded by the commits of one window, not the corpus."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.heap: list[tuple[float, int]] = []  # (finished_at as epoch s, samples)
        self.latest: float | None = None

    def add(self, report: ShardReport) -> bool:
        at = report.finished_at.timestamp()
        self.latest = at if self.latest is None else max(self.latest, at)
        heapq.heappush(self.heap, (at, report.samples))
        while self.heap[0][0] < self.latest - self.window_s:
            heapq.heappop(self.heap)
        return False  # Committed.read's `pick`: picks nothing, only watches

    def rate(self, start: float | None, end: float) -> dict[str, Any] | None:
        lo = end - self.window_s if start is None else max(end - self.window_s, start)
        within = [(at, n) for at, n in self.heap if lo < at <= end]
        if end - lo <= 0 or not within:
            return None
        seconds = end - lo
        images = sum(n for _, n in within)
        return {
            "window_min": self.window_s / 60,
            "from": _iso(lo),
            "to": _iso(end),
            "shards": len(within),
            "images": images,
            "images_per_s": round(images / seconds, 3),
            "shards_per_h": round(len(within) * 3600 / seconds, 3),
        }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _flocked(inode: int) -> bool | None:
    """Whether a flock is held on the file with this inode (Linux /proc/locks); None when
    that cannot be read. Reading it takes no lock, so a run starting now is not disturbed."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue  # a waiter, or a POSIX lock: not the run's
        if fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def _run_state(store: CorpusStore) -> tuple[str, str | None]:
    """running | stopped | unknown (held from another host, or no lock here), and the
    holder's line (`pid N on HOST`) as the last run wrote it."""
    path = store.local / LOCK
    try:
        holder = path.read_text().strip() or None
        inode = path.stat().st_ino
    except OSError:
        return "unknown", None
    held = _flocked(inode)
    if held:
        return "running", holder
    words = (holder or "").split()
    host = words[3] if len(words) >= 4 and words[0] == "pid" else None
    if host not in (None, socket.gethostname()):
        return "unknown", holder  # a lock on a shared filesystem, held on another node
    if held is None and words[1:2] and words[1].isdigit():  # no /proc/locks: is its pid alive
        with contextlib.suppress(OSError):
            os.kill(int(words[1]), 0)
            return "running", holder
    return "stopped", holder


def _journal(path: Path) -> dict[str, Any]:
    """What one unfinished shard's journal holds, streamed; a key answered twice counts once
    (the last line wins, as the resuming run reads it)."""
    answered: dict[str, tuple[str, str | None, Usage]] = {}
    with open(path, "rb") as fh:
        for line in fh:
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                entry = json.loads(line)
                row = entry["row"]
                answered[row["key"]] = (
                    entry["kind"],
                    row.get("reason"),
                    Usage.from_spent(entry.get("spent") or {}),
                )
    reasons = Counter(r for kind, r, _ in answered.values() if kind != "data" and r)
    return {
        "answered": len(answered),
        "captioned": sum(kind == "data" for kind, _, _ in answered.values()),
        "rejected": sum(kind != "data" for kind, _, _ in answered.values()),
        "rejected_by_reason": dict(reasons.most_common()),
        "input_tokens": sum(u.input_tokens for _, _, u in answered.values()),
        "output_tokens": sum(u.output_tokens for _, _, u in answered.values()),
        "cost_usd": round(sum(u.cost_usd for _, _, u in answered.values()), 6),
    }


def _batches(path: Path) -> dict[str, Any]:
    from recaption.captioners.batch_state import LIVE, load_state

    state = None
    with contextlib.suppress(ValueError, OSError):
        state = load_state(path)
    parts = state.parts if state is not None else []
    return {
        "batches": dict(Counter(p.status for p in parts).most_common()),
        "batch_keys_live": sum(len(p.keys) for p in parts if p.status in LIVE),
    }


def _in_progress(store: CorpusStore, committed: set[str]) -> list[dict[str, Any]]:
    """Each shard with resume state; a committed shard's leftover journal (a run stopped
    between a commit and its cleanup) is not in progress, unless it is being recommitted."""
    recommits = store.retries()
    journals = {p.stem: p for p in store.journals()}
    batches = {p.stem: p for p in store.batch_states()}
    found = []
    for sid in sorted(set(journals) | set(batches) | set(recommits)):
        if sid in committed and sid not in recommits:
            continue
        shard: dict[str, Any] = {"shard": sid, "answered": 0, "captioned": 0, "rejected": 0}
        if sid in journals:
            shard |= _journal(journals[sid])
        if sid in batches:
            shard |= _batches(batches[sid])
        if sid in recommits:
            shard["recommit"] = sorted(recommits[sid])
        found.append(shard)
    return found


def corpus_status(
    corpus: str | Path,
    staging: str | Path | None = None,
    window_min: float = WINDOW_MIN,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Where the run writing `corpus` stands (see the module's docstring), as a dict that
    `--json` prints as it is."""
    store = CorpusStore(corpus, staging)
    manifest = store.load_manifest()
    recent = _Recent(window_min * 60)
    committed = Committed.read(store, manifest, pick=recent.add)
    in_progress = _in_progress(store, committed.ids)
    if manifest is None and not committed.ids and not in_progress:
        raise RunError(f"no recaption corpus at {corpus}: no manifest.json, commits/ or journals")
    run = (manifest.config.get("run") if manifest else None) or {}
    started = None
    with contextlib.suppress(KeyError, TypeError, ValueError):
        started = datetime.fromisoformat(run["started_at"]).timestamp()
    input_shards = run.get("input_shards")
    state, holder = _run_state(store)
    t = committed.totals
    busy = {s["shard"] for s in in_progress}
    done = len(committed.ids - busy)  # a shard being recommitted is in progress again
    if state != "running" and input_shards is not None and done >= input_shards and not busy:
        state = "finished"
    end = (now or datetime.now(UTC)).timestamp() if state == "running" else recent.latest
    rate = recent.rate(started, end) if end is not None else None
    left = None if input_shards is None else max(0, input_shards - done)
    eta = None
    if left == 0:
        eta = 0.0
    elif left and rate and rate["shards_per_h"] > 0:
        eta = round(left * 3600 / rate["shards_per_h"], 1)
    pending_cost = sum(s.get("cost_usd", 0.0) for s in in_progress)
    pending_reasons: Counter[str] = Counter()
    for s in in_progress:
        pending_reasons.update(s.get("rejected_by_reason", {}))
    return {
        "corpus": str(corpus),
        "state": state,
        "lock": holder,
        "started_at": run.get("started_at"),
        "updated_at": manifest.updated_at.isoformat(timespec="seconds") if manifest else None,
        "last_commit_at": _iso(recent.latest) if recent.latest is not None else None,
        "shards": {
            "input": input_shards,
            "committed": done,
            "in_progress": len(in_progress),
            "not_started": None if left is None else max(0, left - len(in_progress)),
            "truncated": len(t.truncated_shards),
        },
        "rows": {
            "captioned": t.captioned,
            "rejected": t.rejected,
            "in_progress": sum(s["answered"] for s in in_progress),
        },
        "rejected_by_reason": {k: n for k, n in t.rejected_by_reason.most_common() if n},
        "in_progress_rejected_by_reason": dict(pending_reasons.most_common()),
        "tokens": {"input": t.input_tokens, "output": t.output_tokens},
        "requests": t.requests,
        "cost_usd": {
            "committed": round(t.cost_usd, 6),
            "in_progress": round(pending_cost, 6),
            "total": round(t.cost_usd + pending_cost, 6),
        },
        "window_min": window_min,
        "rate": rate,
        "eta_s": eta,
        "in_progress_shards": in_progress,
        "resume_state_in": str(store.local),
    }


def lines(status: dict[str, Any], show: int = 10) -> list[str]:
    """The status for a person, one fact a line."""
    sh, rows, cost = status["shards"], status["rows"], status["cost_usd"]
    who = f" ({status['lock']})" if status["lock"] else ""
    out = [f"{status['corpus']}: {status['state']}{who}"]
    if status["started_at"]:
        out[0] += f", last run started {status['started_at']}"
    of = f" of {sh['input']}" if sh["input"] is not None else ""
    waiting = f", {sh['not_started']} not started" if sh["not_started"] is not None else ""
    out.append(f"shards: {sh['committed']} committed{of}, {sh['in_progress']} in progress{waiting}")
    reasons = ", ".join(f"{k} {n:,}" for k, n in status["rejected_by_reason"].items())
    out.append(
        f"rows: {rows['captioned']:,} captioned, {rows['rejected']:,} rejected"
        + (f" ({reasons})" if reasons else "")
        + (
            f"; {rows['in_progress']:,} answered in unfinished shards"
            if rows["in_progress"]
            else ""
        )
    )
    tokens = status["tokens"]
    out.append(
        f"cost: ${cost['total']:,.4f} (${cost['committed']:,.4f} committed, "
        f"${cost['in_progress']:,.4f} in journals); {tokens['input']:,} input + "
        f"{tokens['output']:,} output tokens, {status['requests']:,} requests"
    )
    rate = status["rate"]
    if rate:
        out.append(
            f"rate: {rate['images_per_s']:,.2f} images/s, {rate['shards_per_h']:,.1f} shards/h "
            f"over {rate['shards']} commits from {rate['from']} to {rate['to']}"
        )
    else:
        out.append(f"rate: no commit in the last {status['window_min']:g} minutes of the run")
    if status["eta_s"] is not None and status["state"] != "finished":
        when = "" if status["state"] == "running" else " at that rate, once resumed"
        out.append(f"ETA: {span(status['eta_s'])}{when}")
    for s in status["in_progress_shards"][:show]:
        parts = [f"{s['answered']:,} answered"]
        if s.get("cost_usd"):
            parts.append(f"${s['cost_usd']:,.4f}")
        if s.get("batches"):
            parts.append("batches " + ", ".join(f"{n} {k}" for k, n in s["batches"].items()))
        if s.get("recommit"):
            parts.append(f"recommitting ({', '.join(s['recommit'])})")
        out.append(f"in progress: {s['shard']}: {', '.join(parts)}")
    if len(status["in_progress_shards"]) > show:
        out.append(f"in progress: ... and {len(status['in_progress_shards']) - show} more")
    return out
