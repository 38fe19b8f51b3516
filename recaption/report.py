"""`recaption report CORPUS`: a static HTML page that puts each image beside its alt text and
its new captions, with the run's counts. It opens from disk; no server needed."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from recaption.sinks import DATA_DIR, load_manifest

_COLUMNS = [
    "key",
    "image",
    "alt_text",
    "caption",
    "caption_short",
    "objects",
    "visible_text",
    "style",
]


def _thumbnail(data: bytes | None, side: int = 256) -> str:
    if not data:
        return ""
    im = Image.open(io.BytesIO(data))
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=80)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def sample_rows(corpus: Path, limit: int) -> list[dict]:
    """The first `limit` rows across data/ shards, read one row group at a time."""
    rows: list[dict] = []
    for path in sorted((corpus / DATA_DIR).glob("*.parquet")):
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            rows += file.read_row_group(group, columns=_COLUMNS).to_pylist()[: limit - len(rows)]
            if len(rows) >= limit:
                return rows
    return rows


def write_report(corpus: Path, limit: int = 60) -> Path:
    manifest = load_manifest(corpus)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {corpus}: is it a recaption corpus?")
    totals = manifest.totals
    esc = html.escape
    reasons = (
        "".join(f"<li>{esc(k)}: {v}</li>" for k, v in totals.get("rejected_by_reason", {}).items())
        or "<li>none</li>"
    )
    cards = []
    for row in sample_rows(corpus, limit):
        alt = row["alt_text"]
        cards.append(
            "<tr>"
            f"<td>{_thumbnail(row['image'])}<div class=k>{esc(row['key'])}</div></td>"
            f"<td class=alt>{esc(alt) if alt else '<i>(no alt text)</i>'}</td>"
            f"<td>{esc(row['caption'])}<p class=short>{esc(row['caption_short'])}</p>"
            f"<p class=meta>style: {esc(row['style'])} · objects: {esc(', '.join(row['objects']) or '-')}"
            f" · text: {esc(' | '.join(row['visible_text']) or '-')}</p></td>"
            "</tr>"
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>recaption corpus: {esc(str(corpus))}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
td {{ border-top: 1px solid #ddd; padding: 10px; vertical-align: top; }}
td.alt {{ width: 14em; color: #a33; }}
img {{ max-width: 256px; }}
.k, .meta {{ color: #777; font-size: 12px; }} .short {{ font-style: italic; }}
</style></head><body>
<h1>recaption corpus</h1>
<p>{totals.get("samples", 0)} samples in {totals.get("shards", 0)} shards: <b>{totals.get("captioned", 0)}</b>
captioned, {totals.get("rejected", 0)} rejected. Captioner: {esc(str(manifest.config.get("captioner", {}).get("backend")))}.</p>
<h2>Rejections</h2><ul>{reasons}</ul>
<h2>Alt text vs. new captions (first {len(cards)} rows)</h2>
<table><tr><th>image</th><th>web alt text</th><th>dense caption · short caption</th></tr>
{"".join(cards)}
</table></body></html>
"""
    out = corpus / "report" / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
