"""The `transformers` captioner on this machine's CPU: images/s and the pipeline's overhead.

For each model size (a random LLaVA built here, as in the tests: no weights are fetched),
the same shards are captioned two ways, interleaved, `--repeats` times:

  bare      images decoded and prepared up front, then captioner batches back to back: the
            model's time alone
  pipeline  `process_shard`: read the tar, prepare, caption (batched, `generate` in a thread
            while the event loop reads on), validate, write Parquet, journal

Printed per size: images/s both ways, the share of the pipeline's wall time spent in
`generate`, the pipeline's own time as a share of the model's (target: under 10%), and
pipeline/bare (noisier: a random model's reply lengths change with the batch it is in).

    python bench/local_vlm_bench.py [--shards 2 --per-shard 48 --repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_vlm import build_tiny_vlm  # noqa: E402

from recaption.captioners import make_captioner  # noqa: E402
from recaption.config import load_config  # noqa: E402
from recaption.images import ImageRejected, prepare  # noqa: E402
from recaption.samples import write_samples  # noqa: E402
from recaption.shard import process_shard  # noqa: E402
from recaption.sources import list_shards, read_samples  # noqa: E402

# (name, image side, text hidden size, text layers): image tokens = (side / (side/4))^2 = 16
SIZES = [("tiny", 32, 64, 2), ("small", 224, 384, 6)]
RELAXED = [
    "validation.min_words=1",
    "validation.max_words=100000",
    "validation.short_max_words=100000",
    "validation.language=null",
    "validation.max_repeated_ngram_share=1.0",
]


def bare(captioner, images: list) -> float:
    async def go() -> None:
        await asyncio.gather(*(captioner.caption(im) for im in images), return_exceptions=True)
        await captioner.aclose()

    t0 = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    shards_dir = work / "shards"
    write_samples(shards_dir, shards=args.shards, per_shard=args.per_shard, seed=3)
    shards = list_shards(str(shards_dir))
    print(f"{args.shards} shards x {args.per_shard}, batch {args.batch_size}, CPU")
    for name, side, hidden, layers in SIZES:
        model = build_tiny_vlm(work / name, image_size=side, hidden=hidden, layers=layers)
        cfg = load_config(
            "pipelines/local-vlm.yaml",
            [
                f"captioner.model_path={model}",
                f"captioner.batch_size={args.batch_size}",
                "captioner.max_output_tokens=48",
                "captioner.image.max_side=256",
                "output.store_images=false",
                *RELAXED,
            ],
        )
        captioner = make_captioner(cfg)
        images = []
        for shard in shards:
            for sample in read_samples(shard):
                if not sample.error:
                    with contextlib.suppress(ImageRejected):
                        images.append(prepare(sample.image, cfg.captioner.image))
        times: dict[str, list[float]] = {"bare": [], "pipeline": []}
        share: list[float] = []
        for repeat in range(args.repeats):
            times["bare"].append(bare(captioner, images))
            corpus = work / f"corpus-{name}-{repeat}"
            generate_before = captioner.timings["generate_s"]
            t0 = time.perf_counter()
            for shard in shards:
                process_shard(
                    shard,
                    cfg.model_copy(
                        update={"output": cfg.output.model_copy(update={"path": str(corpus)})}
                    ),
                    captioner,
                )
            wall = time.perf_counter() - t0
            times["pipeline"].append(wall)
            share.append((captioner.timings["generate_s"] - generate_before) / wall)
        b, p = statistics.median(times["bare"]), statistics.median(times["pipeline"])
        n = len(images)
        print(
            f"{name:6s} ({sum(x.numel() for x in captioner.vlm.parameters()) / 1e6:.1f}M params, "
            f"{captioner.image_tokens(images[0])} image tokens): bare {n / b:.1f} img/s, "
            f"pipeline {n / p:.1f} img/s; generate is {statistics.median(share):.1%} of the "
            f"pipeline's time, so the rest costs {1 / statistics.median(share) - 1:.1%} of the "
            f"model's time; pipeline/bare {p / b:.2f}"
        )


if __name__ == "__main__":
    main()
