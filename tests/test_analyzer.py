import asyncio
import io
import random
import re
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from recaption.captioners import make_captioner
from recaption.captioners.analyzer import Analyzer, position_phrase, text_likely
from recaption.config import (
    CaptionerConfig,
    ConfigError,
    ImageConfig,
    PipelineConfig,
    ValidationConfig,
)
from recaption.images import prepare
from recaption.scenes import random_scene, render
from recaption.validation import validate_caption


@pytest.fixture(scope="module")
def analyzer():
    return make_captioner(PipelineConfig())


def as_jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def caption_of(analyzer, im: Image.Image):
    return asyncio.run(analyzer.caption(prepare(as_jpeg(im), ImageConfig()))).caption


def test_names_colour_kind_and_position_of_scene_shapes(analyzer):
    rng = random.Random(7)
    truth_total = found_total = matched = 0
    for _ in range(80):
        scene = random_scene(rng)
        image = prepare(as_jpeg(render(scene)), ImageConfig()).image
        truth = {(s.color, s.kind, position_phrase(s.cx, s.cy)) for s in scene.shapes}
        found = {(r.color, r.kind, r.position) for r in analyzer.analyze(image).shapes}
        truth_total, found_total, matched = (
            truth_total + len(truth),
            found_total + len(found),
            matched + len(truth & found),
        )
    assert matched / truth_total >= 0.95, f"recall {matched / truth_total:.3f}"
    assert matched / found_total >= 0.95, f"precision {matched / found_total:.3f}"


def test_scene_caption_says_what_is_there(analyzer):
    rng = random.Random(3)
    scene = random_scene(rng)
    caption = caption_of(analyzer, render(scene))
    for s in scene.shapes:
        assert f"{s.color} {s.kind} {position_phrase(s.cx, s.cy)}" in caption.caption
        assert f"{s.color} {s.kind}" in caption.objects
    assert caption.style == "flat graphic"
    assert scene.background in caption.caption_short


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera", "rocket", "brick"])
def test_photo_captions_are_valid_prose_and_deterministic(analyzer, name):
    im = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    first, second = caption_of(analyzer, im), caption_of(analyzer, im)
    assert first == second
    assert 60 <= len(first.caption.split()) <= 150
    assert first.style.endswith("photograph")
    validate_caption(first, ValidationConfig())


def test_finds_the_astronauts_face(analyzer):
    caption = caption_of(analyzer, Image.fromarray(skimage.data.astronaut()))
    assert "face" in caption.objects
    assert "face is visible" in caption.caption.lower()


def sign(text: str) -> Image.Image:
    im = Image.new("RGB", (512, 256), (250, 250, 250))
    ImageDraw.Draw(im).text((30, 90), text, fill=(180, 20, 20), font=ImageFont.load_default(56))
    return im


def test_reads_visible_text_where_it_is_likely(analyzer):
    caption = caption_of(analyzer, sign("OPEN DAILY"))
    assert caption.visible_text == ["OPEN DAILY"]
    assert '"OPEN DAILY"' in caption.caption
    assert "text" in caption.objects


def test_ocr_runs_on_the_cpus_a_ray_worker_was_given(monkeypatch):
    """Ray sets OMP_NUM_THREADS to a worker's CPUs; ONNX Runtime must be told it."""
    pytest.importorskip("rapidocr_onnxruntime")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ocr = make_captioner(PipelineConfig())._ocr
    for session in (ocr.text_det.infer.session, ocr.text_rec.session.session):
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert caption_of(make_captioner(PipelineConfig()), sign("OPEN DAILY")).visible_text == [
        "OPEN DAILY"
    ]


def test_text_gate_skips_ocr_on_flat_scenes():
    assert text_likely(np.asarray(sign("FRESH BREAD 24/7")))
    assert not text_likely(np.asarray(render(random_scene(random.Random(1)))))


def test_ocr_can_be_turned_off():
    analyzer = make_captioner(PipelineConfig(captioner=CaptionerConfig(ocr="never")))
    assert caption_of(analyzer, sign("OPEN DAILY")).visible_text == []


# --- it states only what it checked ---------------------------------------------------------


def with_captioner(**captioner) -> PipelineConfig:
    return PipelineConfig(captioner=CaptionerConfig(**captioner))


def says(caption, word: str) -> bool:
    """Does any field of the caption use the word (or its plural)?"""
    said = f"{caption.caption} {caption.caption_short} {' '.join(caption.objects)}"
    return bool(re.search(rf"\b{word}s?\b", said, re.IGNORECASE))


def photo(name: str) -> Image.Image:
    return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")


@pytest.fixture
def without_ocr_package(monkeypatch):
    """The environment without the OCR extra: importing it fails."""
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)


def test_without_the_ocr_package_it_says_nothing_about_text(without_ocr_package):
    analyzer = make_captioner(PipelineConfig())  # ocr: auto goes without it
    for im in (sign("OPEN DAILY"), photo("coffee")):
        caption = caption_of(analyzer, im)
        assert caption.visible_text == []
        assert not says(caption, "text"), caption.caption
        assert "No faces are visible." in caption.caption  # the faces were checked


def test_with_ocr_never_it_says_nothing_about_text():
    analyzer = make_captioner(with_captioner(ocr="never"))
    for im in (sign("OPEN DAILY"), photo("coffee")):
        caption = caption_of(analyzer, im)
        assert not says(caption, "text"), caption.caption
        assert "No faces are visible." in caption.caption


def test_with_faces_off_it_says_nothing_about_faces():
    for ocr in ("never", "auto"):
        analyzer = make_captioner(with_captioner(faces=False, ocr=ocr))
        for name in ("astronaut", "coffee"):  # the astronaut's face is found when looked for
            caption = caption_of(analyzer, photo(name))
            assert not says(caption, "face"), caption.caption
            if ocr == "never":
                assert not says(caption, "text"), caption.caption


def test_with_faces_off_it_says_only_that_no_text_is_visible():
    pytest.importorskip("rapidocr_onnxruntime")
    caption = caption_of(make_captioner(with_captioner(faces=False)), photo("coffee"))
    assert "No legible text is visible." in caption.caption
    assert not says(caption, "face")


def test_when_both_were_checked_and_nothing_found_it_says_so(analyzer):
    pytest.importorskip("rapidocr_onnxruntime")
    assert "No faces or legible text are visible." in caption_of(analyzer, photo("coffee")).caption


def test_ocr_always_without_the_package_is_a_one_line_config_error(without_ocr_package):
    cfg = with_captioner(ocr="always")
    for make in (make_captioner, Analyzer.check):
        with pytest.raises(ConfigError, match=re.escape("pip install 'recaption[ocr]'")) as err:
            make(cfg)
        assert "\n" not in str(err.value) and "captioner.ocr=always" in str(err.value)


def test_a_scanned_page_is_not_called_a_photograph(analyzer):
    caption = caption_of(analyzer, photo("page"))
    assert caption.style == "black-and-white image"
    assert "photograph" not in caption.caption and "photograph" not in caption.caption_short
    assert caption.caption.startswith("A black-and-white image ")
    validate_caption(caption, ValidationConfig())


def test_a_smooth_render_is_an_image_not_a_photograph(analyzer):
    yy, xx = np.mgrid[:384, :512] / 512.0
    gradient = np.stack([0.2 + 0.6 * yy, 0.3 + 0.4 * xx, 0.8 - 0.3 * yy], -1)
    caption = caption_of(analyzer, Image.fromarray((gradient * 255).astype(np.uint8)))
    assert caption.style == "image"
    assert caption.caption.startswith("An image ")
