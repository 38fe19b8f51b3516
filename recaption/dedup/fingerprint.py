"""An image's fingerprint: its sha256 and two 64-bit perceptual hashes from a 64-px thumbnail.

The thumbnail comes from libjpeg's DCT scaling (`Image.draft`) for a passed-through JPEG, so
hashing never decodes the full image; an image already decoded is reduced instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from recaption.images import PreparedImage

THUMB = 64  # side of the thumbnail the hashes are computed from
# A hash is only trusted for near matching when this share of the thumbnail's 4x4 blocks has
# texture (grey-level std > DETAIL_STD): measured on the bundled photos (0.11-0.98) and scenes
# (at most 0.22), where distinct flat scenes share phashes at distance 0.
DETAIL_STD = 6.0
MIN_DETAIL = 0.25


@dataclass(frozen=True)
class Fingerprint:
    sha256: str  # hex of the prepared image's bytes
    phash: int  # 64-bit DCT hash: the near-search key
    dhash: int = 0  # 64-bit gradient hash: a near match must agree on both
    near_ok: bool = True  # enough detail for the hashes to identify the picture

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256)


def _thumbnail(image: PreparedImage) -> Image.Image:
    """A grey thumbnail of about THUMB px, without a full decode where avoidable."""
    if image.decoded is not None:
        im = image.decoded
        factor = max(1, min(im.size) // THUMB)
        return (im.reduce(factor) if factor > 1 else im).convert("L")
    im = Image.open(io.BytesIO(image.data))
    if im.format == "JPEG":
        im.draft("L", (THUMB, THUMB))  # decode at 1/2..1/8 scale, luminance only
    else:
        im = im.convert("L")
        im.thumbnail((THUMB * 2, THUMB * 2), Image.Resampling.BOX)
    return im if im.mode == "L" else im.convert("L")  # a CMYK JPEG's draft stays CMYK


def _bits(h: imagehash.ImageHash) -> int:
    return int.from_bytes(np.packbits(h.hash.ravel()).tobytes(), "big")


def detail(grey: Image.Image) -> float:
    """Share of the 4x4 blocks of a THUMB x THUMB grey thumbnail that have texture."""
    if grey.size != (THUMB, THUMB):
        grey = grey.resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    g = np.asarray(grey, dtype=np.float32)
    # one row per block: a single-axis variance is ~2x cheaper than std over axes (1, 3)
    blocks = g.reshape(THUMB // 4, 4, THUMB // 4, 4).swapaxes(1, 2).reshape(-1, 16)
    return float(np.count_nonzero(blocks.var(axis=1) > DETAIL_STD**2)) / len(blocks)


def fingerprint(image: PreparedImage, near: bool = True) -> Fingerprint:
    """`near` False: the sha only (exact matching), no thumbnail: for a passed-through JPEG
    the thumbnail is most of the cost (libjpeg still reads every coefficient)."""
    if not near:
        return Fingerprint(sha256=image.sha256, phash=0, dhash=0, near_ok=False)
    grey = _thumbnail(image)
    return Fingerprint(
        sha256=image.sha256,
        phash=_bits(imagehash.phash(grey)),
        dhash=_bits(imagehash.dhash(grey)),
        near_ok=detail(grey) >= MIN_DETAIL,
    )
