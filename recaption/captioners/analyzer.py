"""The `analyzer` captioner: the offline default. No model weights, no network.

It describes what can be measured from the pixels: a named colour palette with shares,
light and contrast, where the detail sits, flat regions and the simple shapes they form
(with colour, size and position), faces (OpenCV's bundled Haar cascade) and legible text
(RapidOCR, whose models ship inside its wheel, when installed). It does not recognise
objects, and its captions say only what it measured: nothing about faces or text where it
did not look for them. Output is deterministic per image.

The measurements are in `measure`, the sentences in `describe`; this module holds the
detectors and ties the two together.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import cv2
import numpy as np
from PIL import Image

from recaption.captioners import CaptionResult
from recaption.captioners.base import Captioner
from recaption.captioners.describe import describe
from recaption.captioners.measure import Analysis, Region, measure, resize, text_likely
from recaption.config import ConfigError, PipelineConfig
from recaption.grid import position_phrase
from recaption.images import PreparedImage

__all__ = [
    "DEFAULT_MODEL",
    "VERSION",
    "Analysis",
    "Analyzer",
    "Region",
    "describe",
    "position_phrase",
    "text_likely",
]

VERSION = "analyzer-v2"  # stored as prompt_version: bump when captions change for the same image
DEFAULT_MODEL = "recaption-analyzer"
_FACE_SIDE = 320
_OCR_MISSING = (
    "captioner.ocr=always needs the OCR extra: pip install 'recaption[ocr]' (rapidocr-onnxruntime)"
)


class Analyzer(Captioner):
    backend = "analyzer"
    prompt_version = VERSION

    def __init__(self, config: PipelineConfig, limiters: dict[str, Any] | None = None):
        super().__init__(config, limiters)  # no requests, no limiters: it is all local
        cfg = config.captioner
        self.model = cfg.model or DEFAULT_MODEL
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
            except ImportError:
                # OCR is an optional extra: `auto` goes without it (and then says nothing
                # about text); `always` asked for it, so its absence is an error
                if cfg.ocr == "always":
                    raise ConfigError(_OCR_MISSING) from None
                self.ocr_mode = "never"
            else:
                self._ocr = RapidOCR(**_ocr_options())

    @classmethod
    def identity(cls, cfg: PipelineConfig) -> tuple[str, str]:
        return cfg.captioner.model or DEFAULT_MODEL, VERSION

    @classmethod
    def check(cls, cfg: PipelineConfig) -> None:
        """`ocr: always` without the OCR extra fails before anything is written."""
        if (
            cfg.captioner.ocr == "always"
            and importlib.util.find_spec("rapidocr_onnxruntime") is None
        ):
            raise ConfigError(_OCR_MISSING)

    async def caption(self, image: PreparedImage) -> CaptionResult:
        analysis = self.analyze(image.image)
        return CaptionResult(caption=describe(analysis, seed=image.sha256))

    def analyze(self, image: Image.Image) -> Analysis:
        rgb = np.asarray(image.convert("RGB"))
        analysis = measure(rgb)
        if self._faces is not None:
            analysis.faces = self._detect_faces(rgb)
            analysis.faces_checked = True
        if self._ocr is not None:
            # the gate is a check too: where it finds no glyph rows there is no legible text
            analysis.text_checked = True
            if self.ocr_mode == "always" or text_likely(rgb):
                analysis.text = self._read_text(rgb)
        return analysis

    def _detect_faces(self, rgb: np.ndarray) -> list[tuple[float, float]]:
        gray = cv2.cvtColor(resize(rgb, _FACE_SIDE), cv2.COLOR_RGB2GRAY)
        gray = cv2.equalizeHist(gray)
        found = self._faces.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=6, minSize=(28, 28)
        )
        gh, gw = gray.shape
        return sorted(((x + fw / 2) / gw, (y + fh / 2) / gh) for x, y, fw, fh in found)

    def _read_text(self, rgb: np.ndarray) -> list[str]:
        result, _ = self._ocr(resize(rgb, 640), use_cls=False)  # web text is mostly upright
        lines = []
        for _box, text, score in sorted(result or [], key=lambda r: (r[0][0][1], r[0][0][0])):
            text = " ".join(str(text).split())
            if float(score) >= 0.8 and len(text) >= 2 and text not in lines:
                lines.append(text)
        return lines


def _ocr_options() -> dict[str, Any]:
    """ONNX Runtime's thread pools for the OCR models: the CPUs this process was given. A Ray
    worker sets OMP_NUM_THREADS to its CPUs, which ONNX Runtime ignores: by default it runs a
    thread per core and spins while waiting, so two workers on two cores fight over four
    threads. Measured on ten signs (OCR alone, one process): 6.7 -> 4.3 s of CPU, the same
    text read. (RapidOCR's detector also scales the shorter side up to 736 px; reading at
    the image's own size costs 5x less but loses the gaps between words, so it stays.)"""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and 0 < int(threads) <= (os.cpu_count() or 1):
        return {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
    return {}
