"""An OpenAI-compatible chat-completions server on loopback, for the tests and bench/.

It meters requests and tokens per minute the way the hosted API does: a bucket per limit
that refills continuously and holds a minute's quota; tokens are charged as prompt tokens
plus the `max_completion_tokens` asked for; a refused request gets 429 with `retry-after`,
`retry-after-ms` and `x-ratelimit-*` headers, and every answer carries the headers. It has
a log-normal latency and injects faults at set rates. It also serves Azure's deployment
paths (`/openai/deployments/NAME/chat/completions?api-version=...`, `api-key` header),
and the Files and Batches APIs (tests/batch_api.py) for the Batch API mode.

    with OpenAIServer(rpm=600, latency_ms=500, faults=Faults(server_error=0.03)) as server:
        server.url   # http://127.0.0.1:PORT/v1

Alone (for bench/): `python -m tests.openai_server --rpm 600 --latency-ms 500` prints its
URL; GET /_stats returns the request log, POST /_storm {"seconds": 10} refuses everything.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import math
import random
import re
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from recaption.pricing import image_tokens

try:
    from batch_api import BatchAPI  # tests/ on the path: pytest, bench/
except ImportError:
    from tests.batch_api import BatchAPI  # python -m tests.openai_server

MODEL = "gpt-4.1"
REFUSAL = "I'm sorry, I can't help with describing this image."


@dataclass
class Faults:
    """Share of requests (0..1) that meet each fault, drawn independently per request."""

    server_error: float = 0.0  # 500 or 503 with an error body
    rate_limit: float = 0.0  # a 429 beyond the quota (retry-after-ms 200)
    drop: float = 0.0  # the connection is closed without an answer
    broken_json: float = 0.0  # the reply is cut-off JSON with finish_reason "stop"
    refusal: float = 0.0
    truncation: float = 0.0  # finish_reason "length", the reply cut
    schema_invalid: float = 0.0  # valid JSON without the schema's fields


_FAULT_STATUS = {"server_error": 503, "rate_limit": 429, "drop": 0}  # 0: dropped


@dataclass
class Event:
    t: float  # arrival, seconds since the server started
    status: int  # 0: dropped
    kind: str  # ok, quota, storm, or the fault injected
    charged_tokens: int = 0
    image: str = ""  # a hash of the image sent, to spot a paid call made twice


def repeated_successes(events: list[Event]) -> int:
    """Successful requests for an image that had already been answered successfully."""
    ok = Counter(e.image for e in events if e.status == 200 and e.kind == "ok")
    return sum(n - 1 for n in ok.values())


class _Bucket:
    def __init__(self, per_minute: int, burst_s: float):
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.updated = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate)


def count_text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def caption_for(image: Image.Image) -> dict:
    """A plausible ~90-word caption from the image's size and colour, deterministic."""
    r, g, b = (int(v) for v in image.resize((1, 1)).getpixel((0, 0)))
    tone = max((r, "red"), (g, "green"), (b, "blue"))[1]
    light = "bright" if (r + g + b) / 3 > 128 else "dark"
    w, h = image.size
    shape = "landscape" if w > h else "portrait" if h > w else "square"
    caption = (
        f"A {light} {shape} photograph in which {tone} tones dominate the frame. "
        "The main subject sits near the centre of the picture, set against a softer background "
        "that falls slightly out of focus towards the edges. Light comes from the upper left and "
        "casts gentle shadows to the right of the subject, giving the scene a calm and even look. "
        f"The colours are natural, with the {tone} hues balanced by neutral greys and a few warm "
        "highlights. Fine texture is visible on the nearest surfaces, and the composition leaves "
        "open space around the subject."
    )
    return {
        "caption": caption,
        "caption_short": f"A {light} {shape} photograph dominated by {tone} tones.",
        "objects": ["main subject", "background"],
        "visible_text": [],
        "style": "photograph",
    }


