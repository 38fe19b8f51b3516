"""How square a square is, in the detector's terms: the pixels missing from the four 2x2
corner blocks of its box (`corner_notch`; more than 6 of 16 is read as a circle).

    python docs/ablation/square_corners.py [RUN] [--cache-dir DIR]

Counts them on 300 centre squares of the scene corpus's sizes and colours as the trainer
sees them (rendered, JPEG, resized to 32x32), and, given a run, on the squares its EMA
weights draw for the evaluation's dense prompts that ask for a square in the centre (8
images a prompt, CFG 4, 20 Euler steps, as `recaption lens eval`).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import cv2
import numpy as np

from recaption.lens.detect import corner_notch, name_pixels
from recaption.lens.eval import _as_trained
from recaption.scenes import SCENES, Scene, Shape


def notch(rgb: np.ndarray) -> int:
    """corner_notch of the largest one-colour component that is not the background."""
    names, _ = name_pixels(rgb)
    background = np.bincount(np.concatenate([names[0], names[-1]])).argmax()
    best = np.zeros(names.shape, bool)
    for index in np.unique(names[names != background]):
        _, parts, stats, _ = cv2.connectedComponentsWithStats((names == index).astype(np.uint8))
        i = 1 + stats[1:, cv2.CC_STAT_AREA].argmax()
        if stats[i, cv2.CC_STAT_AREA] > best.sum():
            best = parts == i
    ys, xs = np.nonzero(best)
    return corner_notch(best[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def rendered(n: int = 300, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.uniform(*SCENES.sizes)
        jitter = max(0.0, 0.333 / 2 - size - 0.01) * 0.5  # as random_scene's centre cell
        x, y = (0.5 + rng.uniform(-jitter, jitter) for _ in range(2))
        color = rng.choice(["red", "orange", "yellow", "blue", "green", "purple"])
        out.append(
            notch(_as_trained(Scene(256, 256, "white", [Shape("square", color, x, y, size)]), 32))
        )
    return out


def generated(run: str, cache_dir: Path | None) -> dict[str, list[int]]:
    from recaption.lens.prompts import geneval_prompts
    from recaption.lens.sample import generate, load_run

    prompts = [p for p in geneval_prompts() if "square" in p.short and p.wants[0].cell is None]
    prompts = [p for p in prompts if len(p.wants) == 1]
    loaded = load_run(run, "cpu", cache_dir)
    images = generate(loaded.model, loaded.encoder, [p.dense for p in prompts], 8, 4.0, 20)
    return {p.short: [notch(images[i * 8 + k]) for k in range(8)] for i, p in enumerate(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--cache-dir", type=Path)
    args = ap.parse_args()
    real = np.array(rendered())
    counts = ", ".join(f"{k}: {c}" for k, c in enumerate(np.bincount(real)) if c)
    print(f"rendered centre squares ({len(real)}), missing corner pixels -> count: {counts}")
    if args.run:
        for short, notches in generated(args.run, args.cache_dir).items():
            read = sum(n <= 6 for n in notches)
            print(f"{args.run} {short!r}: {notches} ({read} of {len(notches)} read as squares)")


if __name__ == "__main__":
    main()
