"""The Files and Batches APIs of the test server (tests/openai_server.py).

Batches move validating → in_progress → finalizing → completed, one step each time a
client retrieves them, so tests drive them by polling. `hold` keeps batches at a status;
`fates` decides what happens to the next batches created:

    completed   every line answered through the server's chat completion (its faults
                apply: a 5xx goes to the error file, a dropped request is missing)
    failed      the batch fails validation: no output at all
    expired     half the lines run; the rest are in the error file as batch_expired
    malformed   completed, but the first output line is cut off

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
        self.lock = threading.Lock()
        self.files: dict[str, dict[str, Any]] = {}  # id -> {"data": bytes, "purpose": str}
        self.batches: dict[str, dict[str, Any]] = {}
        self.hold: str | None = None
        self.fates: list[str] = []
        self.drop_create = 0
        self.submitted: Counter[str] = Counter()  # custom_id -> times submitted
        self.live_overlaps: list[str] = []
        self.created = 0

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
        ids = [json.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]
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

    def list(self) -> dict:
        with self.lock:
            data = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
        return {"object": "list", "data": [self._public(b) for b in data], "has_more": False}

    def statuses(self) -> Counter[str]:
        with self.lock:
            return Counter(b["status"] for b in self.batches.values())

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _advance(self, batch: dict) -> None:
        status = batch["status"]
        if status in TERMINAL or status == self.hold:
            return
        now = int(time.time())
        if status == "cancelling":
            batch.update(status="cancelled", cancelled_at=now)
            return
        if status == "validating" and batch["_fate"] == "failed":
            batch.update(
                status="failed",
                failed_at=now,
                errors={
                    "object": "list",
                    "data": [{"code": "invalid_request", "message": "the input was refused"}],
                },
            )
            return
        nxt = NEXT[status]
        if nxt == "completed":
            self._run(batch)
            nxt = "expired" if batch["_fate"] == "expired" else "completed"
        batch["status"] = nxt
        batch[f"{nxt}_at"] = now

    def _run(self, batch: dict) -> None:
        """Answer the lines; write the output and error files."""
        lines = [json.loads(line) for line in self.content(batch["input_file_id"]).splitlines()]
        ran = lines[: len(lines) // 2] if batch["_fate"] == "expired" else lines
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
                        "error": {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the "
                            "completion window expired.",
                        },
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
                data = ("\n".join(rows) + "\n").encode()
                batch[name] = self._add_file(data, "batch_output", f"{batch['id']}.jsonl")["id"]
