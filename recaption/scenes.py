"""Procedural scenes with ground truth: coloured shapes on a background, and web-like alt text.

Used for the bundled sample shards (and for measuring caption fidelity): the ground truth
says exactly what is in each image, and the alt text is as vague and unreliable as real
web alt text.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from recaption.colors import PALETTE, SCENE_COLORS

KINDS = ("circle", "square", "triangle", "star")
GRID = {(r, c) for r in range(3) for c in range(3)}


@dataclass
class Shape:
    kind: str
    color: str
    cx: float  # centre, 0..1 of width
    cy: float
    size: float  # radius, 0..1 of the shorter side


@dataclass
class Scene:
    width: int
    height: int
    background: str
    shapes: list[Shape]

    def truth(self) -> dict:
        return asdict(self)


def random_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    width, height = rng.choice([(512, 512), (512, 384), (384, 512), (640, 480)])
    background = rng.choice(["white", "white", "black", "gray", *SCENE_COLORS])
    colors = [
        c for c in SCENE_COLORS if c != background and not {c, background} <= {"gray", "white"}
    ]
    cells = rng.sample(sorted(GRID), rng.randint(1, max_shapes))
    shapes = []
    for row, col in cells:
        size = rng.uniform(0.08, 0.14)
        jitter = 0.333 / 2 - size - 0.01
        shapes.append(
            Shape(
                kind=rng.choice(KINDS),
                color=rng.choice(colors),
                cx=(col + 0.5) / 3 + rng.uniform(-jitter, jitter) * 0.5,
                cy=(row + 0.5) / 3 + rng.uniform(-jitter, jitter) * 0.5,
                size=size,
            )
        )
    return Scene(width, height, background, shapes)


def render(scene: Scene) -> Image.Image:
    im = Image.new("RGB", (scene.width, scene.height), PALETTE[scene.background])
    draw = ImageDraw.Draw(im)
    unit = min(scene.width, scene.height)
    for s in scene.shapes:
        x, y, r = s.cx * scene.width, s.cy * scene.height, s.size * unit
        fill = PALETTE[s.color]
        if s.kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif s.kind == "square":
            side = r * 0.9
            draw.rectangle([x - side, y - side, x + side, y + side], fill=fill)
        elif s.kind == "triangle":
            draw.polygon(
                [(x, y - r), (x - r * 0.95, y + r * 0.75), (x + r * 0.95, y + r * 0.75)], fill=fill
            )
        elif s.kind == "star":
            points = []
            for i in range(10):
                rad = r if i % 2 == 0 else r * 0.45
                angle = -math.pi / 2 + i * math.pi / 5
                points.append((x + rad * math.cos(angle), y + rad * math.sin(angle)))
            draw.polygon(points, fill=fill)
    return im


_VAGUE = [
    "shapes",
    "image",
    "abstract",
    "graphic",
    "untitled",
    "clipart",
    "design",
    "pattern",
    "icon set",
]
_SEO = [
    "Geometric Shapes Wall Art Print Modern Minimalist Decor Free Shipping",
    "abstract background vector illustration stock image royalty free",
    "Kids Learning Shapes Poster | Best Educational Printables 2024",
]


def alt_text(scene: Scene, rng: random.Random) -> str | None:
    """Web-like alt text: mostly vague, sometimes partial, sometimes wrong, sometimes spam."""
    roll = rng.random()
    first = scene.shapes[0]
    if roll < 0.30:
        return rng.choice(_VAGUE)
    if roll < 0.45:
        return f"IMG_{rng.randint(1000, 9999)}.jpg"
    if roll < 0.65:
        return f"{first.color} {first.kind}"  # partial: the rest of the scene is unmentioned
    if roll < 0.78:
        wrong_color = rng.choice([c for c in SCENE_COLORS if c != first.color])
        return f"{wrong_color} {rng.choice(KINDS)}s"  # wrong
    if roll < 0.90:
        return rng.choice(_SEO)
    if roll < 0.95:
        return ""
    return None  # no alt text at all
