"""The Files and Batches APIs of the test server (tests/openai_server.py), with the real
service's limits (shared/reference/openai-limits.md).

Batches move validating → in_progress → finalizing → completed, one step each time a
client retrieves them, so tests drive them by polling; with `turnaround_s` they move by the
clock instead (validated at once, completed that long after creation). `hold` keeps
batches at a status, `holds` each of the next batches created at its own (`release()` lets
them all go); `fates` decides what happens to the next batches created:

    completed   every line answered through the server's chat completion (its faults
                apply: a 5xx goes to the error file, a dropped request is missing)
    failed      the batch fails validation (invalid_request): no output at all
    bad_line    it fails validation naming its first line (invalid_request, line 1)
    expired     half the lines run; the rest are in the error file as batch_expired
    malformed   completed, but the first output line is cut off

`enqueued_limit`: the organisation's enqueued-token quota per model: the input tokens of
its batches validating, in progress or finalizing. A batch past it is still created
(validating) and then fails validation with `token_limit_exceeded` and no output, as the
real API does; `peak_enqueued` is the most it ever held. A cancelled batch keeps the lines
that ran (half, here) in its output; the rest are in its error file. Listing is newest
first and paginated (`limit` at most `page_max`, `after`, `has_more`). Files can be
deleted; `files` holds what is left.

`drop_create` loses the answer to the next batch creations (the batch exists; the client
does not hear of it). `live_overlaps` lists custom_ids submitted while a batch holding
them was live: a client must never cause one.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from collections import Counter
from typing import Any

TERMINAL = ("completed", "failed", "expired", "cancelled")
NEXT = {"validating": "in_progress", "in_progress": "finalizing", "finalizing": "completed"}


class BatchAPI:
    def __init__(self, server: Any):
        self.server = server  # the OpenAIServer whose chat completion answers the lines
        self.lock = threading.RLock()  # _step answers lines and adds files while holding it
        self.files: dict[str, dict[str, Any]] = {}  # id -> {"data": bytes, "purpose": str}
        self.batches: dict[str, dict[str, Any]] = {}
        self.hold: str | None = None
        self.holds: list[str] = []  # the next batches' own holds, one each
        self.fates: list[str] = []
        self.drop_create = 0
        self.submitted: Counter[str] = Counter()  # custom_id -> times submitted
        self.live_overlaps: list[str] = []
        self.created = 0
        self.enqueued_limit: int | None = None  # per model
        self.peak_enqueued = 0
        self.turnaround_s: float | None = None
        self.page_max = 100
        self.deleted: set[str] = set()

    # -- files --------------------------------------------------------------------------------

    def upload(self, content_type: str, raw: bytes) -> dict:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"content-type: {content_type}\r\n\r\n".encode() + raw
        )
        fields = {
            part.get_param("name", header="content-disposition"): part
            for part in message.iter_parts()
        }
        data = fields["file"].get_payload(decode=True)
        purpose = fields["purpose"].get_payload(decode=True).decode()
        return self._add_file(data, purpose, fields["file"].get_filename() or "upload.jsonl")

    def _add_file(self, data: bytes, purpose: str, name: str) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }
        with self.lock:
            self.files[file_id] = {"data": data, "meta": meta}
        return meta

    def delete(self, file_id: str) -> dict | None:
        with self.lock:
            if self.files.pop(file_id, None) is None:
                return None
            self.deleted.add(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def content(self, file_id: str) -> bytes | None:
        with self.lock:
            found = self.files.get(file_id)
        return found["data"] if found else None

    # -- batches ------------------------------------------------------------------------------

    def create(self, body: dict) -> tuple[dict | None, bool]:
        """(the batch, whether to answer); None if its input file does not exist."""
        data = self.content(body["input_file_id"])
        if data is None:
            return None, True
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        ids = [line["custom_id"] for line in lines]
        tokens = sum(self.server.input_tokens(line["body"]) for line in lines)
        model = lines[0]["body"].get("model", "") if lines else ""
        now = int(time.time())
        with self.lock:
            live = {
                cid
                for b in self.batches.values()
                if b["status"] not in TERMINAL
                for cid in b["_ids"]
            }
            self.live_overlaps += [cid for cid in ids if cid in live]
            self.submitted.update(ids)
            fate = self.fates.pop(0) if self.fates else "completed"
            hold = self.holds.pop(0) if self.holds else None
            held = self._enqueued(model)
            if self.enqueued_limit is not None and held + tokens > self.enqueued_limit:
                fate = "token_limit"  # created all the same; it fails at validation
            else:
                self.peak_enqueued = max(self.peak_enqueued, held + tokens)
            batch = {
                "id": f"batch_{uuid.uuid4().hex[:16]}",
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": "validating",
                "created_at": now,
                "metadata": body.get("metadata"),
                "request_counts": {"total": len(ids), "completed": 0, "failed": 0},
                "_ids": ids,
                "_fate": fate,
                "_hold": hold,
                "_tokens": tokens,
                "_model": model,
                "_created": time.monotonic(),
            }
            self.batches[batch["id"]] = batch
            self.created += 1
            answer = self.drop_create <= 0
            self.drop_create -= 1
        return self._public(batch), answer

    def retrieve(self, batch_id: str) -> dict | None:
        with self.lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            return None
        self._advance(batch)
        return self._public(batch)

    def cancel(self, batch_id: str) -> dict | None:
        with self.lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            if batch["status"] not in TERMINAL:
                batch["status"] = "cancelling"
                batch["cancelling_at"] = int(time.time())
        return self._public(batch)

    def _enqueued(self, model: str) -> int:
        """Input tokens of the model's live batches (the lock held)."""
        return sum(
            b["_tokens"]
            for b in self.batches.values()
            if b["_model"] == model
            and b["status"] in ("validating", "in_progress", "finalizing")
            and b["_fate"] != "token_limit"
        )

    def list(self, limit: int = 20, after: str | None = None) -> dict:
        """Newest first, a page at a time, as the real API pages."""
        limit = max(1, min(limit, self.page_max))
        with self.lock:
            data = sorted(self.batches.values(), key=lambda b: b["_created"], reverse=True)
        if after is not None:
            ids = [b["id"] for b in data]
            data = data[ids.index(after) + 1 :] if after in ids else []
        page = data[:limit]
        return {
            "object": "list",
            "data": [self._public(b) for b in page],
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(data) > limit,
        }

    def release(self) -> None:
        with self.lock:
            self.hold = None
            for batch in self.batches.values():
                batch["_hold"] = None

    def statuses(self) -> Counter[str]:
        with self.lock:
            return Counter(b["status"] for b in self.batches.values())

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _advance(self, batch: dict) -> None:
        with self.lock:  # one step at a time, even under concurrent polls
            self._step(batch)

    def _step(self, batch: dict) -> None:
        status = batch["status"]
        if status in TERMINAL or status in (self.hold, batch["_hold"]):
            return
        now = int(time.time())
        if status == "cancelling":
            if batch.get("_ran") is None:  # what had run before the cancel is kept
                self._run(batch, partial=True)
            batch.update(status="cancelled", cancelled_at=now)
            return
        if status == "validating" and batch["_fate"] in ("failed", "bad_line", "token_limit"):
            code, message = "invalid_request", "the input was refused"
            if batch["_fate"] == "bad_line":
                message = "line 1: the image could not be read"
            elif batch["_fate"] == "token_limit":
                code = "token_limit_exceeded"
                message = (
                    f"Enqueued token limit reached for {batch['_model']} in organization "
                    f"org-test. Limit: {self.enqueued_limit:,} enqueued tokens. Please try "
                    "again once some in_progress batches have been completed."
                )
            batch.update(
                status="failed",
                failed_at=now,
                errors={
                    "object": "list",
                    "data": [
                        {
                            "code": code,
                            "message": message,
                            "param": None,
                            "line": 1 if batch["_fate"] == "bad_line" else None,
                        }
                    ],
                },
            )
            return
        if self.turnaround_s is not None and status != "validating":
            if time.monotonic() - batch["_created"] < self.turnaround_s:
                return  # still running: a real batch takes its time
            status = "finalizing"
        nxt = NEXT[status]
        if nxt == "completed":
            self._run(batch)
            nxt = "expired" if batch["_fate"] == "expired" else "completed"
        batch["status"] = nxt
        batch[f"{nxt}_at"] = now
        batch["_ended"] = time.monotonic()

    def _run(self, batch: dict, partial: bool = False) -> None:
        """Answer the lines (half of them, for an expired or cancelled batch); write the
        output and error files."""
        batch["_ran"] = True
        data = self.files.get(batch["input_file_id"], {}).get("data", b"")
        lines = [json.loads(line) for line in data.splitlines()]
        cut = partial or batch["_fate"] == "expired"
        ran = lines[: len(lines) // 2] if cut else lines
        reason = ("batch_cancelled", "The batch was cancelled before this request ran.")
        if not partial:
            reason = (
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            )
        output, errors = [], []
        for line in ran:
            status, payload, _ = self.server.complete(line["body"], line["url"], metered=False)
            if status == 0:
                continue  # lost: in neither file
            result = {
                "id": f"batch_req_{uuid.uuid4().hex[:12]}",
                "custom_id": line["custom_id"],
                "response": {
                    "status_code": status,
                    "request_id": uuid.uuid4().hex,
                    "body": payload,
                },
                "error": None,
            }
            (output if status == 200 else errors).append(json.dumps(result))
        for line in lines[len(ran) :]:
            errors.append(
                json.dumps(
                    {
                        "id": f"batch_req_{uuid.uuid4().hex[:12]}",
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": {"code": reason[0], "message": reason[1]},
                    }
                )
            )
        if batch["_fate"] == "malformed" and output:
            output[0] = output[0][: len(output[0]) // 2]
        batch["request_counts"] = {
            "total": len(lines),
            "completed": len(output),
            "failed": len(errors),
        }
        for name, rows in (("output_file_id", output), ("error_file_id", errors)):
            if rows:
                out = ("\n".join(rows) + "\n").encode()
                batch[name] = self._add_file(out, "batch_output", f"{batch['id']}.jsonl")["id"]
