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
from recaption.grid import CELLS as CELLS  # the ground truth's cell names, from the grid
from recaption.grid import GRID, cell_of

KINDS = ("circle", "square", "triangle", "star")


@dataclass
class Shape:
    kind: str
    color: str
    cx: float  # centre, 0..1 of width
    cy: float
    size: float  # radius, 0..1 of the shorter side

    @property
    def cell(self) -> str:
        return cell_of(self.cx, self.cy)


@dataclass
class Scene:
    width: int
    height: int
    background: str
    shapes: list[Shape]
    texture: str = "plain"  # plain | stripes | checks (in a near shade of the background)

    def truth(self) -> dict:
        """The ground truth: what is in the image, with each shape's cell on the 3x3 grid."""
        truth = asdict(self)
        for shape, d in zip(self.shapes, truth["shapes"], strict=True):
            d["cell"] = shape.cell
        truth["count"] = len(self.shapes)
        return truth


@dataclass(frozen=True)
class SceneStyle:
    """A scene distribution: frame sizes, shape count and size, backgrounds, held-out pairs."""

    frames: tuple[tuple[int, int], ...] = ((512, 512), (512, 384), (384, 512), (640, 480))
    max_shapes: int = 3
    sizes: tuple[float, float] = (0.08, 0.14)  # radius, 0..1 of the shorter side
    textured: float = 0.0  # share of backgrounds with stripes or checks in a near shade
    held_out: frozenset[tuple[str, str]] = frozenset()  # (colour, kind) pairs never drawn


# (colour, kind) pairs that `recaption scenes` never draws: the prompt-following evaluation
# asks for them, so a trained model must compose a colour and a kind it saw only apart
HELD_OUT = frozenset(
    {
        ("red", "triangle"),
        ("blue", "circle"),
        ("green", "star"),
        ("yellow", "square"),
        ("purple", "circle"),
        ("orange", "square"),
    }
)
SAMPLES = SceneStyle()  # the scenes among `recaption samples`' web images
# `recaption scenes`: square frames and shapes large enough to learn at 32x32 pixels
SCENES = SceneStyle(frames=((256, 256),), sizes=(0.13, 0.16), textured=0.2, held_out=HELD_OUT)


def random_scene(rng: random.Random, style: SceneStyle = SAMPLES) -> Scene:
    width, height = rng.choice(style.frames)
    background = rng.choice(["white", "white", "black", "gray", *SCENE_COLORS])
    colors = [
        c for c in SCENE_COLORS if c != background and not {c, background} <= {"gray", "white"}
    ]
    cells = rng.sample(GRID, rng.randint(1, style.max_shapes))
    shapes = []
    for row, col in cells:
        size = rng.uniform(*style.sizes)
        jitter = max(0.0, 0.333 / 2 - size - 0.01)
        kind, color = rng.choice(KINDS), rng.choice(colors)
        while (color, kind) in style.held_out:
            kind, color = rng.choice(KINDS), rng.choice(colors)
        shapes.append(
            Shape(
                kind=kind,
                color=color,
                cx=(col + 0.5) / 3 + rng.uniform(-jitter, jitter) * 0.5,
                cy=(row + 0.5) / 3 + rng.uniform(-jitter, jitter) * 0.5,
                size=size,
            )
        )
    texture = "plain"
    if style.textured and rng.random() < style.textured:
        texture = rng.choice(["stripes", "checks"])
    return Scene(width, height, background, shapes, texture)


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A near shade of a colour: the texture must not change the colour's name."""
    step = -16 if sum(rgb) > 384 else 16
    return tuple(max(0, min(255, v + step)) for v in rgb)


def render(scene: Scene) -> Image.Image:
    im = Image.new("RGB", (scene.width, scene.height), PALETTE[scene.background])
    draw = ImageDraw.Draw(im)
    unit = min(scene.width, scene.height)
    band, shade = max(4, unit // 16), _shade(PALETTE[scene.background])
    if scene.texture == "stripes":
        for y in range(0, scene.height, 2 * band):
            draw.rectangle([0, y, scene.width, y + band - 1], fill=shade)
    elif scene.texture == "checks":
        for y in range(0, scene.height, band):
            for x in range((y // band) % 2 * band, scene.width, 2 * band):
                draw.rectangle([x, y, x + band - 1, y + band - 1], fill=shade)
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
