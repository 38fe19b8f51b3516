"""Named colours: one palette shared by the analyzer (naming pixels) and the scene generator
(painting shapes), so that what one paints the other can name."""

from __future__ import annotations

import cv2
import numpy as np

# name -> sRGB. The first twelve are the clearly distinct "scene" colours; the rest refine
# photographs (a dark green field should not be called black).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (240, 130, 30),
    "yellow": (240, 215, 40),
    "green": (50, 160, 60),
    "cyan": (40, 190, 210),
    "blue": (40, 70, 200),
    "purple": (130, 60, 180),
    "pink": (240, 140, 190),
    "brown": (120, 75, 40),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "dark gray": (65, 65, 65),
    "light gray": (195, 195, 195),
    "navy": (25, 35, 90),
    "sky blue": (135, 190, 235),
    "dark green": (25, 80, 40),
    "olive": (115, 115, 45),
    "beige": (220, 200, 160),
    "tan": (185, 145, 100),
    "maroon": (105, 25, 35),
    "teal": (20, 120, 125),
    "lavender": (190, 170, 225),
}
SCENE_COLORS: tuple[str, ...] = tuple(list(PALETTE)[:12])
NAMES: tuple[str, ...] = tuple(PALETTE)


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 CIELAB with L in 0..100 and a, b centred on 0."""
    flat = np.ascontiguousarray(rgb.reshape(-1, 1, 3), dtype=np.uint8)
    lab = cv2.cvtColor(flat, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab[..., 0] *= 100.0 / 255.0
    lab[..., 1:] -= 128.0
    return lab.reshape(rgb.shape)


_PALETTE_LAB = to_lab(np.array(list(PALETTE.values()), dtype=np.uint8)).reshape(-1, 3)


def _nearest(lab: np.ndarray) -> np.ndarray:
    return ((lab[..., None, :] - _PALETTE_LAB) ** 2).sum(-1).argmin(-1).astype(np.uint8)


# Nearest-colour lookup over RGB at 5 bits a channel, computed once: labelling an image is
# then one table lookup a pixel instead of a distance to every palette entry.
_LEVELS = (np.arange(32, dtype=np.uint8) << 3) | 4
_LUT = _nearest(to_lab(np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS, indexing="ij"), -1)))


def label_pixels(rgb: np.ndarray) -> np.ndarray:
    """Index into NAMES of the nearest named colour for each uint8 RGB pixel: (H, W, 3) -> (H, W)."""
    q = rgb >> 3
    return _LUT[q[..., 0], q[..., 1], q[..., 2]]
