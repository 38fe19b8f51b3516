"""What the analyzer measures in the pixels: palette, light, detail, flat regions and shapes.

`measure` turns an RGB array into an `Analysis`; faces and text are found by the detectors
the `Analyzer` holds, which fills them in and records that it looked. Nothing here writes
prose, and nothing here recognises objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from recaption.colors import NAMES, label_pixels, to_lab
from recaption.grid import position_phrase

_SEG_SIDE = 256  # colour segmentation and shape analysis work at this size
_TEXT_SIDE = 384
_MARK = cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5))  # closing it removes narrower marks


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
    tone_entropy: float = 0.0  # bits, of the L* histogram in steps of 1: low for a few inks
    ink: float = 0.0  # share of pixels in dark marks under 5 pixels wide (strokes, lines, print)
    ground_flat: float = 0.0  # flat_share with those marks closed over: what they are drawn on
    regions: list[Region] = field(default_factory=list)
    faces: list[tuple[float, float]] = field(default_factory=list)  # centres, 0..1
    text: list[str] = field(default_factory=list)
    faces_checked: bool = False  # a face detector looked; False: nothing is known of faces
    text_checked: bool = False  # the text gate and OCR looked; False: nothing is known of text

    @property
    def shapes(self) -> list[Region]:
        return [r for r in self.regions if r.kind]

    @property
    def patterned(self) -> bool:
        """A flat graphic whose background carries a pattern in a near shade."""
        return self.style == "flat graphic" and self.flat_share < 0.93

    @property
    def photographic(self) -> bool:
        """The statistics natural photographs share: tones spread over many levels (not a
        few inks), colour names that change between neighbouring pixels (texture and noise,
        not smooth fills or gradients), and not dark strokes on a plain ground (print,
        writing, line art). Scans, screenshots, renders and paintings often fail one."""
        on_paper = self.ink >= 0.1 and self.ground_flat >= 0.7
        return self.tone_entropy >= 3.3 and self.label_flat < 0.9 and not on_paper

    @property
    def style(self) -> str:
        # Flat regions of named colour; a background pattern in a near shade (stripes, checks)
        # keeps its colour name, so it does not make a graphic a photograph.
        if self.background and self.label_flat > 0.8 and self.flat_share > 0.6:
            return "flat graphic"
        noun = "photograph" if self.photographic else "image"
        return f"black-and-white {noun}" if self.chroma < 4.0 else noun


def measure(rgb: np.ndarray) -> Analysis:
    """Everything but faces and text, from uint8 RGB (H, W, 3)."""
    h, w = rgb.shape[:2]
    small = resize(rgb, _SEG_SIDE)
    lab = to_lab(small)
    labels = label_pixels(small)
    counts = np.bincount(labels.ravel(), minlength=len(NAMES)) / labels.size
    palette = [(NAMES[i], float(counts[i])) for i in np.argsort(-counts) if counts[i] >= 0.03]

    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border_counts = np.bincount(border, minlength=len(NAMES))
    bg = int(border_counts.argmax())
    plain = border_counts[bg] / border.size > 0.6 and counts[bg] > 0.25

    lum = lab[..., 0]
    grad = _gradient(lum)
    third_h = max(1, lum.shape[0] // 3)
    low, high = np.percentile(lum, (5, 95))
    ground = cv2.morphologyEx(lum, cv2.MORPH_CLOSE, _MARK)  # dark marks filled with their ground
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
            ((labels[:-1, 1:] == labels[:-1, :-1]) & (labels[1:, :-1] == labels[:-1, :-1])).mean()
        ),
        detail=_grid_means(grad),
        top_bottom=float(lum[:third_h].mean() - lum[-third_h:].mean()),
        tones=_tones(lum, labels, low, high),
        tone_entropy=_entropy(lum),
        ink=float((ground - lum > 15.0).mean()),
        ground_flat=float((_gradient(ground) < 8.0).mean()),
    )
    analysis.regions = _regions(labels, bg if plain else None)
    return analysis


def resize(rgb: np.ndarray, side: int) -> np.ndarray:
    """Scaled down (never up) so that the longest side is `side`."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(
        rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )


def _tones(lum: np.ndarray, labels: np.ndarray, low: float, high: float) -> tuple[str, str]:
    pick = lambda mask: NAMES[int(np.bincount(labels[mask], minlength=len(NAMES)).argmax())]  # noqa: E731
    return pick(lum <= low), pick(lum >= high)


def _entropy(lum: np.ndarray) -> float:
    share = np.histogram(lum, bins=100, range=(0, 100))[0] / lum.size
    share = share[share > 0]
    return float(-(share * np.log2(share)).sum())


def _gradient(lum: np.ndarray) -> np.ndarray:
    return cv2.magnitude(cv2.Sobel(lum, cv2.CV_32F, 1, 0), cv2.Sobel(lum, cv2.CV_32F, 0, 1))


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
    gray = cv2.cvtColor(resize(rgb, _TEXT_SIDE), cv2.COLOR_RGB2GRAY)
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
