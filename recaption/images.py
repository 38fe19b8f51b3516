"""Image preparation: decode safely, normalise to RGB, resize, re-encode, hash.

Everything a web image can throw at us ends as an `ImageRejected` with a reason, never a crash.
An input that already is what re-encoding would make (`reencode: auto`, see `_sendable_as_is`)
is sent as it came: only its header is read, and its own bytes are hashed and sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from recaption.config import ImageConfig
from recaption.errors import Rejected
from recaption.records import Reason, Stage

_PIL_FORMAT = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}

# JPEG frames every decoder handles: baseline, extended sequential and progressive Huffman DCT
# (not arithmetic-coded, lossless or hierarchical ones, which many viewers refuse)
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2}
_GPS_IFD = 0x8825
# PNG chunks that make an image something other than plain opaque RGB (transparency, frames)
# or that may carry an orientation Pillow reads only after the pixels (eXIf, XMP, raw EXIF)
_PNG_REFUSED = {b"tRNS", b"acTL", b"eXIf"}
_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt"}
_PNG_METADATA_KEYS = {b"XML:com.adobe.xmp", b"Raw profile type exif"}


class ImageRejected(Rejected):
    stage = Stage.decode


@dataclass
class PreparedImage:
    data: bytes  # what is stored and what a VLM is sent: the re-encoded image, or the input's
    sha256: str  # of `data`
    width: int  # of `data`
    height: int
    original_width: int
    original_height: int
    passed_through: bool = False  # True: `data` is the input's own bytes, never decoded here
    # `data` decoded to RGB; a passed-through image is decoded only when `image` is first read
    decoded: Image.Image | None = field(default=None, repr=False, compare=False)
    # its recaption.dedup Fingerprint, when the run looks for duplicates (taken in the thread
    # that prepared it)
    fingerprint: Any = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> Image.Image:
        """`data` as an RGB image, longest side <= max_side (decoded once, then cached)."""
        if self.decoded is None:
            with _decoding():
                im = Image.open(io.BytesIO(self.data))
                im.load()
                self.decoded = _to_rgb(im)
        return self.decoded


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Decode failures as rejections: a cut file is `truncated_image`, anything else
    `decode_error`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except OSError as exc:
        reason = Reason.truncated_image if "truncated" in str(exc).lower() else Reason.decode_error
        raise ImageRejected(reason, str(exc)) from None
    except Exception as exc:
        raise ImageRejected(Reason.decode_error, f"{type(exc).__name__}: {exc}") from None


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


def _jpeg_frame(data: bytes) -> int | None:
    """The JPEG's frame (SOFn) marker, from the segments before the first scan."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker == 0xDA:  # start of scan: no frame header before it
            return None
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _png_plain(data: bytes) -> bool:
    """An 8-bit truecolour PNG, whole (ends with IEND), with no transparency, frames or
    metadata that could carry an orientation. Walks the chunk headers, never the pixels."""
    if data[24:26] != b"\x08\x02":  # IHDR bit depth 8, colour type 2 (RGB)
        return False
    pos, end = 8, len(data)
    while pos + 12 <= end:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        after = pos + 12 + length
        if kind == b"IEND":
            return after == end
        if after > end or kind in _PNG_REFUSED:
            return False
        if kind in _PNG_TEXT and data[pos + 8 : pos + 8 + 80].split(b"\0", 1)[0] in (
            _PNG_METADATA_KEYS
        ):
            return False
        pos = after
    return False  # cut before IEND


def _whole(im: Image.Image, data: bytes) -> bool:
    """Cheap completeness checks per format: a cut download must take the decoding path,
    which rejects it as `truncated_image`."""
    if im.format == "JPEG":
        return data.endswith(b"\xff\xd9") and _jpeg_frame(data) in _JPEG_FRAMES
    if im.format == "PNG":
        return _png_plain(data)
    if im.format == "WEBP":  # the RIFF header holds the file size
        return data[:4] == b"RIFF" and int.from_bytes(data[4:8], "little") + 8 == len(data)
    return False


def _sendable_as_is(im: Image.Image, data: bytes, cfg: ImageConfig) -> bool:
    """Whether re-encoding would only cost CPU: the input already is an opaque 8-bit RGB image
    in the configured format, within max_side and max_bytes, whole, upright (no EXIF/XMP
    orientation to apply), a single frame, and with no GPS position in its metadata (the
    re-encoding path strips metadata; the stored bytes must not gain a location).
    Reads only what `Image.open` parsed from the header."""
    try:
        return (
            im.format == _PIL_FORMAT[cfg.format]
            and im.mode == "RGB"  # not L, CMYK, P, RGBA, 16-bit
            and "transparency" not in im.info
            and getattr(im, "n_frames", 1) == 1
            and max(im.size) <= cfg.max_side
            and len(data) <= cfg.max_bytes
            and _whole(im, data)
            # PNG's getexif() decodes the pixels; _png_plain refused any chunk that may hold EXIF
            and (im.format == "PNG" or _upright_without_gps(im.getexif()))
        )
    except Exception:  # malformed metadata: let the decoding path judge it
        return False


def _upright_without_gps(exif: Image.Exif) -> bool:
    return exif.get(0x0112, 1) == 1 and _GPS_IFD not in exif


def _open(data: bytes | None) -> Image.Image:
    """The image's header, parsed; no pixels decoded."""
    if not data:
        raise ImageRejected(Reason.empty_file, "the image file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:16].decode("latin-1").lower()
        hint = "looks like HTML/text" if head.lstrip().startswith(("<", "{")) else "unknown format"
        raise ImageRejected(Reason.not_an_image, f"not a decodable image ({hint})") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(Reason.too_many_pixels, str(exc)) from None
    except Exception as exc:  # any other header parse failure
        raise ImageRejected(Reason.decode_error, f"{type(exc).__name__}: {exc}") from None


def prepare(data: bytes | None, cfg: ImageConfig) -> PreparedImage:
    im = _open(data)
    assert data is not None  # _open rejected empty input
    width, height = im.size
    if width * height > cfg.max_pixels:
        raise ImageRejected(
            Reason.too_many_pixels, f"{width}x{height} exceeds image.max_pixels={cfg.max_pixels}"
        )
    if cfg.reencode == "auto" and _sendable_as_is(im, data, cfg):
        return PreparedImage(
            data=data,
            sha256=hashlib.sha256(data).hexdigest(),
            width=width,
            height=height,
            original_width=width,
            original_height=height,
            passed_through=True,
        )

    scale = min(1.0, cfg.max_side / max(width, height))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if im.format == "JPEG" and scale < 1.0:
        im.draft("RGB", target)  # let libjpeg decode at 1/2, 1/4 or 1/8 scale: far less work
    with _decoding():
        im.load()
        im = ImageOps.exif_transpose(im)  # first frame of an animation is what load() gives
        rgb = _to_rgb(im)

    if max(rgb.size) > cfg.max_side:
        rgb.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buf = io.BytesIO()
    fmt = _PIL_FORMAT[cfg.format]
    rgb.save(buf, fmt, **({} if fmt == "PNG" else {"quality": cfg.quality}))
    encoded = buf.getvalue()
    return PreparedImage(
        data=encoded,
        sha256=hashlib.sha256(encoded).hexdigest(),
        width=rgb.width,
        height=rgb.height,
        original_width=width,
        original_height=height,
        decoded=rgb,
    )