class OpenAIServer:
    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        latency_ms: float = 0.0,
        latency_sigma: float = 0.25,
        faults: Faults | None = None,
        seed: int = 0,
        api_key: str | None = None,
        structured_output: bool = True,
        json_mode: bool = True,
        models: set[str] | None = None,
        burst_s: float = 60.0,
        port: int = 0,
    ):
        """`burst_s`: how much quota a bucket holds; 60 is a minute's, smaller values model
        a quota enforced over shorter periods (OpenAI: "60k RPM may be enforced as 1k/s")."""
        self.rpm, self.tpm = rpm, tpm
        self.latency_ms, self.latency_sigma = latency_ms, latency_sigma
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.api_key = api_key
        self.structured_output, self.json_mode = structured_output, json_mode
        self.models = models  # None: any model name is served
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.kinds: Counter[str] = Counter()
        self.requests_seen: list[dict] = []  # request bodies, images elided, for tests
        self.in_flight = self.peak_in_flight = 0  # chat completions being answered
        self.connections: set = set()  # open client sockets, for kill()
        self.dead = False
        self.storm_until = 0.0
        self.storm_retry_after = 0.0
        self.storms: list[tuple[float, float]] = []
        self.started = time.monotonic()
        self.requests = _Bucket(rpm, burst_s) if rpm else None
        self.tokens = _Bucket(tpm, burst_s) if tpm else None
        self.batch_api = BatchAPI(self)  # /v1/files and /v1/batches
        self.httpd = _HTTPServer(("127.0.0.1", port), _handler(self))
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpenAIServer:
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kill(self) -> None:
        """Die as a crashed server does: requests in flight get no answer, open connections
        are closed, new ones are refused."""
        with self.lock:
            self.dead = True
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(2)
        self.stop()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def storm(self, seconds: float, retry_after: float | None = None) -> None:
        """Refuse every request for `seconds` with 429 and `retry-after`."""
        with self.lock:
            now = time.monotonic()
            self.storm_until = now + seconds
            self.storm_retry_after = seconds if retry_after is None else retry_after
            self.storms.append((now - self.started, now - self.started + seconds))

    def stats(self) -> dict:
        with self.lock:
            return {
                "events": [asdict(e) for e in self.events],
                "storms": list(self.storms),
                "kinds": dict(self.kinds),
                "started": self.started,  # time.monotonic() of t=0, the same in every process
            }

    @staticmethod
    def input_tokens(body: dict) -> int:
        """A request's input tokens as the API counts them: its text, and each image by the
        model's rule (what the Batch API's enqueued-token quota counts)."""
        text, tokens = "", 3 * len(body["messages"])
        for message in body["messages"]:
            parts = (
                [message["content"]] if isinstance(message["content"], str) else message["content"]
            )
            for part in parts:
                if isinstance(part, str) or part.get("type") == "text":
                    text += part if isinstance(part, str) else part.get("text", "")
                elif part.get("type") == "image_url":
                    im = _decode_image(part["image_url"]["url"])
                    detail = part["image_url"].get("detail", "high")
                    tokens += image_tokens(body.get("model", MODEL), *im.size, detail)
        return tokens + count_text_tokens(text)

    def complete(
        self, body: dict, path: str, metered: bool = True
    ) -> tuple[int, dict | None, dict]:
        """(status, JSON body, headers) for one chat completion; status 0: drop the connection.
        `metered` False (a batch line): no rate limits, no latency, faults still drawn."""
        fmt = (body.get("response_format") or {}).get("type")
        text = "".join(
            part if isinstance(part, str) else part.get("text", "")
            for message in body["messages"]
            for part in (
                [message["content"]] if isinstance(message["content"], str) else message["content"]
            )
        )
        with self.lock:
            self.requests_seen.append(
                {k: v for k, v in body.items() if k != "messages"}
                | {"text": text, "path": path, "batch": not metered}
            )
        if fmt == "json_schema" and not self.structured_output:
            return _error(
                400,
                "response_format of type json_schema is not supported by this model",
                "invalid_request_error",
            )
        if fmt == "json_object" and not self.json_mode:
            return _error(
                400, "response_format json_object is not supported", "invalid_request_error"
            )
        images = [
            (_decode_image(part["image_url"]["url"]), part["image_url"])
            for message in body["messages"]
            if not isinstance(message["content"], str)
            for part in message["content"]
            if part["type"] == "image_url"
        ]
        if not images:
            return _error(400, "Invalid image: none was sent", "invalid_request_error")
        model = body.get("model", MODEL)
        if self.models is not None and model not in self.models:
            return _error(404, f"The model `{model}` does not exist", "not_found")
        prompt_tokens = count_text_tokens(text) + 3 * len(body["messages"])
        for im, part in images:
            prompt_tokens += image_tokens(model, *im.size, part.get("detail", "high"))
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 4096)
        digest = hashlib.sha1(images[0][1]["url"].encode()).hexdigest()[:16]
        kind, headers, delay = self.admit(prompt_tokens, max_tokens, digest, metered)
        if kind == "storm":  # as an overloaded gateway does: whole seconds only
            headers = {"retry-after": str(math.ceil(delay))}
            return _error(429, "Rate limit reached. Please retry later.", "requests", headers)
        if kind in ("quota", "rate_limit"):
            wait = delay if kind == "quota" else 0.2
            headers = headers | {
                "retry-after-ms": str(int(wait * 1000)),
                "retry-after": str(math.ceil(wait)),
            }
            return _error(429, "Rate limit reached. Please retry later.", "requests", headers)
        if kind == "drop":
            return 0, None, {}
        time.sleep(delay)
        if kind == "server_error":
            return _error(503, "The server is overloaded.", "server_error", headers)
        payload = _completion(model, images[0][0], fmt, kind, prompt_tokens, max_tokens)
        return 200, payload, headers

    # -- one request: the decisions, under the lock ----------------------------------------

    def _log(self, now: float, status: int, kind: str, charged: int = 0, image: str = "") -> None:
        self.events.append(Event(now - self.started, status, kind, charged, image))
        self.kinds[kind] += 1

    def _ratelimit_headers(self) -> dict[str, str]:
        headers = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket:
                headers[f"x-ratelimit-limit-{name}"] = str(round(bucket.rate * 60))
                headers[f"x-ratelimit-remaining-{name}"] = str(int(bucket.level))
                reset = (bucket.capacity - bucket.level) / bucket.rate
                headers[f"x-ratelimit-reset-{name}"] = f"{reset:.3f}s"
        return headers

    def _fault(self) -> str:
        for name, rate in asdict(self.faults).items():
            if rate and self.rng.random() < rate:
                return name
        return "ok"

    def admit(
        self, prompt_tokens: int, max_tokens: int, image: str = "", metered: bool = True
    ) -> tuple[str, dict[str, str], float]:
        """(kind, headers, retry_after_s): kind is "ok", "storm", "quota" or a fault.
        Unmetered (a batch line): only the faults apply."""
        with self.lock:
            now = time.monotonic()
            if not metered:
                kind = self._fault()
                self._log(
                    now,
                    _FAULT_STATUS.get(kind, 200),
                    kind,
                    0,
                    image,
                )
                return kind, {}, 0.0
            if now < self.storm_until:
                self._log(now, 429, "storm")
                return "storm", {}, self.storm_retry_after
            charge = prompt_tokens + max_tokens
            wait = 0.0
            for bucket, amount in ((self.requests, 1), (self.tokens, charge)):
                if bucket:
                    bucket.refill(now)
                    wait = max(wait, bucket.wait(amount))
            if wait > 0:
                self._log(now, 429, "quota")
                return "quota", self._ratelimit_headers(), wait
            if self.requests:
                self.requests.level -= 1
            if self.tokens:
                self.tokens.level -= charge
            headers = self._ratelimit_headers()
            kind = self._fault()
            status = _FAULT_STATUS.get(kind, 200)
            self._log(now, status, kind, charge, image)
            delay = 0.0
            if self.latency_ms:
                delay = self.rng.lognormvariate(
                    math.log(self.latency_ms / 1000), self.latency_sigma
                )
            return kind, headers, delay


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 resets connections under a burst


