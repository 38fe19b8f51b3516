import asyncio
import io
import random

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from recaption.captioners import make_captioner
from recaption.captioners.analyzer import position_phrase, text_likely
from recaption.config import CaptionerConfig, ImageConfig, PipelineConfig, ValidationConfig
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


def test_text_gate_skips_ocr_on_flat_scenes():
    assert text_likely(np.asarray(sign("FRESH BREAD 24/7")))
    assert not text_likely(np.asarray(render(random_scene(random.Random(1)))))


def test_ocr_can_be_turned_off():
    analyzer = make_captioner(PipelineConfig(captioner=CaptionerConfig(ocr="never")))
    assert caption_of(analyzer, sign("OPEN DAILY")).visible_text == []
