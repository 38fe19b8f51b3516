import hashlib
import io

import numpy as np
import pytest
from conftest import jpeg_bytes, png_bytes, png_header_claiming, scene_jpeg
from PIL import Image

from recaption.config import ImageConfig
from recaption.images import ImageRejected, prepare
from recaption.records import Reason

CFG = ImageConfig(max_side=64)


def decoded(prepared) -> Image.Image:
    return Image.open(io.BytesIO(prepared.data))


def test_resizes_longest_side_and_hashes_the_stored_bytes():
    p = prepare(jpeg_bytes(size=(400, 200)), CFG)
    assert (p.width, p.height) == (64, 32)
    assert (p.original_width, p.original_height) == (400, 200)
    assert decoded(p).size == (64, 32)
    assert p.sha256 == hashlib.sha256(p.data).hexdigest()


def test_small_images_are_not_upscaled():
    assert prepare(jpeg_bytes(size=(30, 20)), CFG).image.size == (30, 20)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.empty_file),
        (b"<!DOCTYPE html><html>404 not found</html>", Reason.not_an_image),
        (png_header_claiming(60000, 60000), Reason.too_many_pixels),
        (scene_jpeg()[: len(scene_jpeg()) // 2], Reason.truncated_image),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as info:
        prepare(data, CFG)
    assert info.value.reason == reason
    assert info.value.detail


def test_pixel_guard_is_configurable():
    with pytest.raises(ImageRejected) as info:
        prepare(jpeg_bytes(size=(100, 100)), ImageConfig(max_pixels=9_999))
    assert info.value.reason == Reason.too_many_pixels


def test_alpha_is_composited_on_white():
    p = prepare(png_bytes(Image.new("RGBA", (10, 10), (0, 0, 0, 0))), CFG)
    assert p.image.mode == "RGB"
    assert np.asarray(p.image).min() >= 250


def test_palette_with_transparency():
    im = Image.new("P", (10, 10), 0)
    im.putpalette([255, 0, 0] * 256)
    im.info["transparency"] = 0
    p = prepare(png_bytes(im), CFG)
    assert np.asarray(p.image).min() >= 250  # fully transparent -> white, not red


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    p = prepare(png_bytes(Image.fromarray(arr)), CFG)
    assert 120 <= np.asarray(p.image).mean() <= 135


def test_cmyk_becomes_rgb():
    p = prepare(jpeg_bytes(color=(0, 0, 255), mode="CMYK"), CFG)
    assert p.image.mode == "RGB"


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    red, _, blue = np.asarray(prepare(buf.getvalue(), CFG).image).reshape(-1, 3).mean(0)
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert prepare(buf.getvalue(), CFG).image.size == (20, 40)