def _completion(
    model: str,
    image: Image.Image,
    fmt: str | None,
    kind: str,
    prompt_tokens: int,
    max_tokens: int,
) -> dict:
    content: str | None = json.dumps(caption_for(image))
    if fmt is None:  # plain text mode: models like to fence their JSON
        content = f"Here is the JSON:\n```json\n{content}\n```"
    finish, refusal = "stop", None
    if kind == "refusal":
        content, refusal = (None, REFUSAL) if fmt == "json_schema" else (REFUSAL, None)
    elif kind == "truncation":
        content, finish = content[: len(content) // 2], "length"
    elif kind == "broken_json":
        content = content[:-25]
    elif kind == "schema_invalid":
        content = json.dumps({"description": "a picture", "tags": ["picture"]})
    completion_tokens = count_text_tokens(content or refusal or "")
    if finish == "length":
        completion_tokens = max_tokens
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(
    status: int, message: str, kind: str, headers: dict | None = None
) -> tuple[int, dict, dict]:
    return (
        status,
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        headers or {},
    )


def _decode_image(url: str) -> Image.Image:
    match = re.match(r"data:image/[a-z]+;base64,(.*)", url, re.DOTALL)
    if not match:
        raise ValueError("image_url must be a base64 data URL")
    im = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    im.load()
    return im.convert("RGB")


def _handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
        timeout = 30

        def log_message(self, *args) -> None:  # quiet
            pass

        def handle(self) -> None:
            with server.lock:
                server.connections.add(self.connection)
            # the client went away (a killed worker): nothing to answer
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                    super().handle()
            finally:
                with server.lock:
                    server.connections.discard(self.connection)

        def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str, headers=None) -> None:
            self._send(*_error(status, message, kind, headers))

        def _authorised(self) -> bool:
            if server.api_key is None:
                return True
            bearer = self.headers.get("authorization", "")
            if (
                bearer == f"Bearer {server.api_key}"
                or self.headers.get("api-key") == server.api_key
            ):
                return True
            self._error(401, "Incorrect API key provided.", "invalid_request_error")
            return False

        def do_GET(self) -> None:
            if self.path == "/_stats":
                return self._send(200, server.stats())
            if not self._authorised():
                return None
            if self.path.rstrip("/").endswith("/models"):
                return self._send(
                    200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
                )
            return self._batch_api("GET", b"")

        def _batch_api(self, method: str, raw: bytes) -> None:
            """The Files and Batches routes (OpenAI's /v1/... and Azure's /openai/...)."""
            api, path = server.batch_api, self.path.split("?")[0].rstrip("/")
            found: Any = None
            if method == "POST" and path.endswith("/files"):
                found = api.upload(self.headers["content-type"], raw)
            elif method == "POST" and path.endswith("/batches"):
                found, answer = api.create(json.loads(raw))
                if not answer:  # the batch exists; the client never hears of it
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
            elif m := re.search(r"/batches/([^/]+)/cancel$", path):
                found = api.cancel(m.group(1)) if method == "POST" else None
            elif method == "GET" and path.endswith("/batches"):
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                found = api.list(int(query.get("limit", 20)), query.get("after"))
            elif method == "DELETE" and (m := re.search(r"/files/([^/]+)$", path)):
                found = api.delete(m.group(1))
            elif method == "GET" and (m := re.search(r"/batches/([^/]+)$", path)):
                found = api.retrieve(m.group(1))
            elif method == "GET" and (m := re.search(r"/files/([^/]+)/content$", path)):
                data = api.content(m.group(1))
                if data is not None:
                    self.send_response(200)
                    self.send_header("content-type", "application/octet-stream")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
            if found is None:
                return self._error(404, f"no route or no such object: {self.path}", "not_found")
            return self._send(200, found)

        def do_DELETE(self) -> None:
            if self._authorised():
                self._batch_api("DELETE", b"")

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            raw = self.rfile.read(length)
            if self.path == "/_storm":
                args = json.loads(raw or b"{}")
                server.storm(float(args.get("seconds", 10)), args.get("retry_after"))
                return self._send(200, {"ok": True})
            if not self._authorised():
                return None
            if not self.path.split("?")[0].endswith("/chat/completions"):
                return self._batch_api("POST", raw)
            try:
                body = json.loads(raw)
                return self._complete(body)
            except (ValueError, KeyError, OSError) as exc:
                return self._error(400, f"Invalid request: {exc}", "invalid_request_error")

        def _complete(self, body: dict) -> None:
            with server.lock:
                server.in_flight += 1
                server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
            try:
                status, payload, headers = server.complete(body, self.path)
            finally:
                with server.lock:
                    server.in_flight -= 1
            if status == 0 or server.dead:  # the connection is closed without an answer
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            return self._send(status, payload, headers)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--latency-ms", type=float, default=500)
    parser.add_argument("--burst-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = OpenAIServer(
        rpm=args.rpm,
        tpm=args.tpm,
        latency_ms=args.latency_ms,
        seed=args.seed,
        burst_s=args.burst_s,
        port=args.port,
    )
    print(server.url, flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
