"""Image preparation: decode safely, normalise to RGB, resize, re-encode, hash.

Everything a web image can throw at us ends as an `ImageRejected` with a reason, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from recaption.config import ImageConfig
from recaption.errors import Rejected
from recaption.records import Reason, Stage

_PIL_FORMAT = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


class ImageRejected(Rejected):
    stage = Stage.decode


@dataclass
class PreparedImage:
    image: Image.Image  # RGB, longest side <= max_side
    data: bytes  # `image` re-encoded; what is stored and what a VLM is sent
    sha256: str
    width: int
    height: int
    original_width: int
    original_height: int


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High bit depth: PIL's convert("L") clips instead of scaling, so scale by the range.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I") and arr.max() > 255 else max(arr.max(), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def prepare(data: bytes | None, cfg: ImageConfig) -> PreparedImage:
    if not data:
        raise ImageRejected(Reason.empty_file, "the image file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:16].decode("latin-1").lower()
        hint = "looks like HTML/text" if head.lstrip().startswith(("<", "{")) else "unknown format"
        raise ImageRejected(Reason.not_an_image, f"not a decodable image ({hint})") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(Reason.too_many_pixels, str(exc)) from None
    except Exception as exc:  # any other header parse failure
        raise ImageRejected(Reason.decode_error, f"{type(exc).__name__}: {exc}") from None

    width, height = im.size
    if width * height > cfg.max_pixels:
        raise ImageRejected(
            Reason.too_many_pixels, f"{width}x{height} exceeds image.max_pixels={cfg.max_pixels}"
        )
    scale = min(1.0, cfg.max_side / max(width, height))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if im.format == "JPEG" and scale < 1.0:
        im.draft("RGB", target)  # let libjpeg decode at 1/2, 1/4 or 1/8 scale: far less work
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            im = ImageOps.exif_transpose(im)  # first frame of an animation is what load() gives
            rgb = _to_rgb(im)
    except OSError as exc:
        reason = Reason.truncated_image if "truncated" in str(exc).lower() else Reason.decode_error
        raise ImageRejected(reason, str(exc)) from None
    except Exception as exc:
        raise ImageRejected(Reason.decode_error, f"{type(exc).__name__}: {exc}") from None

    if max(rgb.size) > cfg.max_side:
        rgb.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buf = io.BytesIO()
    fmt = _PIL_FORMAT[cfg.format]
    rgb.save(buf, fmt, **({} if fmt == "PNG" else {"quality": cfg.quality}))
    encoded = buf.getvalue()
    return PreparedImage(
        image=rgb,
        data=encoded,
        sha256=hashlib.sha256(encoded).hexdigest(),
        width=rgb.width,
        height=rgb.height,
        original_width=width,
        original_height=height,
    )
