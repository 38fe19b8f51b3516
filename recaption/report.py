"""`recaption report CORPUS`: see the corpus without a notebook.

Writes CORPUS/report/:

    index.html    opens from disk: the numbers, the plots, and a filterable contact sheet
                  (image | alt text | dense caption | short caption | objects | text)
    report.json   the same numbers, for scripts (recaption/stats.py says what they are)
    *.png         plots: words per caption (alt text against the new captions),
                  rejections, tokens per image, throughput over time, top objects
    thumbs/       the contact sheet's thumbnails

Two passes over data/, one row group at a time: the first streams the statistics
(without the image column) and draws the contact sheet's rows by reservoir sampling;
the second reads images only from the row groups that hold a drawn row.
"""

from __future__ import annotations

import html
import io
import json
import random
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from recaption.corpus import DATA_DIR, REJECTED_DIR, Committed, CorpusStore
from recaption.errors import RunError
from recaption.stats import TEXT_FIELDS, CorpusStats

SHEET_COLUMNS = ["key", "shard", "alt_text", "caption", "caption_short", "objects", "visible_text"]
STAT_COLUMNS = [
    *TEXT_FIELDS,
    "objects",
    "visible_text",
    "image_sha256",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "created_at",
    "backend",
    "model",
    "prompt_version",
]


def write_report(corpus: Path, sample: int = 200, seed: int = 0) -> Path:
    """Write CORPUS/report/ and return the path of its index.html."""
    store = CorpusStore(corpus)
    manifest = store.load_manifest()
    if manifest is None:
        raise RunError(f"no manifest.json in {corpus}: is it a recaption corpus?")
    totals = Committed.read(store, manifest).totals
    out = corpus / "report"
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    stats, drawn = _scan(corpus, sample, seed)
    report = {
        "corpus": str(corpus),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "shards": totals.shards,
        **stats.summary(),
        "requests": totals.requests,
        # dedup: copies given their first occurrence's caption (or rejected), not sent
        "duplicates": {k: n for k, n in sorted(totals.duplicates.items()) if n},
        "saved_usd": round(totals.saved_usd, 6),
        "contact_sheet": {"shown": len(drawn), "of": stats.captioned},
    }
    _thumbnails(drawn, out / "thumbs")
    plots = _plots(report, stats, out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "index.html").write_text(_page(report, drawn, plots))
    return out / "index.html"


def _files(corpus: Path, folder: str) -> list[str]:
    return list(CorpusStore(corpus).shard_files(folder).values())


def _scan(corpus: Path, sample: int, seed: int) -> tuple[CorpusStats, list[dict[str, Any]]]:
    """Statistics of every row, and `sample` rows drawn uniformly (reservoir sampling)."""
    stats, rng = CorpusStats(), random.Random(seed)
    drawn: list[dict[str, Any]] = []
    seen = 0
    for path in _files(corpus, DATA_DIR):
        file = pq.ParquetFile(path)
        names = set(file.schema_arrow.names)
        columns = [c for c in dict.fromkeys(STAT_COLUMNS + SHEET_COLUMNS) if c in names]
        for group in range(file.num_row_groups):
            rows = file.read_row_group(group, columns=columns).to_pylist()
            stats.add_data(rows)
            for index, row in enumerate(rows):
                seen += 1
                slot = len(drawn) if len(drawn) < sample else rng.randrange(seen)
                if slot < sample:
                    kept = {c: row[c] for c in SHEET_COLUMNS} | {"_at": (path, group, index)}
                    if slot == len(drawn):
                        drawn.append(kept)
                    else:
                        drawn[slot] = kept
    for path in _files(corpus, REJECTED_DIR):
        for batch in pq.ParquetFile(path).iter_batches(columns=["reason", "stage"]):
            stats.add_rejected(batch)
    drawn.sort(key=lambda r: (r["shard"], r["key"]))
    return stats, drawn


def _thumbnails(drawn: list[dict[str, Any]], folder: Path, side: int = 256) -> None:
    """Read images only from the row groups that hold a drawn row."""
    wanted: dict[tuple[str, int], list[tuple[int, dict]]] = defaultdict(list)
    for i, row in enumerate(drawn):
        path, group, index = row.pop("_at")
        row["thumb"] = None
        wanted[(path, group)].append((index, row))
        row["_name"] = f"{i:05d}.jpg"
    for (path, group), rows in wanted.items():
        file = pq.ParquetFile(path)
        if "image" not in file.schema_arrow.names:
            continue
        images = file.read_row_group(group, columns=["image"]).column("image")
        for index, row in rows:
            data = images[index].as_py()
            if not data:
                continue  # output.store_images was off
            im = Image.open(io.BytesIO(data))
            im.thumbnail((side, side))
            im.convert("RGB").save(folder / row["_name"], "JPEG", quality=82)
            row["thumb"] = f"thumbs/{row['_name']}"


