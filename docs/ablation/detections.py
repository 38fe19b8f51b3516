"""What a run draws for each dense prompt, as the detector reads it.

    python docs/ablation/detections.py RUN [--n 8] [--cfg 4] [--steps 20] [--cache-dir DIR]

Draws every evaluation prompt in the dense style the way `recaption lens eval` does (same
noises, same sampler), and prints one line per prompt: how many images pass, then each image's
shapes as `colour kind @ cell` (`blob`: no clear kind; `-`: nothing found). The last line is the per-category accuracy,
which matches `recaption lens eval --styles dense` for the same settings. It shows how a run
fails, not only how often: a square read as a circle, a held-out pair drawn as a seen one, a
shape in the wrong cell, one shape short.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from recaption.lens.detect import detect
from recaption.lens.eval import generate_styles, passes
from recaption.lens.prompts import CATEGORIES, geneval_prompts
from recaption.lens.sample import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=8, help="images a prompt")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20, help="Euler steps")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the text-feature cache")
    args = parser.parse_args()

    loaded = load_run(args.run, "cpu", args.cache_dir)
    prompts = geneval_prompts()
    images = generate_styles(
        loaded.model, loaded.encoder, prompts, args.n, args.cfg, args.steps, ("dense",)
    )["dense"]
    by_category: dict[str, list[bool]] = defaultdict(list)
    print(f"# {args.run}, step {loaded.step}: {args.n} images a prompt, CFG {args.cfg}")
    for prompt, batch in zip(prompts, images, strict=True):
        found = [detect(image) for image in batch]
        ok = [passes(prompt, d) for d in found]
        by_category[prompt.category] += ok
        shapes = [
            " + ".join(f"{s.color} {s.kind or 'blob'} @ {s.cell}" for s in d.shapes) or "-"
            for d in found
        ]
        print(f"{prompt.category} {sum(ok)}/{len(ok)} {prompt.short!r}: " + " | ".join(shapes))
    accuracy = {c: float(np.mean(by_category[c])) for c in CATEGORIES if by_category[c]}
    summary = " ".join(f"{c} {v:.2f}" for c, v in accuracy.items())
    print(f"overall {np.mean(list(accuracy.values())):.2f}: {summary}")


if __name__ == "__main__":
    main()
