"""`recaption lens eval`: GenEval-style prompt following, scored by the shape detector.

Each held-out prompt is sampled N times; the detector decides for each image whether it shows
what the prompt asks (`passes`); accuracy is reported per category and overall (the mean of
the categories, as GenEval does), for each prompt style. `detector_accuracy` validates the
detector itself on rendered scenes first.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recaption.grid import centre_of
from recaption.lens.data import decode
from recaption.lens.detect import Detection, Found, detect
from recaption.lens.prompts import CATEGORIES, Prompt, Want, layout
from recaption.scenes import SCENES, Scene, Shape, random_scene, render

if TYPE_CHECKING:  # torch stays out of the import of the scoring side
    from recaption.lens.model import MMDiT
    from recaption.lens.text import TextEncoder


def _fits(want: Want, found: Found) -> bool:
    return (
        want.kind == found.kind
        and want.color in (None, found.color)
        and want.cell in (None, found.cell)
    )


def passes(prompt: Prompt, detection: Detection) -> bool:
    """Does the image show what the prompt asks? Each wanted object needs its own shape."""
    if prompt.exact_count is not None:
        kind = prompt.wants[0].kind
        return sum(s.kind == kind for s in detection.shapes) == prompt.exact_count
    free = list(detection.shapes)
    # the most constrained wants first, so a loose one cannot take a shape a strict one needs
    for want in sorted(prompt.wants, key=lambda w: (w.cell is None, w.color is None)):
        match = next((s for s in free if _fits(want, s)), None)
        if match is None:
            return False
        free.remove(match)
    return True


def scene_for(prompt: Prompt, size: int = 256) -> Scene:
    """The scene the prompt's dense wording describes, rendered from ground truth."""
    shapes = []
    for color, kind, cell in layout(prompt.wants):
        shapes.append(Shape(kind, color, *centre_of(cell), 0.145))
    return Scene(size, size, "white", shapes)


def _as_trained(scene: Scene, image_size: int) -> np.ndarray:
    """A rendered scene as the trainer sees it: JPEG in the corpus, decoded and resized."""
    buf = io.BytesIO()
    render(scene).save(buf, "JPEG", quality=90)
    return decode(buf.getvalue(), image_size)


def detector_accuracy(prompts: list[Prompt], image_size: int, scenes: int = 1000) -> dict:
    """The detector on real scenes at the model's resolution: the share of random scenes
    read exactly (every shape's colour, kind and cell, and nothing more), and the share of
    prompts that pass on the scene they describe."""
    rng = random.Random(0)
    exact = 0
    for _ in range(scenes):
        scene = random_scene(rng, SCENES)
        found = detect(_as_trained(scene, image_size))
        got = sorted((s.color, s.kind, s.cell) for s in found.shapes)
        exact += got == sorted((s.color, s.kind, s.cell) for s in scene.shapes)
    passed = [passes(p, detect(_as_trained(scene_for(p), image_size))) for p in prompts]
    return {
        "scenes_exact": exact / scenes,
        "scenes": scenes,
        "prompts_pass": float(np.mean(passed)),
    }


def read_labelled(png: Path, labels: Path) -> tuple[list[np.ndarray], list[str]]:
    """A person's reading of generated images (eval/detector/): `png` holds one row of
    32x32 images per prompt of `geneval_prompts()`, `labels` a line per row with a
    character per image (1: shows what the prompt asks, 0: does not, ?: can't tell)."""
    from PIL import Image

    rows = [line.split()[0] for line in labels.read_text().splitlines() if line[:1] != "#"]
    grid = np.asarray(Image.open(png).convert("RGB"))
    n, size = len(rows[0]), grid.shape[1] // len(rows[0])
    images = grid.reshape(len(rows), size, n, size, 3).transpose(0, 2, 1, 3, 4)
    return list(images), rows


def person_agreement(prompts: list[Prompt], images: list[np.ndarray], rows: list[str]) -> dict:
    """The detector against a person on generated images: the share of the images both
    read alike (those the person could tell), and each one's accuracy per category."""
    same, told = 0, 0
    detector: dict[str, list[bool]] = defaultdict(list)
    person: dict[str, list[bool]] = defaultdict(list)
    for prompt, batch, row in zip(prompts, images, rows, strict=True):
        for image, label in zip(batch, row, strict=True):
            ok = passes(prompt, detect(image))
            detector[prompt.category].append(ok)
            if label != "?":
                person[prompt.category].append(label == "1")
                same += ok == (label == "1")
                told += 1
    return {
        "agreement": same / told,
        "images": told,
        "detector": {c: float(np.mean(v)) for c, v in detector.items()},
        "person": {c: float(np.mean(v)) for c, v in person.items()},
    }


