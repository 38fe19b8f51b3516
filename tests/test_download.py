"""`recaption download`: img2dataset end to end against an image server on loopback (some
URLs 404, one too slow, one an HTML page), then `recaption run` on its shards: every URL is
accounted for in the corpus."""

import contextlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_pipeline import assert_invariant

from recaption.config import load_config
from recaption.download import download, input_format
from recaption.pipeline import run


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64 + 8 * i, 48), (40 * i % 256, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


class Images(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:  # the downloader gave up on the slow URL: nothing to answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().handle()

    def do_GET(self) -> None:
        if self.path.startswith("/img/"):
            body, kind = jpeg(int(self.path.split("/")[-1].split(".")[0])), "image/jpeg"
        elif self.path == "/slow.jpg":
            time.sleep(4)  # past the download timeout
            body, kind = jpeg(1), "image/jpeg"
        elif self.path == "/page.html":
            body, kind = b"<html><body>not an image</body></html>", "text/html"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_then_run_accounts_for_every_url(ray_cluster, image_server, tmp_path):
    good = [f"{image_server}/img/{i}.jpg" for i in range(14)]
    bad = [f"{image_server}/missing/{i}.jpg" for i in range(3)]
    urls = good + bad + [f"{image_server}/slow.jpg", f"{image_server}/page.html"]
    table = pa.table({"url": urls, "alt": [f"alt text {i}" for i in range(len(urls))]})
    pq.write_table(table, tmp_path / "urls.parquet")
    shards = tmp_path / "shards"
    totals = download(
        tmp_path / "urls.parquet",
        shards,
        url_col="url",
        caption_col="alt",
        processes=1,
        threads=4,
        per_shard=8,
        timeout_s=2,
    )
    assert totals["count"] == len(urls) and totals["successes"] == len(good)
    assert totals["shards"] == 3  # 19 URLs, 8 a shard
    metadata = [
        row
        for path in sorted(shards.glob("*.parquet"))
        for row in pq.read_table(path, columns=["key", "url", "status"]).to_pylist()
    ]
    assert sorted(r["url"] for r in metadata) == sorted(urls)

    corpus = tmp_path / "corpus"
    cfg = load_config("pipelines/default.yaml", [f"input.path={shards}", f"output.path={corpus}"])
    summary = run(cfg, show_progress=False)
    assert len(summary.finished) == 3
    expected = {}
    for path in sorted(shards.glob("*.parquet")):
        expected[path.stem] = set(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    assert_invariant(corpus, expected)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == len(urls)  # the manifest matches the URL list
    assert manifest["totals"]["rejected_by_reason"]["download_failed"] == len(urls) - len(good)
    rows = pq.read_table(corpus / "data", columns=["url", "alt_text"]).to_pylist()
    assert {r["url"] for r in rows} <= set(good)
    assert all(r["alt_text"].startswith("alt text ") for r in rows)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("urls.txt", "txt"),
        ("laion.parquet", "parquet"),
        ("x.csv.gz", "csv.gz"),
        ("a.jsonl", "jsonl"),
    ],
)
def test_the_url_list_format_comes_from_its_name(tmp_path, name, fmt):
    assert input_format(tmp_path / name) == fmt


def test_an_unknown_url_list_is_one_clear_error(tmp_path):
    from recaption.cli import main

    (tmp_path / "urls.xlsx").write_bytes(b"x")
    assert main(["download", str(tmp_path / "urls.xlsx"), str(tmp_path / "out")]) == 2
