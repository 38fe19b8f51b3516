"""The Lens trainer on procedural scenes: `tiny` throughput, a timed CPU run, held-out samples.

    python bench/lens_bench.py [--minutes 10] [--scenes 4000] [--out runs/bench-lens]

Makes scene-only web shards, captions them with the offline analyzer (dense captions), trains
`tiny` for the given wall time and prints: steps/s and samples/s with the text cache cold
(first epoch) and warm (later epochs) side by side, the share of step time spent waiting for
images and on text features, the loss at the start and the end, and where the loss curve and
a sample grid for held-out prompts (one row per prompt) were written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from recaption.config import load_config
from recaption.lens.config import load_lens_config
from recaption.lens.sample import sample_to_files
from recaption.lens.train import train
from recaption.pipeline import run
from recaption.samples import write_samples

_SCENE = "A flat digital graphic showing {n} on a plain {bg} background. There is {what}."
# One attribute changes from row to row: shape, then colour, then position, then two shapes.
HELD_OUT = [
    _SCENE.format(n="one shape", bg="white", what="a medium-sized red circle in the center"),
    _SCENE.format(n="one shape", bg="white", what="a medium-sized red square in the center"),
    _SCENE.format(n="one shape", bg="white", what="a medium-sized red triangle in the center"),
    _SCENE.format(n="one shape", bg="white", what="a medium-sized blue circle in the center"),
    _SCENE.format(n="one shape", bg="white", what="a medium-sized green circle in the center"),
    _SCENE.format(n="one shape", bg="white", what="a medium-sized red circle in the top left"),
    _SCENE.format(n="one shape", bg="white", what="a medium-sized red circle in the bottom right"),
    _SCENE.format(
        n="two shapes",
        bg="black",
        what="a medium-sized yellow star in the top left and a medium-sized blue square "
        "in the bottom right",
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--out", default="runs/bench-lens")
    args = parser.parse_args()
    out = Path(args.out)
    shards, corpus = out / "shards", out / "corpus"

    if not (corpus / "manifest.json").exists():
        t0 = time.perf_counter()
        per_shard = 500
        write_samples(
            shards,
            shards=-(-args.scenes // per_shard),
            per_shard=per_shard,
            seed=7,
            photo_share=0.0,
        )
        t1 = time.perf_counter()
        overrides = [f"input.path={shards}", f"output.path={corpus}"]
        run(load_config("pipelines/default.yaml", overrides), show_progress=False)
        print(f"scenes: {t1 - t0:.0f} s to draw, {time.perf_counter() - t1:.0f} s to caption")

    cfg = load_lens_config("tiny", ["steps=1000000", "sample.every=0"])
    run_dir = out / "tiny"
    summary = train(
        str(corpus),
        cfg,
        run_dir,
        cache_dir=out / "text-cache",
        progress=False,
        max_seconds=args.minutes * 60,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"tiny on {summary.steps} steps of {cfg.batch_size}, {args.minutes:g} min:")
    for label, part in (
        ("first epoch (text cache cold)", [r for r in rows if r["epoch"] == 0]),
        ("later epochs (text cache warm)", [r for r in rows if r["epoch"] > 0]),
    ):
        if part:
            print(
                f"  {label:32s} {np.mean([r['steps_per_s'] for r in part]):.2f} steps/s, "
                f"{np.mean([r['samples_per_s'] for r in part]):.0f} samples/s, "
                f"data wait {np.mean([r['data_wait'] for r in part]):.1%}, "
                f"text features {np.mean([r['text_time'] for r in part]):.1%}"
            )
    print(
        f"  loss: first 50 steps {np.mean(summary.losses[:50]):.4f}, "
        f"last 50 {np.mean(summary.losses[-50:]):.4f}"
    )
    for line in summary.lines():
        print(f"  {line}")
    written = sample_to_files(
        run_dir,
        HELD_OUT,
        out / "held-out",
        n=6,
        cfg_scale=4.0,
        steps=32,
        seed=0,
        cache_dir=out / "text-cache",
    )
    print(f"  loss curve {run_dir / 'loss.png'}; held-out grid {written[-1]} (a row per prompt):")
    for prompt in HELD_OUT:
        print(f"    {prompt}")


if __name__ == "__main__":
    main()
