"""What a small generated image shows: coloured shapes, found by colour and named by geometry.

Built for the trainer's resolution (32x32 for `tiny`), where a scene's shape is 8 to 10
pixels across: pixels are named by the nearest scene colour, the background is the commonest
colour on the border, and the other colours' connected components are shapes, unless they
are blended edge pixels (no pure core) or a halo around a larger shape. `classify` names a
shape by its geometry. No torch: it reads uint8 arrays.

Generated images are not rendered ones: a shape's colour is a few units off the palette, its
edge is a pixel softer, and specks of other colours sit in it. The thresholds below were
measured against a person's reading of 864 generated images (docs/ablation/
detector_check.py) as well as against rendered scenes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from recaption.colors import PALETTE, SCENE_COLORS, to_lab
from recaption.grid import cell_of

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
_SQUARE = np.ones((3, 3), np.uint8)
_LAB = to_lab(np.array([PALETTE[c] for c in SCENE_COLORS], dtype=np.uint8)).reshape(-1, 3)


@dataclass(frozen=True)
class Found:
    color: str
    kind: str  # circle | square | triangle | star | "" (a blob of no clear kind)
    cell: str  # top left ... bottom right, as in the scenes' ground truth
    pixels: int


@dataclass
class Detection:
    background: str
    shapes: list[Found]


def name_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) -> (index into SCENE_COLORS of each pixel's nearest colour, and the
    CIELAB distance to it: large where a pixel blends two colours)."""
    lab = to_lab(rgb).reshape(-1, 1, 3)
    dist = np.sqrt(((lab - _LAB[None]) ** 2).sum(-1))
    return dist.argmin(-1).reshape(rgb.shape[:2]), dist.min(-1).reshape(rgb.shape[:2])


def solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area, the hull taken around whole pixels: low for a star."""
    ys, xs = np.nonzero(mask)
    corners = [np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]
    hull = cv2.convexHull(np.concatenate(corners).astype(np.int32))
    return float(mask.sum() / max(1.0, cv2.contourArea(hull)))


def corner_notch(mask: np.ndarray) -> int:
    """Pixels missing from the four 2x2 corner blocks of a shape's box: at most 5 for a
    rendered square at 32x32, its corners blended by the resize (docs/ablation/
    square_corners.py), at least 8 for a circle."""
    return 16 - sum(
        int(mask[r, c].sum())
        for r in (slice(0, 2), slice(-2, None))
        for c in (slice(0, 2), slice(-2, None))
    )


def flatness(mask: np.ndarray) -> float:
    """Share of rows (and of columns, the lower of the two) at least 0.88 of the shape's
    usual width (the 75th percentile, so one stray pixel cannot set it): about 0.4-0.5 for
    a circle, 0.8 or more for a square whose edge is a pixel soft, which the corner test
    reads as rounded."""
    return min(
        float(np.mean(widths >= 0.88 * np.percentile(widths, 75)))
        for widths in (mask.sum(axis=0), mask.sum(axis=1))
    )


def classify(mask: np.ndarray) -> str:
    """Kind of one shape from its mask, cropped to its box. The rules and thresholds were
    measured on scenes rendered at 32x32: a triangle is widest at its base, a square fills
    the corners of its box (or, soft-edged, has straight sides), a star is far from convex;
    a circle is the rest."""
    h, w = mask.shape
    if max(h, w) > 1.6 * min(h, w):
        return ""
    widths = mask.sum(axis=1).astype(float)
    third = max(1, h // 3)
    if np.argmax(widths) >= 0.55 * h and widths[-third:].mean() >= 2 * widths[:third].mean():
        return "triangle"
    if corner_notch(mask) <= 6 or (max(h, w) <= 1.3 * min(h, w) and flatness(mask) >= 0.7):
        return "square"
    convex = solidity(mask)
    return "star" if convex < 0.83 else "circle"


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask and every pixel it encloses."""
    outside = np.pad(mask, 1).astype(np.uint8)
    cv2.floodFill(outside, None, (0, 0), 1)
    return mask | (outside[1:-1, 1:-1] == 0)


def with_specks(
    mask: np.ndarray, ring: np.ndarray, foreground: np.ndarray, share: float = 0.35
) -> np.ndarray:
    """A shape's mask with the specks of other colours that touch or pierce it (each at most
    `share` of its size; `ring` is the mask grown by a pixel) and the holes they leave: a red
    fleck in a purple circle does not make it a star."""
    count, specks, stats, _ = cv2.connectedComponentsWithStats(
        (foreground & ~mask).astype(np.uint8), connectivity=4
    )
    shape = mask.copy()
    for i in range(1, count):
        speck = specks == i
        if stats[i, cv2.CC_STAT_AREA] <= share * mask.sum() and (ring & speck).any():
            shape |= speck
    return fill_holes(shape)


def detect(rgb: np.ndarray, min_pixels: int = 6, max_blend: float = 16.0) -> Detection:
    names, off = name_pixels(rgb)
    h, w = names.shape
    border = np.concatenate([names[0], names[-1], names[:, 0], names[:, -1]])
    background = int(np.bincount(border, minlength=len(SCENE_COLORS)).argmax())
    foreground = names != background
    parts = []  # (colour index, full-size mask, pixels, centroid)
    for index in np.unique(names):
        if index == background:
            continue
        _, components, stats, centroids = cv2.connectedComponentsWithStats(
            (names == index).astype(np.uint8), connectivity=8
        )
        # specks first, by their area alone: a generated image's noise is mostly specks
        for i in np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_pixels) + 1:
            mask = components == i
            # Blended edge pixels between two colours form thin rings and slivers: a shape
            # has a core that survives shaving one pixel off its outline, in near-pure
            # colour (a generated shape's colour is often 8-16 CIELAB units off).
            core = cv2.erode(mask.astype(np.uint8), _CROSS).astype(bool)
            if core.any() and (off[mask] < max_blend).sum() >= 2:
                parts.append((index, mask, int(stats[i, cv2.CC_STAT_AREA]), centroids[i]))
    shapes = []
    for index, mask, pixels, (cx, cy) in parts:
        # A halo hugs a shape at least twice its size (grey around white on black).
        ring = cv2.dilate(mask.astype(np.uint8), _SQUARE).astype(bool)
        if any(p >= 2 * pixels and (ring & m).any() for j, m, p, _ in parts if j != index):
            continue
        shape = with_specks(mask, ring, foreground)
        ys, xs = np.nonzero(shape)
        box = shape[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        cell = cell_of(cx / w, cy / h)
        shapes.append(Found(SCENE_COLORS[index], classify(box), cell, pixels))
    return Detection(SCENE_COLORS[background], sorted(shapes, key=lambda s: -s.pixels))
