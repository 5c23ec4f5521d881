"""Tests for imgclf.data.imaging: every mode/format decodes to the documented RGB pixels."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from imgclf.data.imaging import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    is_image_file,
    load_rgb,
    load_rgb_bytes,
)


def _px(img, xy=(0, 0)):
    return img.getpixel(xy)


def _check_rgb(img, size=None):
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    if size is not None:
        assert img.size == size


# ----------------------------------------------------------------- names


def test_extensions_and_is_image_file():
    assert IMAGE_EXTENSIONS == frozenset(
        {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    )
    assert is_image_file("a/b/photo.JPG")
    assert is_image_file("x.Tiff")
    assert is_image_file("x.webp")
    assert not is_image_file("README.txt")
    assert not is_image_file(".DS_Store")
    assert not is_image_file("._photo.jpg")  # AppleDouble sidecar
    assert not is_image_file("Thumbs.db")
    assert not is_image_file("noext")


# ----------------------------------------------------------------- modes


def test_grayscale_L_replicated(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (5, 4), 77).save(p)
    img = load_rgb(p)
    _check_rgb(img, (5, 4))
    assert _px(img) == (77, 77, 77)


def test_bilevel_1(tmp_path):
    p = tmp_path / "b.png"
    im = Image.new("1", (4, 4), 0)
    im.putpixel((1, 1), 1)
    im.save(p)
    img = load_rgb(p)
    _check_rgb(img, (4, 4))
    assert _px(img) == (0, 0, 0)
    assert _px(img, (1, 1)) == (255, 255, 255)


def test_palette_without_transparency(tmp_path):
    p = tmp_path / "p.png"
    im = Image.new("P", (3, 3), 1)
    im.putpalette([0, 0, 0, 10, 120, 230] + [0] * 762)
    im.save(p)
    assert _px(load_rgb(p)) == (10, 120, 230)


def test_palette_with_transparency_over_white(tmp_path):
    p = tmp_path / "pt.png"
    im = Image.new("P", (3, 3), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.putpixel((2, 2), 1)
    im.save(p, transparency=0)
    assert Image.open(p).mode == "P"
    img = load_rgb(p)
    assert _px(img) == (255, 255, 255)  # transparent index 0 (black) -> white
    assert _px(img, (2, 2)) == (200, 10, 10)


def test_rgba_composited_over_white(tmp_path):
    p = tmp_path / "a.png"
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 1), (255, 0, 0, 255))
    im.putpixel((2, 2), (0, 0, 0, 128))  # half transparent black
    im.save(p)
    img = load_rgb(p)
    assert _px(img) == (255, 255, 255)
    assert _px(img, (1, 1)) == (255, 0, 0)
    assert _px(img, (2, 2)) in {(127, 127, 127), (126, 126, 126), (128, 128, 128)}


def test_la_composited_over_white(tmp_path):
    p = tmp_path / "la.png"
    im = Image.new("LA", (2, 2), (0, 0))
    im.putpixel((1, 1), (50, 255))
    im.save(p)
    img = load_rgb(p)
    assert _px(img) == (255, 255, 255)
    assert _px(img, (1, 1)) == (50, 50, 50)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)
    d = decode_image(p)
    assert d.mode == "CMYK" and d.format == "JPEG"
    r, g, b = _px(d.image, (8, 8))
    assert r > 240 and g < 15 and b < 15  # pure red


def test_16bit_png_scaled_not_clipped(tmp_path):
    p = tmp_path / "s16.png"
    arr = np.array([[65535, 0, 257 * 100, 32896]], dtype=np.uint16)
    Image.fromarray(arr).save(p)
    d = decode_image(p)
    assert d.mode.startswith("I")
    img = d.image
    _check_rgb(img, (4, 1))
    assert _px(img, (0, 0)) == (255, 255, 255)
    assert _px(img, (1, 0)) == (0, 0, 0)
    assert _px(img, (2, 0)) == (100, 100, 100)  # clipping would give 255
    assert _px(img, (3, 0)) == (128, 128, 128)


def test_16bit_big_endian_tiff(tmp_path):
    p = tmp_path / "b16.tif"
    arr = np.full((2, 2), 257 * 40, dtype=">u2")
    arr[1, 1] = 65535
    Image.frombytes("I;16B", (2, 2), arr.tobytes()).save(p)
    d = decode_image(p)
    assert d.mode == "I;16B"
    assert _px(d.image) == (40, 40, 40)
    assert _px(d.image, (1, 1)) == (255, 255, 255)


def test_mode_I_tiff(tmp_path):
    p = tmp_path / "i.tif"
    im = Image.new("I", (3, 3), 257 * 200)
    im.putpixel((1, 1), 70000)  # above 16-bit range: clipped after scaling
    im.save(p)
    d = decode_image(p)
    assert d.mode == "I"
    assert _px(d.image) == (200, 200, 200)
    assert _px(d.image, (1, 1)) == (255, 255, 255)


def test_float_tiff_unit_range_scaled(tmp_path):
    p = tmp_path / "f.tif"
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(arr).save(p)
    d = decode_image(p)
    assert d.mode == "F"
    assert [_px(d.image, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_tiff_large_range_clipped(tmp_path):
    p = tmp_path / "f2.tif"
    arr = np.array([[-5.0, 100.0, 300.0]], dtype=np.float32)
    Image.fromarray(arr).save(p)
    assert [_px(load_rgb(p), (x, 0))[0] for x in range(3)] == [0, 100, 255]


# ----------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "ext,fmt,kwargs,tol",
    [
        (".jpg", "JPEG", {"quality": 95}, 6),
        (".png", "PNG", {}, 0),
        (".bmp", "BMP", {}, 0),
        (".tif", "TIFF", {}, 0),
        (".webp", "WEBP", {"lossless": True}, 0),
    ],
)
def test_formats(tmp_path, ext, fmt, kwargs, tol):
    p = tmp_path / f"img{ext}"
    Image.new("RGB", (12, 7), (30, 140, 220)).save(p, **kwargs)
    d = decode_image(p)
    assert d.format == fmt
    _check_rgb(d.image, (12, 7))
    got = np.array(_px(d.image, (6, 3)))
    assert np.abs(got - np.array([30, 140, 220])).max() <= tol


def test_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(p).n_frames == 2
    img = load_rgb(p)
    _check_rgb(img, (8, 8))
    assert _px(img, (4, 4)) == (255, 0, 0)


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(p, exif=exif.tobytes(), quality=95)
    img = load_rgb(p)
    assert img.size == (20, 40)
    # Orientation 6 = rotate 90 deg clockwise for display: left strip ends up on top.
    assert _px(img, (10, 2))[0] > 200
    assert _px(img, (10, 37))[0] < 50


def test_draft_size_reduces_large_jpeg(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), (10, 200, 30)).save(p)
    assert load_rgb(p).size == (800, 600)
    small = load_rgb(p, draft_size=100)
    assert small.size == (200, 150)  # 1/4 scale: smallest keeping both sides >= 100
    assert small.mode == "RGB"
    # Non-JPEG files ignore draft_size.
    q = tmp_path / "big.png"
    Image.new("RGB", (800, 600)).save(q)
    assert load_rgb(q, draft_size=100).size == (800, 600)


def test_load_rgb_bytes(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (3, 2), 9).save(buf, "PNG")
    img = load_rgb_bytes(buf.getvalue())
    _check_rgb(img, (3, 2))
    assert _px(img) == (9, 9, 9)
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb_bytes(b"", name="up.png")
    assert ei.value.kind == "zero-byte" and str(ei.value).startswith("up.png: ")
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb_bytes(b"hello world")
    assert ei.value.kind == "not-an-image" and ei.value.path == "<upload>"


# ----------------------------------------------------------------- failures


def _assert_one_line(err: ImageDecodeError, path):
    s = str(err)
    assert "\n" not in s
    assert s == f"{path}: {err.reason}"
    assert err.path == str(path)


def test_zero_byte(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(p)
    assert ei.value.kind == "zero-byte"
    _assert_one_line(ei.value, p)


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\nsecond line\n")
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(p)
    assert ei.value.kind == "not-an-image"
    assert isinstance(ei.value, ValueError)
    _assert_one_line(ei.value, p)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(p)
    assert ei.value.kind == "truncated"
    _assert_one_line(ei.value, p)


def test_decompression_bomb(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(p)
    err = ei.value
    assert err.kind == "too-large"
    _assert_one_line(err, p)
    assert "10,000 pixels" in str(err)
    assert "2,000" in str(err) and "1,000" in str(err)


def test_guard_left_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0


def test_missing_file_is_unreadable(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(p)
    assert ei.value.kind == "unreadable"
    _assert_one_line(ei.value, p)


def test_corrupt_png_body_never_raw(tmp_path):
    good = tmp_path / "good.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    data = bytearray(good.read_bytes())
    for i in range(60, len(data) - 20, 7):  # scribble over the IDAT payload
        data[i] ^= 0xFF
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError) as ei:
        load_rgb(p)
    assert ei.value.kind in {"truncated", "unreadable"}
    _assert_one_line(ei.value, p)


def test_error_pickles():
    e = ImageDecodeError("a.jpg", "bad\nthing", "truncated")
    assert str(e) == "a.jpg: bad thing"
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.reason, e2.kind) == ("a.jpg", "bad thing", "truncated")


def test_file_not_modified(tmp_path):
    p = tmp_path / "r.jpg"
    im = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(p, exif=exif.tobytes())
    before = (p.read_bytes(), p.stat().st_mtime_ns)
    load_rgb(p)
    assert (p.read_bytes(), p.stat().st_mtime_ns) == before