# --- plots ------------------------------------------------------------------------------------


def _plots(report: dict[str, Any], stats: CorpusStats, out: Path) -> dict[str, str]:
    """name -> file of each plot drawn; a plot with nothing to show is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        made[name] = f"{name}.png"

    if stats.captioned:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        top = max(max(h.counts, default=0) for h in stats.words.values())
        bins = range(0, top + 6, max(1, (top + 6) // 40))
        for field, label in zip(
            TEXT_FIELDS, ("web alt text", "dense caption", "short caption"), strict=True
        ):
            hist = stats.words[field]
            values, weights = zip(*sorted(hist.counts.items()), strict=True)
            ax.hist(values, bins=bins, weights=weights, alpha=0.55, label=label)
        ax.set(xlabel="words per caption", ylabel="images", title="Caption length")
        ax.legend()
        save(fig, "words")

        usage = [stats.tokens["input"], stats.tokens["output"]]
        if any(h.counts.keys() - {0} for h in usage):
            fig, ax = plt.subplots(figsize=(7, 3.2))
            for hist, label in zip(usage, ("input tokens", "output tokens"), strict=True):
                values, weights = zip(*sorted(hist.counts.items()), strict=True)
                ax.hist(values, bins=40, weights=weights, alpha=0.6, label=label)
            ax.set(xlabel="tokens per image", ylabel="images", title="Tokens per image")
            ax.legend()
            save(fig, "tokens")

        bins = report["throughput"]["captions"]
        if len(bins) > 1:
            unit = "second" if report["throughput"]["bin_seconds"] == 1 else "minute"
            times = [datetime.fromisoformat(t) for t in bins]
            fig, ax = plt.subplots(figsize=(7, 3.0))
            ax.plot(times, list(bins.values()), marker=".", linewidth=1)
            ax.set(ylabel=f"captions per {unit}", title="Throughput (by created_at)")
            fig.autofmt_xdate()
            save(fig, "throughput")

        objects = report["top_objects"][:15]
        if objects:
            fig, ax = plt.subplots(figsize=(7, 0.3 * len(objects) + 1))
            ax.barh([o for o, _ in objects][::-1], [n for _, n in objects][::-1])
            ax.set(xlabel="images", title="Most frequent objects")
            save(fig, "objects")

    reasons = report["rejections"]["by_reason"]
    if reasons:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(reasons) + 1))
        ax.barh(list(reasons)[::-1], list(reasons.values())[::-1], color="#b55")
        ax.set(xlabel="samples", title="Rejections by reason")
        save(fig, "rejections")
    return made


# --- the page ---------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def _stat(report: dict[str, Any], path: str) -> str:
    """A number from report.json, tagged with its path so a test can check the two agree."""
    value: Any = report
    for part in path.split("."):
        value = value[part]
    return f'<span data-stat="{path}">{_num(value)}</span>'


def _page(report: dict[str, Any], drawn: list[dict[str, Any]], plots: dict[str, str]) -> str:
    esc = html.escape
    r = report

    def s(path: str) -> str:
        return _stat(report, path)

    def img(name: str, alt: str) -> str:
        return f'<img class=plot src="{plots[name]}" alt="{esc(alt)}">' if name in plots else ""

    copies = report.get("duplicates") or {}
    dups = (
        f"Duplicates not sent: {sum(copies.values()):,} "
        f"({', '.join(f'{n:,} {k}' for k, n in copies.items())}), "
        f"saving ${report['saved_usd']:,.4f}."
        if copies
        else ""
    )

    words = "".join(
        f"<tr><th>{label}</th>"
        + "".join(
            f"<td>{s(f'words.{field}.{k}')}</td>"
            for k in ("mean", "median", "p5", "p95", "empty_share")
        )
        + "</tr>"
        for field, label in zip(
            TEXT_FIELDS, ("web alt text", "dense caption", "short caption"), strict=True
        )
    )
    reasons = (
        "".join(
            f"<tr><td>{esc(reason)}</td><td>{s(f'rejections.by_reason.{reason}')}</td>"
            f"<td>{s(f'rejections.rate_by_reason.{reason}')}</td></tr>"
            for reason in r["rejections"]["by_reason"]
        )
        or "<tr><td colspan=3>none</td></tr>"
    )
    tops = " · ".join(f"{esc(o)} ({n})" for o, n in r["top_objects"][:20]) or "-"
    top_words = " · ".join(f"{esc(w)} ({n})" for w, n in r["top_words"][:30]) or "-"
    captioners = ", ".join(f"{esc(c)} ({n})" for c, n in r["captioners"].items()) or "-"
    rows = []
    for row in drawn:
        thumb = (
            f'<img src="{row["thumb"]}" alt="{esc(row["key"])}" loading="lazy">'
            if row["thumb"]
            else "<i>(image not stored)</i>"
        )
        has_text = "1" if row["visible_text"] else "0"
        rows.append(
            f'<tr data-text="{has_text}"><td>{thumb}<div class=k>{esc(row["shard"])}/'
            f"{esc(row['key'])}</div></td>"
            f"<td class=alt>{esc(row['alt_text']) if row['alt_text'] else '<i>(none)</i>'}</td>"
            f"<td>{esc(row['caption'])}</td><td>{esc(row['caption_short'])}</td>"
            f"<td>{esc(', '.join(row['objects']))}</td>"
            f"<td>{esc(' | '.join(row['visible_text']))}</td></tr>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>recaption report: {esc(r["corpus"])}</title>
<link rel="icon" href="data:,">
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 4px 10px; text-align: left; vertical-align: top; }}
table.nums td {{ text-align: right; }} .sheet td {{ border-top: 1px solid #ddd; }}
.sheet td.alt {{ color: #a33; width: 12em; }} .sheet img {{ max-width: 200px; }}
img.plot {{ max-width: 48%; margin: 4px; border: 1px solid #eee; }}
.k {{ color: #777; font-size: 12px; }} #filter {{ width: 24em; padding: 4px; }}
</style></head><body>
<h1>recaption report</h1>
<p>{esc(r["corpus"])} · {s("shards")} shards · {s("counts.samples")} samples:
<b>{s("counts.captioned")}</b> captioned, {s("counts.rejected")} rejected ·
generated {esc(r["generated_at"])} · captioners: {captioners}</p>

<h2>Alt text against the new captions</h2>
<p>Words per caption. Web alt text is short and often empty; the dense captions are what
a Lens-style trainer learns from.</p>
<table class=nums><tr><th></th><th>mean</th><th>median</th><th>p5</th><th>p95</th><th>empty</th></tr>
{words}</table>
<p>Vocabulary (distinct words, estimated): captions {s("vocabulary.caption")},
alt text {s("vocabulary.alt_text")} · images with visible text: {s("visible_text_share")} ·
duplicate captions across distinct images: {s("duplicate_captions.rate")}</p>
{img("words", "words per caption histogram")}{img("objects", "top objects")}

<h2>Rejections</h2>
<table class=nums><tr><th>reason</th><th>samples</th><th>share</th></tr>{reasons}</table>
{img("rejections", "rejections by reason")}

<h2>Tokens, cost and throughput</h2>
<p>{s("usage.input_tokens")} input and {s("usage.output_tokens")} output tokens
({s("usage.input_tokens_per_image.mean")} and {s("usage.output_tokens_per_image.mean")} per image),
{s("requests")} requests, ${s("usage.cost_usd")} in all, ${s("usage.cost_per_1k_images")} per 1,000 images.
{dups}</p>
{img("tokens", "tokens per image")}{img("throughput", "captions over time")}

<h2>Most frequent</h2>
<p><b>objects:</b> {tops}</p><p><b>caption words:</b> {top_words}</p>

<h2>Contact sheet</h2>
<p>{s("contact_sheet.shown")} rows drawn at random from {s("contact_sheet.of")} captioned.
<input id=filter placeholder="filter: words in any column">
<label><input type=checkbox id=withtext> only images with visible text</label>
<span id=shown></span></p>
<table class=sheet id=sheet><tr><th>image</th><th>web alt text</th><th>dense caption</th>
<th>short caption</th><th>objects</th><th>text</th></tr>
{"".join(rows)}</table>
<script>
const filter = document.getElementById("filter");
const withText = document.getElementById("withtext");
const rows = Array.from(document.querySelectorAll("#sheet tr[data-text]"));
function apply() {{
  const words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const row of rows) {{
    const text = row.textContent.toLowerCase();
    const ok = words.every(w => text.includes(w)) && (!withText.checked || row.dataset.text === "1");
    row.style.display = ok ? "" : "none";
    shown += ok;
  }}
  document.getElementById("shown").textContent = shown + " shown";
}}
filter.addEventListener("input", apply);
withText.addEventListener("change", apply);
apply();
</script>
</body></html>
"""
