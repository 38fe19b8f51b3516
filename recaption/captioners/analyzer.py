"""The `analyzer` captioner: the offline default. No model weights, no network.

It describes what can be measured from the pixels: a named colour palette with shares,
light and contrast, where the detail sits, flat regions and the simple shapes they form
(with colour, size and position), faces (OpenCV's bundled Haar cascade) and legible text
(RapidOCR, whose models ship inside its wheel, when installed). It does not recognise
objects, and its captions say only what it measured. Output is deterministic per image.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from recaption.captioners import CaptionResult
from recaption.colors import NAMES, label_pixels, to_lab
from recaption.config import CaptionerConfig
from recaption.images import PreparedImage
from recaption.records import Caption

VERSION = "analyzer-v1"  # stored as prompt_version: bump when captions change for the same image
DEFAULT_MODEL = "recaption-analyzer"
_SEG_SIDE = 256  # colour segmentation and shape analysis work at this size
_FACE_SIDE = 320
_TEXT_SIDE = 384


@dataclass
class Region:
    color: str
    kind: str  # circle, oval, square, rectangle, diamond, triangle, star; "" when irregular
    share: float  # of the image area
    cx: float  # centroid, 0..1 of width
    cy: float  # 0..1 of height
    extent: float  # longest bbox side, 0..1 of the image's longest side

    @property
    def position(self) -> str:
        return position_phrase(self.cx, self.cy)

    @property
    def size(self) -> str:
        return "small" if self.extent < 0.16 else "medium-sized" if self.extent < 0.32 else "large"

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind or 'area'}"


@dataclass
class Analysis:
    width: int
    height: int
    palette: list[tuple[str, float]]  # (colour, share), largest first
    background: str | None  # a plain background's colour
    brightness: float  # mean L*, 0..100
    contrast: float  # std of L*
    chroma: float  # mean chroma
    warmth: float  # mean b* + 0.5 a*: > 0 warm, < 0 cool
    flat_share: float  # share of pixels with almost no local gradient
    label_flat: float  # share of pixels named the same colour as their right and lower neighbours
    detail: np.ndarray  # 3x3 mean gradient
    top_bottom: float  # mean L* of the top third minus the bottom third
    tones: tuple[str, str]  # the commonest colour among the darkest and the brightest 5% of pixels
    regions: list[Region] = field(default_factory=list)
    faces: list[tuple[float, float]] = field(default_factory=list)  # centres, 0..1
    text: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> list[Region]:
        return [r for r in self.regions if r.kind]

    @property
    def patterned(self) -> bool:
        """A flat graphic whose background carries a pattern in a near shade."""
        return self.style == "flat graphic" and self.flat_share < 0.93

    @property
    def style(self) -> str:
        # Flat regions of named colour; a background pattern in a near shade (stripes, checks)
        # keeps its colour name, so it does not make a graphic a photograph.
        if self.background and self.label_flat > 0.8 and self.flat_share > 0.6:
            return "flat graphic"
        if self.chroma < 4.0:
            return "black-and-white photograph"
        return "photograph"


_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")
_POSITIONS = {
    ("top", "left"): "in the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the center",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}


def position_phrase(cx: float, cy: float) -> str:
    return _POSITIONS[(_ROWS[min(2, int(cy * 3))], _COLS[min(2, int(cx * 3))])]


_AREAS = {  # grid cell -> (where, what)
    (0, 0): ("in the top left corner", "the top left corner"),
    (0, 1): ("along the top", "the top edge"),
    (0, 2): ("in the top right corner", "the top right corner"),
    (1, 0): ("on the left side", "the left side"),
    (1, 1): ("in the centre", "the centre"),
    (1, 2): ("on the right side", "the right side"),
    (2, 0): ("in the bottom left corner", "the bottom left corner"),
    (2, 1): ("along the bottom", "the bottom edge"),
    (2, 2): ("in the bottom right corner", "the bottom right corner"),
}


def classify_shape(contour: np.ndarray) -> str:
    """Name a simple geometric shape from its outline, or "" if it is not one."""
    area = cv2.contourArea(contour)
    perimeter = cv2.arcLength(contour, True)
    if area < 30 or perimeter == 0:
        return ""
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    solidity = area / hull_area if hull_area else 0.0
    circularity = 4 * math.pi * area / perimeter**2
    (_, _), (rw, rh), angle = cv2.minAreaRect(contour)
    aspect = max(rw, rh) / max(1e-6, min(rw, rh))
    rect_fill = area / max(1e-6, rw * rh)
    vertices = len(cv2.approxPolyDP(contour, 0.035 * perimeter, True))

    if solidity > 0.93:
        if vertices == 3:
            return "triangle"
        if vertices == 4 and rect_fill > 0.88:
            if aspect > 1.3:
                return "rectangle"
            tilted = 20 < (angle % 90) < 70
            return "diamond" if tilted else "square"
        if circularity > 0.8:
            return "circle" if aspect < 1.25 else "oval"
    elif 0.35 < solidity < 0.75 and 8 <= vertices <= 12 and aspect < 1.3:
        return "star"
    return ""


class Analyzer:
    backend = "analyzer"
    prompt_version = VERSION

    def __init__(self, cfg: CaptionerConfig):
        self.model = cfg.model or DEFAULT_MODEL
        self.counters: Counter[str] = Counter()  # no requests: it is all local
        self.ocr_mode = cfg.ocr
        self._faces = (
            cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
            if cfg.faces
            else None
        )
        self._ocr = None
        if cfg.ocr != "never":
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError:  # OCR is an optional extra: no text is reported without it
                self.ocr_mode = "never"
            else:
                self._ocr = RapidOCR()

    async def aclose(self) -> None:
        pass  # nothing held

    async def caption(self, image: PreparedImage) -> CaptionResult:
        analysis = self.analyze(image.image)
        return CaptionResult(caption=describe(analysis, seed=image.sha256))

    # --- measurement -------------------------------------------------------------------

    def analyze(self, image: Image.Image) -> Analysis:
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        small = _resize(rgb, _SEG_SIDE)
        lab = to_lab(small)
        labels = label_pixels(small)
        counts = np.bincount(labels.ravel(), minlength=len(NAMES)) / labels.size
        palette = [(NAMES[i], float(counts[i])) for i in np.argsort(-counts) if counts[i] >= 0.03]

        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        border_counts = np.bincount(border, minlength=len(NAMES))
        bg = int(border_counts.argmax())
        plain = border_counts[bg] / border.size > 0.6 and counts[bg] > 0.25

        lum = lab[..., 0]
        grad = cv2.magnitude(cv2.Sobel(lum, cv2.CV_32F, 1, 0), cv2.Sobel(lum, cv2.CV_32F, 0, 1))
        third_h = max(1, lum.shape[0] // 3)
        analysis = Analysis(
            width=w,
            height=h,
            palette=palette,
            background=NAMES[bg] if plain else None,
            brightness=float(lum.mean()),
            contrast=float(lum.std()),
            chroma=float(np.hypot(lab[..., 1], lab[..., 2]).mean()),
            warmth=float(lab[..., 2].mean() + 0.5 * lab[..., 1].mean()),
            flat_share=float((grad < 8.0).mean()),
            label_flat=float(
                (
                    (labels[:-1, 1:] == labels[:-1, :-1]) & (labels[1:, :-1] == labels[:-1, :-1])
                ).mean()
            ),
            detail=_grid_means(grad),
            top_bottom=float(lum[:third_h].mean() - lum[-third_h:].mean()),
            tones=_tones(lum, labels),
        )
        analysis.regions = _regions(labels, bg if plain else None)
        if self._faces is not None:
            analysis.faces = self._detect_faces(rgb)
        if self._ocr is not None and (self.ocr_mode == "always" or text_likely(rgb)):
            analysis.text = self._read_text(rgb)
        return analysis

    def _detect_faces(self, rgb: np.ndarray) -> list[tuple[float, float]]:
        gray = cv2.cvtColor(_resize(rgb, _FACE_SIDE), cv2.COLOR_RGB2GRAY)
        gray = cv2.equalizeHist(gray)
        found = self._faces.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=6, minSize=(28, 28)
        )
        gh, gw = gray.shape
        return sorted(((x + fw / 2) / gw, (y + fh / 2) / gh) for x, y, fw, fh in found)

    def _read_text(self, rgb: np.ndarray) -> list[str]:
        result, _ = self._ocr(_resize(rgb, 640), use_cls=False)  # web text is mostly upright
        lines = []
        for _box, text, score in sorted(result or [], key=lambda r: (r[0][0][1], r[0][0][0])):
            text = " ".join(str(text).split())
            if float(score) >= 0.8 and len(text) >= 2 and text not in lines:
                lines.append(text)
        return lines


def _resize(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(
        rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )


def _tones(lum: np.ndarray, labels: np.ndarray) -> tuple[str, str]:
    low, high = np.percentile(lum, (5, 95))
    pick = lambda mask: NAMES[int(np.bincount(labels[mask], minlength=len(NAMES)).argmax())]  # noqa: E731
    return pick(lum <= low), pick(lum >= high)


def _grid_means(values: np.ndarray) -> np.ndarray:
    h, w = values.shape
    return np.array(
        [
            [
                values[r * h // 3 : (r + 1) * h // 3, c * w // 3 : (c + 1) * w // 3].mean()
                for c in range(3)
            ]
            for r in range(3)
        ]
    )


def _regions(labels: np.ndarray, background: int | None) -> list[Region]:
    """Connected single-colour regions, largest first: from 0.3% of the image on a plain
    background (shapes), from 1% otherwise (photographs are full of small patches)."""
    h, w = labels.shape
    total = h * w
    min_share = 0.003 if background is not None else 0.01
    kernel = np.ones((3, 3), np.uint8)
    regions = []
    for index in np.unique(labels):
        if index == background:
            continue
        mask = (labels == index).astype(np.uint8)
        if mask.sum() < min_share * total:
            continue
        if background is None:
            # Photographs: opening removes speckle and one-pixel seams between colours.
            # Flat graphics skip it: it would shave the corners that tell shapes apart.
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        n, components, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for i in range(1, n):
            x, y, bw, bh, pixels = stats[i]
            if pixels < min_share * total:
                continue
            kind = ""
            if background is not None:
                contours, _ = cv2.findContours(
                    (components[y : y + bh, x : x + bw] == i).astype(np.uint8),
                    cv2.RETR_EXTERNAL,
                    cv2.CHAIN_APPROX_NONE,
                )
                outline = max(contours, key=cv2.contourArea)
                # A ring (the halo an edge leaves around another shape) encloses far more
                # than it fills: it is not a shape of its own.
                if pixels >= 0.7 * cv2.contourArea(outline):
                    kind = classify_shape(outline)
            regions.append(
                Region(
                    color=NAMES[index],
                    kind=kind,
                    share=pixels / total,
                    cx=centroids[i][0] / w,
                    cy=centroids[i][1] / h,
                    extent=max(bw, bh) / max(h, w),
                )
            )
    return sorted(regions, key=lambda r: -r.share)


def text_likely(rgb: np.ndarray) -> bool:
    """A cheap gate before OCR: several glyph-sized blobs of similar height side by side."""
    gray = cv2.cvtColor(_resize(rgb, _TEXT_SIDE), cv2.COLOR_RGB2GRAY)
    for flag in (cv2.THRESH_BINARY_INV, cv2.THRESH_BINARY):  # dark-on-light and light-on-dark
        binary = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, flag, 15, 12)
        _n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        s = stats[1:]
        hs, ws, areas = s[:, 3].astype(float), s[:, 2].astype(float), s[:, 4].astype(float)
        glyph = (
            (hs >= 7) & (hs <= 60) & (ws <= 1.5 * hs) & (ws >= 0.1 * hs) & (areas >= 0.15 * ws * hs)
        )
        g = s[glyph].astype(float)
        if len(g) < 4 or len(g) > 4000:
            continue
        cy = g[:, 1] + g[:, 3] / 2
        x0, x1, gh = g[:, 0], g[:, 0] + g[:, 2], g[:, 3]
        # neighbours: similar height, same baseline band, a small horizontal gap
        same_line = np.abs(cy[:, None] - cy[None, :]) < 0.3 * gh[:, None]
        similar = np.abs(gh[:, None] - gh[None, :]) < 0.35 * gh[:, None]
        gap = np.maximum(x0[None, :] - x1[:, None], x0[:, None] - x1[None, :])
        close = (gap < 1.0 * gh[:, None]) & (gap > -0.2 * gh[:, None])
        neighbours = (same_line & similar & close).sum(1)  # a glyph is never `close` to itself
        # a word: glyphs in a chain, so some have a neighbour on each side
        if (neighbours >= 2).sum() >= 2 and (neighbours >= 1).sum() >= 4:
            return True
    return False


# --- prose ---------------------------------------------------------------------------------


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count(n: int, noun: str) -> str:
    words = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return f"{words[n] if n < len(words) else n} {noun}{'' if n == 1 else 's'}"


def _light(a: Analysis) -> str:
    level = (
        "very dark"
        if a.brightness < 25
        else "dark"
        if a.brightness < 42
        else "moderately bright"
        if a.brightness < 68
        else "bright"
    )
    contrast = "low" if a.contrast < 12 else "moderate" if a.contrast < 24 else "high"
    if a.chroma < 4:
        tone = "with little colour overall"
    elif a.chroma < 15:
        tone = "with muted colours"
    else:
        tone = "with saturated colours"
    warmth = (
        ""
        if a.chroma < 8 or abs(a.warmth) < 6
        else (" in warm tones" if a.warmth > 0 else " in cool tones")
    )
    return f"The image is {level} with {contrast} contrast, {tone}{warmth}."


def _palette(a: Analysis) -> str:
    parts = [f"{name} ({round(share * 100)}%)" for name, share in a.palette[:5]]
    if not parts:
        return "No single colour covers much of the frame; the palette is fragmented."
    if len(parts) == 1:
        return f"The palette is almost entirely {parts[0]}."
    return f"The palette is dominated by {parts[0]}, followed by {_join(parts[1:])}."


def _layout(a: Analysis) -> str:
    d = a.detail
    if d.max() < 1e-6:
        return "The frame is uniform, with no detail anywhere."
    busiest = np.unravel_index(int(d.argmax()), d.shape)
    calmest = np.unravel_index(int(d.argmin()), d.shape)
    sentence = f"Most of the fine detail is concentrated {_AREAS[busiest][0]}"
    if d.min() < 0.5 * d.max():
        sentence += f", while {_AREAS[calmest][1]} is comparatively smooth"
    sentence += "."
    if abs(a.top_bottom) > 12:
        upper, lower = ("brighter", "darker") if a.top_bottom > 0 else ("darker", "brighter")
        sentence += f" The upper part of the frame is {upper} and the lower part {lower}."
    return sentence


def _region_phrase(r: Region) -> str:
    return f"{_article(f'{r.size} {r.name}')} {r.position}"


def _relation(a: Region, b: Region) -> str | None:
    horizontal = (
        "to the left of" if a.cx < b.cx - 0.15 else "to the right of" if a.cx > b.cx + 0.15 else ""
    )
    vertical = "above" if a.cy < b.cy - 0.15 else "below" if a.cy > b.cy + 0.15 else ""
    where = " and ".join(p for p in (vertical, horizontal) if p)
    return f"the {a.color} {a.kind} is {where} the {b.color} {b.kind}" if where else None


def _format(a: Analysis) -> str:
    shape = (
        "square"
        if 0.95 < a.width / a.height < 1.05
        else "landscape"
        if a.width > a.height
        else "portrait"
    )
    return f"The frame is {shape}, {a.width} by {a.height} pixels."


def _faces_and_text(a: Analysis) -> list[str]:
    out = []
    if a.faces:
        where = _join(sorted({position_phrase(x, y) for x, y in a.faces}))
        out.append(
            f"{_count(len(a.faces), 'face').capitalize()} {'is' if len(a.faces) == 1 else 'are'} visible {where}."
        )
    if a.text:
        quoted = _join([f'"{t}"' for t in a.text[:4]])
        out.append(f"Legible text reads {quoted}.")
    if not a.faces and not a.text:
        out.append("No faces or legible text are visible.")
    return out


def describe(a: Analysis, seed: str = "") -> Caption:
    """Turn measurements into the caption record; every sentence states a measurement."""
    variant = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) if seed else 0
    shapes = a.shapes[:6]
    style = a.style
    if style == "flat graphic" and shapes:
        kinds = _join([_article(f"{s.color} {s.kind}") for s in shapes])
        ground = f"{'patterned' if a.patterned else 'plain'} {a.background} background"
        opening = (
            f"A flat digital graphic showing {_count(len(shapes), 'shape')} on a {ground}.",
            f"A simple flat illustration of {_count(len(shapes), 'geometric shape')} against a {ground}.",
        )[variant % 2]
        sentences = [opening, f"There is {_join([_region_phrase(s) for s in shapes])}."]
        relations = [r for r in (_relation(x, y) for x, y in itertools.pairwise(shapes)) if r]
        if relations:
            sentences.append(_join(relations).capitalize() + ".")
        short = f"{kinds[0].upper()}{kinds[1:]} on a {a.background} background."
        objects = [s.name for s in shapes]
    else:
        main = [name for name, _ in a.palette[:2]]
        noun = style
        opening = (
            f"A {noun} whose colours are mostly {_join(main) or 'mixed'}.",
            f"A {noun} dominated by {_join(main) or 'mixed colours'}.",
        )[variant % 2]
        sentences = [opening]
        large = [r for r in a.regions if r.share >= 0.04][:3]
        if large:
            sentences.append(f"Distinct areas include {_join([_region_phrase(r) for r in large])}.")
        extras = []
        if a.faces:
            extras.append(_count(len(a.faces), "face"))
        if a.text:
            extras.append("legible text")
        short = f"A {noun} dominated by {_join(main) or 'mixed colours'}" + (
            f", with {_join(extras)}." if extras else "."
        )
        objects = []
    if a.faces:
        objects.append("face" if len(a.faces) == 1 else _count(len(a.faces), "face"))
    if a.text:
        objects.append("text")

    sentences += _faces_and_text(a)
    sentences += [_palette(a), _light(a), _layout(a)]
    if a.patterned:
        sentences.append(
            f"The background is patterned in a slightly different shade of {a.background}."
        )
    elif style == "flat graphic":
        sentences.append("The colours are flat and even, without texture, shading or gradients.")
    if len(" ".join(sentences).split()) < 60 and a.tones[0] != a.tones[1]:
        sentences.append(
            f"Its tones run from {a.tones[0]} in the darkest parts to {a.tones[1]} in the brightest."
        )
    sentences.append(_format(a))
    # Keep the dense caption within 60-150 words: drop from the end, which holds the least.
    while len(" ".join(sentences).split()) > 150 and len(sentences) > 3:
        sentences.pop(-2)
    return Caption(
        caption=" ".join(sentences),
        caption_short=short,
        objects=objects,
        visible_text=list(a.text),
        style=style,
    )
