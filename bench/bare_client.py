"""The floor for client CPU per request: a bare asyncio + httpx loop, no pipeline.

For each image of the shards' tars: read it, (optionally) decode, resize and re-encode it
with Pillow, hash and base64 it, POST the same chat-completions request recaption sends
(same prompt and schema) over kept-alive connections, at most `--rpm` a minute and 32 in
flight, and parse the JSON answer. Prints its CPU time per request as JSON. Used by
bench/openai_bench.py (`--only floor`), which runs it beside recaption on the same server.

    python bench/bare_client.py http://127.0.0.1:PORT/v1 SHARDS_DIR [--resize 512]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import resource
import sys
import tarfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recaption.captioners.prompt import USER_TEXT, load_prompt
from recaption.records import Caption


def images(shards: Path):
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    yield tar.extractfile(member).read()


def reencode(data: bytes, side: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (side, side))
    im = im.convert("RGB")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("shards", type=Path)
    parser.add_argument("--rpm", type=float, default=6000)
    parser.add_argument("--resize", type=int)
    args = parser.parse_args()
    _, prompt = load_prompt("dense-v1")
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "caption", "strict": True, "schema": Caption.model_json_schema()},
    }
    headers = {"authorization": "Bearer not-needed", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    gap, sent, ok = 60 / args.rpm, 0, 0
    slots = asyncio.Semaphore(32)

    async def one(client: httpx.AsyncClient, data: bytes) -> None:
        nonlocal ok
        try:
            if args.resize:
                data = reencode(data, args.resize)
            hashlib.sha256(data).hexdigest()
            url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
            body = {
                "model": "gpt-4.1",
                "messages": [
                    {"role": "system", "content": prompt},
                    {"role": "user", "content": [
                        {"type": "text", "text": USER_TEXT},
                        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                    ]},
                ],
                "max_completion_tokens": 600,
                "response_format": schema,
            }  # fmt: skip
            resp = await client.post(f"{args.url}/chat/completions", content=json.dumps(body))
            if resp.status_code == 200:
                json.loads(resp.json()["choices"][0]["message"]["content"])
                ok += 1
        finally:
            slots.release()

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
        tasks = set()
        for data in images(args.shards):
            await slots.acquire()
            delay = start + sent * gap - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent += 1
            task = asyncio.create_task(one(client, data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"requests": sent, "ok": ok, "cpu_ms_per_request": 1000 * cpu / sent,
                      "wall_s": time.monotonic() - start}))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
