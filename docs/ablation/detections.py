"""What a run draws for each dense prompt, as the detector reads it.

    python docs/ablation/detections.py RUN [--n 8] [--cfg 4] [--steps 20] [--cache-dir DIR]

Draws every evaluation prompt in the dense style the way `recaption lens eval` does (same
noises, same sampler), and prints one line per prompt: how many images pass, then each
image's shapes as `colour kind @ cell` (`blob`: no clear kind; `-`: nothing found). The last
line is the accuracy per category and overall, scored as `recaption lens eval --styles dense`
scores it. It shows how a run fails, not only how often: a square read as a circle, a
held-out pair drawn as a seen one, a shape in the wrong cell, one shape short.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recaption.lens.detect import detect
from recaption.lens.eval import generate_styles, passes, score
from recaption.lens.prompts import geneval_prompts
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
    print(f"# {args.run}, step {loaded.step}: {args.n} images a prompt, CFG {args.cfg}")
    for prompt, batch in zip(prompts, images, strict=True):
        found = [detect(image) for image in batch]
        ok = [passes(prompt, d) for d in found]
        shapes = [
            " + ".join(f"{s.color} {s.kind or 'blob'} @ {s.cell}" for s in d.shapes) or "-"
            for d in found
        ]
        print(f"{prompt.category} {sum(ok)}/{len(ok)} {prompt.short!r}: " + " | ".join(shapes))
    result = score(prompts, {"dense": images})["dense"]  # what `lens eval` reports
    summary = " ".join(f"{c} {v:.2f}" for c, v in result["categories"].items())
    print(f"overall {result['overall']:.2f}: {summary}")


if __name__ == "__main__":
    main()