def blind_accuracy(prompts: list[Prompt], image_size: int, n: int, seed: int = 0) -> dict:
    """What a model that ignores the prompt would score: n random scenes of the training
    distribution per prompt, as the trainer sees them, scored like generated images. The
    floor a prompt-following claim has to clear."""
    rng = random.Random(seed)
    images = [
        np.stack([_as_trained(random_scene(rng, SCENES), image_size) for _ in range(n)])
        for _ in prompts
    ]
    return score(prompts, {"blind": images})["blind"]


def score(prompts: list[Prompt], images: dict[str, list[np.ndarray]]) -> dict:
    """images: style -> per prompt, uint8 [N, H, W, 3]. Accuracy per category and overall."""
    out = {}
    for style, per_prompt in images.items():
        by_category: dict[str, list[bool]] = defaultdict(list)
        for prompt, batch in zip(prompts, per_prompt, strict=True):
            by_category[prompt.category] += [passes(prompt, detect(im)) for im in batch]
        categories = {c: float(np.mean(by_category[c])) for c in CATEGORIES if by_category[c]}
        out[style] = {
            "categories": categories,
            "overall": float(np.mean(list(categories.values()))),
        }
    return out


STYLES = ("short", "upsampled", "dense", "paraphrase")


def style_texts(prompt: Prompt, style: str) -> list[str]:
    """The wordings a style asks for: one, or the paraphrases (images split among them)."""
    from recaption.lens.upsample import upsample

    if style == "paraphrase":
        return prompt.paraphrases
    if style == "upsampled":  # the short prompt through the named upsampler step
        return [upsample(prompt.short)]
    if style in ("short", "dense"):
        return [prompt.text(style)]
    raise ValueError(f"unknown prompt style {style!r}; choose from {', '.join(STYLES)}")


def evaluate_run(
    run: str | Path,
    prompts: list[Prompt],
    n: int = 4,
    cfg_scale: float = 4.0,
    steps: int = 20,
    styles: tuple[str, ...] = ("short", "dense"),
    device: str = "auto",
    cache_dir: Path | None = None,
) -> dict:
    from recaption.lens.sample import load_run

    loaded = load_run(run, device, cache_dir)
    images = generate_styles(loaded.model, loaded.encoder, prompts, n, cfg_scale, steps, styles)
    result = score(prompts, images)
    result["run"] = str(run)
    result["step"] = loaded.step
    result["samples_per_prompt"] = n
    return result


def generate_styles(
    model: MMDiT,
    encoder: TextEncoder,
    prompts: list[Prompt],
    n: int,
    cfg_scale: float,
    steps: int,
    styles: tuple[str, ...],
) -> dict[str, list[np.ndarray]]:
    """style -> per prompt, uint8 [n, H, W, 3]. A style with several wordings splits the n
    images among them (wording j gets its own noise seed j). A text asked for again (the
    upsampler writes exactly the dense wording) reuses its images: same text, same seed,
    same images, drawn once."""
    from recaption.lens.sample import generate

    # style -> per prompt, the draws it needs: (text, images, noise seed)
    plans: dict[str, list[list[tuple[str, int, int]]]] = {}
    for style in styles:
        plans[style] = []
        for p in prompts:
            texts = style_texts(p, style)
            counts = [n // len(texts) + (j < n % len(texts)) for j in range(len(texts))]
            draws = [(t, c, j) for j, (t, c) in enumerate(zip(texts, counts, strict=True))]
            plans[style].append([d for d in draws if d[1]])
    batches: dict[tuple[int, int], set[str]] = {}  # (images, seed) -> texts, one call each
    for plan in plans.values():
        for text, count, seed in (d for draws in plan for d in draws):
            batches.setdefault((count, seed), set()).add(text)
    drawn: dict[tuple[str, int, int], np.ndarray] = {}
    for (count, seed), texts in sorted(batches.items()):
        ordered = sorted(texts)
        grid = generate(model, encoder, ordered, count, cfg_scale, steps, seed=seed)
        for i, text in enumerate(ordered):
            drawn[(text, count, seed)] = grid[i * count : (i + 1) * count]
    return {
        style: [np.concatenate([drawn[d] for d in draws]) for draws in plan]
        for style, plan in plans.items()
    }


def table(results: dict[str, dict], style: str) -> str:
    """Markdown: one row per run (arm), one column per category, then overall."""
    lines = [
        "| arm | " + " | ".join(CATEGORIES) + " | overall |",
        "| --- |" + " --- |" * (len(CATEGORIES) + 1),
    ]
    for name, result in results.items():
        r = result[style]
        cells = [f"{r['categories'].get(c, float('nan')):.2f}" for c in CATEGORIES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['overall']:.2f} |")
    return "\n".join(lines)
