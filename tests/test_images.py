import hashlib
import io
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
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


# --- sending a conforming input as it came ------------------------------------------------


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())  # a 512x512 RGB photograph


def photo(astronaut: Image.Image, size: tuple[int, int]) -> Image.Image:
    return astronaut.resize(size, Image.Resampling.LANCZOS)


def encoded(im: Image.Image, fmt: str = "JPEG", **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def rgb48_png(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow writes none): its header says 16 bits, its mode says RGB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    h, w, _ = arr.shape
    rows = b"".join(b"\0" + arr[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


WEB = ImageConfig()  # 512 px, JPEG, reencode: auto


def assert_sent_as_is(data: bytes, cfg: ImageConfig = WEB) -> None:
    p = prepare(data, cfg)
    assert p.passed_through and p.data == data
    assert p.sha256 == hashlib.sha256(data).hexdigest()
    assert p.decoded is None  # nothing decoded beyond the header
    size = Image.open(io.BytesIO(data)).size
    assert (p.width, p.height) == (p.original_width, p.original_height) == size
    assert p.image.mode == "RGB" and p.image.size == size  # decoded on demand, then cached
    assert p.image is p.image


def assert_reencoded(data: bytes, cfg: ImageConfig = WEB) -> None:
    p = prepare(data, cfg)
    assert not p.passed_through and p.decoded is not None  # decoded, then encoded again
    assert p.sha256 == hashlib.sha256(p.data).hexdigest()
    sent = decoded(p)
    assert sent.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[cfg.format]
    assert sent.mode == "RGB" and sent.size == (p.width, p.height)
    assert max(sent.size) <= cfg.max_side


@pytest.mark.parametrize("save", [{"quality": 85}, {"quality": 85, "progressive": True}])
def test_a_conforming_jpeg_is_sent_as_it_came(astronaut, save):
    assert_sent_as_is(encoded(photo(astronaut, (512, 384)), **save))


def test_upright_exif_and_exact_limits_still_conform(astronaut):
    exif = Image.Exif()
    exif[0x0112] = 1  # Orientation: already upright
    data = encoded(photo(astronaut, (300, 512)), quality=80, exif=exif)
    assert_sent_as_is(data, ImageConfig(max_side=512, max_bytes=len(data)))


def test_conforming_png_and_webp_when_that_is_the_format(astronaut):
    im = photo(astronaut, (256, 200))
    assert_sent_as_is(encoded(im, "PNG"), ImageConfig(format="png"))
    assert_sent_as_is(encoded(im, "WEBP", quality=80), ImageConfig(format="webp"))
    assert_sent_as_is(encoded(im, "WEBP", lossless=True), ImageConfig(format="webp"))


def test_exif_rotated_jpeg_is_turned_and_reencoded(astronaut):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    p = prepare(encoded(photo(astronaut, (400, 200)), exif=exif), WEB)
    assert not p.passed_through and (p.width, p.height) == (200, 400)
    assert decoded(p).size == (200, 400) and not decoded(p).getexif().get(0x0112)


def test_xmp_orientation_is_applied_too(astronaut):
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    p = prepare(encoded(photo(astronaut, (400, 200)), xmp=xmp), WEB)
    assert not p.passed_through and (p.width, p.height) == (200, 400)


def test_gps_position_is_not_carried_into_the_corpus(astronaut):
    exif = Image.Exif()
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 29.0)  # GPSLatitude
    data = encoded(photo(astronaut, (400, 300)), exif=exif)
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825)
    assert_reencoded(data)
    assert not Image.open(io.BytesIO(prepare(data, WEB).data)).getexif()


@pytest.mark.parametrize(
    "mode", ["CMYK", "L"]
)  # CMYK breaks many decoders; trainers expect RGB, so grey is made RGB
def test_cmyk_and_grayscale_jpegs_are_reencoded(astronaut, mode):
    assert_reencoded(encoded(photo(astronaut, (400, 300)).convert(mode)))


def test_oversized_and_overweight_jpegs_are_reencoded(astronaut):
    assert_reencoded(encoded(photo(astronaut, (640, 480))))  # wider than max_side
    assert_reencoded(encoded(photo(astronaut, (300, 640))))  # taller than max_side
    data = encoded(photo(astronaut, (512, 384)), quality=98)
    assert_reencoded(data, ImageConfig(max_bytes=len(data) - 1))


def test_other_formats_and_transparency_are_reencoded(astronaut):
    im = photo(astronaut, (256, 200))
    assert_reencoded(encoded(im, "PNG"))  # format is jpeg
    assert_reencoded(encoded(im, "WEBP"))
    png = ImageConfig(format="png")
    rgba = im.convert("RGBA")
    rgba.putalpha(128)
    assert_reencoded(encoded(rgba, "PNG"), png)
    keyed = im.copy()
    keyed.info["transparency"] = (0, 0, 0)  # an RGB PNG with a tRNS colour key
    assert_reencoded(encoded(keyed, "PNG"), png)
    assert_reencoded(encoded(im.convert("P"), "PNG"), png)
    assert_reencoded(rgb48_png(np.asarray(im).astype(">u2") * 257), png)  # 16 bits a sample


def test_animations_are_reencoded_to_their_first_frame(astronaut):
    frames = [photo(astronaut, (200, 150)), Image.new("RGB", (200, 150), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert_reencoded(gif)
    webp = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], quality=80)
    p = prepare(webp, ImageConfig(format="webp"))
    assert not p.passed_through
    assert np.asarray(decoded(p)).mean() > 40  # the photo, not the blue frame


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_cut_download_is_never_sent(astronaut, fmt):
    data = encoded(photo(astronaut, (400, 300)), fmt)
    cfg = ImageConfig(format=fmt.lower())
    with pytest.raises(ImageRejected) as info:
        prepare(data[: len(data) * 2 // 3], cfg)
    assert info.value.reason in (Reason.truncated_image, Reason.decode_error)
    if fmt == "JPEG":
        assert info.value.reason == Reason.truncated_image  # as before pass-through existed


def test_bytes_after_the_end_of_image_take_the_decoding_path(astronaut):
    assert_reencoded(encoded(photo(astronaut, (400, 300))) + b"\0" * 64)


def test_pixel_guard_holds_for_conforming_inputs(astronaut):
    with pytest.raises(ImageRejected) as info:
        prepare(encoded(photo(astronaut, (400, 300))), ImageConfig(max_pixels=100_000))
    assert info.value.reason == Reason.too_many_pixels


def test_reencode_always_never_passes_through(astronaut):
    im = photo(astronaut, (512, 384))
    for data, fmt in [
        (encoded(im), "jpeg"),
        (encoded(im, progressive=True), "jpeg"),
        (encoded(im, "PNG"), "png"),
        (encoded(im, "WEBP"), "webp"),
    ]:
        assert_reencoded(data, ImageConfig(format=fmt, reencode="always"))


def test_the_corpus_stores_conforming_inputs_byte_for_byte(astronaut, tmp_path):
    """A shard through the whole shard pass (offline analyzer): conforming images are stored
    and hashed as they came, the others as re-encoded, each row describing what was sent."""
    from conftest import write_metadata, write_tar

    from recaption.captioners import make_captioner
    from recaption.config import load_config
    from recaption.shard import process_shard
    from recaption.sources import list_shards

    inputs = {
        "000000000": encoded(photo(astronaut, (512, 384)), quality=85),
        "000000001": encoded(photo(astronaut, (384, 512)), quality=90, progressive=True),
        "000000002": encoded(photo(astronaut, (1024, 768))),  # too big: resized
        "000000003": encoded(photo(astronaut, (400, 300)).convert("CMYK")),
    }
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", [(f"{key}.jpg", data) for key, data in inputs.items()])
    write_metadata(
        shards / "00000.parquet",
        [
            {"key": k, "url": f"https://e.example/{k}.jpg", "caption": "an astronaut"}
            | {"status": "success", "error_message": None}
            for k in inputs
        ],
    )
    corpus = tmp_path / "corpus"
    cfg = load_config("pipelines/default.yaml", [f"input.path={shards}", f"output.path={corpus}"])
    report = process_shard(list_shards(str(shards))[0], cfg, make_captioner(cfg))
    assert report.captioned == len(inputs)

    rows = {r["key"]: r for r in pq.read_table(corpus / "data" / "00000.parquet").to_pylist()}
    for key in ("000000000", "000000001"):
        assert rows[key]["image"] == inputs[key]
        assert rows[key]["image_sha256"] == hashlib.sha256(inputs[key]).hexdigest()
    for key in ("000000002", "000000003"):
        assert rows[key]["image"] != inputs[key]
        assert rows[key]["image_sha256"] == hashlib.sha256(rows[key]["image"]).hexdigest()
    for row in rows.values():
        sent = Image.open(io.BytesIO(row["image"]))
        assert sent.mode == "RGB" and sent.size == (row["width"], row["height"])
        assert max(sent.size) <= 512
    assert (rows["000000002"]["width"], rows["000000002"]["height"]) == (512, 384)
