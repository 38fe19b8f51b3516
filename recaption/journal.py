"""Per-shard journal: every answered key, appended as it is answered, so that re-running
an unfinished shard (a killed job, a dead worker) repeats no paid call.

`CORPUS/.journal/NNNNN.jsonl` (corpus.journal_path) holds one JSON line per captioned row
(the CaptionRecord without its image, which is prepared again from the input) or per
caption/validate rejection, with what the attempts cost. Each line is written and flushed
at once, so a killed process loses nothing the OS has seen; fsync runs at most every
`fsync_s` seconds for machine crashes. A torn last line (a kill mid-write) is cut off when
the journal is reopened. The driver removes a journal once the manifest records the shard.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from recaption.corpus import journal_path


class Journal:
    def __init__(self, corpus: Path, shard: str, fsync_s: float = 1.0, enabled: bool = True):
        self.path = journal_path(corpus, shard)
        self.enabled = enabled
        self.answered: dict[str, dict[str, Any]] = {}
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.answered = self._load()
        self.fh = open(self.path, "ab")  # noqa: SIM115 - held open for the shard's life
        self.fsync_s = fsync_s
        self.synced = time.monotonic()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last record: cut it, or the next append would join it
            with open(self.path, "rb+") as fh:
                fh.truncate(end)
        answered = {}
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
                answered[entry["row"]["key"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # unreadable: that key is simply asked again
        return answered

    def record(self, kind: str, row: BaseModel, spent: dict[str, float]) -> None:
        """kind: "data" (a CaptionRecord, stored without its image) or "rejected" (a
        Rejection). The line is {"kind", "row", "spent"}; pydantic writes the row's JSON."""
        if not self.enabled:
            return
        body = row.model_dump_json(exclude={"image"})
        self.fh.write(f'{{"kind":"{kind}","row":{body},"spent":{json.dumps(spent)}}}\n'.encode())
        self.fh.flush()
        if time.monotonic() - self.synced >= self.fsync_s:
            os.fsync(self.fh.fileno())
            self.synced = time.monotonic()

    def close(self) -> None:
        if self.enabled and not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
