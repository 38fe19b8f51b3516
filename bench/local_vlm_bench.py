"""The `transformers` captioner on this machine's CPU, per VLM family, side by side.

Each family (tests/tiny_vlm.py: its real processor, tokenizer class, chat template and special
tokens, random weights at a small scale, nothing fetched) captions the same shards through
`process_shard`: read the tar, prepare, caption (batched; the processor encodes the next
batch in one thread while `generate` runs in another and the event loop reads on), validate,
write Parquet, journal. Printed per family: images/s, the tokens each image is charged, and

  generate          the share of the wall time the model ran: vision tower, prefill, decoding
  outside generate  the rest: time the model waited on the pipeline (target: at most 10% at
                    batch size 8)
  prep, decode      ms per image in the processor (template text, image resizing and
                    patching, tokenizing, padding; beside generate, not in series with it) and
                    in turning reply tokens into a caption (JSON or the text fallback)

    python bench/local_vlm_bench.py [--shards 2 --per-shard 48 --batch-size 8 --repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_vlm import FAMILIES, Scale, build_tiny_vlm  # noqa: E402

from recaption.captioners import make_captioner  # noqa: E402
from recaption.config import load_config  # noqa: E402
from recaption.samples import write_samples  # noqa: E402
from recaption.shard import process_shard  # noqa: E402
from recaption.sources import list_shards  # noqa: E402

# a few million parameters: big enough that generation has the weight it has in a real
# model's time, small enough for 2 CPU cores
BENCH = Scale(hidden=256, layers=4, heads=4, kv_heads=2, vision_hidden=128, vision_layers=4)
RELAXED = [
    "validation.min_words=1",
    "validation.max_words=100000",
    "validation.short_max_words=100000",
    "validation.language=null",
    "validation.max_repeated_ngram_share=1.0",
]


def run_family(family: str, work: Path, shards: list, args: argparse.Namespace) -> dict:
    model = build_tiny_vlm(work / family, family, BENCH)
    cfg = load_config(
        "pipelines/local-vlm.yaml",
        [
            f"captioner.model_path={model}",
            f"captioner.batch_size={args.batch_size}",
            f"captioner.max_output_tokens={args.max_output_tokens}",
            f"captioner.image.max_side={args.max_side}",
            f"limits.concurrency={2 * args.batch_size}",  # local-vlm.yaml: 2 x batch_size
            "output.store_images=false",
            *RELAXED,
        ],
    )
    captioner = make_captioner(cfg)
    walls, generate = [], []
    for repeat in range(args.repeats):
        output = cfg.output.model_copy(update={"path": str(work / f"corpus-{family}-{repeat}")})
        run_cfg = cfg.model_copy(update={"output": output})
        before = captioner.timings["generate_s"]
        t0 = time.perf_counter()
        for shard in shards:
            process_shard(shard, run_cfg, captioner)
        walls.append(time.perf_counter() - t0)
        generate.append((captioner.timings["generate_s"] - before) / walls[-1])
    t = captioner.timings
    return {
        "params": sum(p.numel() for p in captioner.vlm.parameters()) / 1e6,
        "images": t["images"] / args.repeats,
        "image_tokens": t["image_tokens"] / t["images"],
        "input_tokens": t["input_tokens"] / t["images"],
        "output_tokens": t["output_tokens"] / t["images"],
        "prep_ms": 1000 * t["prep_s"] / t["images"],
        "decode_ms": 1000 * t["decode_s"] / t["images"],
        "wall": statistics.median(walls),
        "generate": statistics.median(generate),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-output-tokens", type=int, default=48)
    parser.add_argument("--max-side", type=int, default=448)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    write_samples(work / "shards", shards=args.shards, per_shard=args.per_shard, seed=3)
    shards = list_shards(str(work / "shards"))
    print(
        f"{args.shards} shards x {args.per_shard} images, batch {args.batch_size}, "
        f"image.max_side {args.max_side}, max_output_tokens {args.max_output_tokens}, "
        f"limits.concurrency {2 * args.batch_size}, "
        f"CPU, medians of {args.repeats}"
    )
    header = (
        "| family | params | image tok/img | prompt tok/img | out tok/img | images/s "
        "| generate | outside generate | prep ms/img | decode ms/img |"
    )
    rows = [header, "|" + " --- |" * (header.count("|") - 1)]
    for family in args.families:
        r = run_family(family, work, shards, args)
        rows.append(
            f"| {family} | {r['params']:.1f}M | {r['image_tokens']:.0f} | "
            f"{r['input_tokens']:.0f} | {r['output_tokens']:.1f} | "
            f"{r['images'] / r['wall']:.2f} | {r['generate']:.1%} | {1 - r['generate']:.1%} | "
            f"{r['prep_ms']:.1f} | {r['decode_ms']:.2f} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
