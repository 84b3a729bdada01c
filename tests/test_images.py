"""Tests for actatlas.data: image sources, labels, decoding of odd modes and broken files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actatlas.data import ImageDecodeError, ImageItem, ImageSource, images, load_rgb, to_rgb
from actatlas.data import bundled
from actatlas.errors import UserError
from actatlas.models.spec import imagenet_classes


def _write(path: Path, color=(10, 20, 30), size=(6, 5), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _rgb_array(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


# ------------------------------------------------------------------------------------------
# Folder sources


def test_folder_order_recursion_and_skipped(tmp_path):
    _write(tmp_path / "b.png")
    _write(tmp_path / "a.JPEG", fmt="JPEG")
    _write(tmp_path / "sub" / "z.bmp")
    _write(tmp_path / "sub" / "deeper" / "c.jpg")
    _write(tmp_path / ".hidden.png")
    _write(tmp_path / ".cache" / "x.png")
    (tmp_path / "notes.txt").write_text("hi")

    src = images(tmp_path)
    rel = [os.path.relpath(it.path, tmp_path) for it in src]
    assert rel == ["a.JPEG", "b.png", os.path.join("sub", "deeper", "c.jpg"), os.path.join("sub", "z.bmp")]
    assert [it.index for it in src] == [0, 1, 2, 3]
    assert all(os.path.isabs(it.path) for it in src)
    assert [os.path.basename(p) for p in src.skipped_listing] == ["notes.txt"]
    assert "4 images" in src.description and str(tmp_path) in src.description

    flat = images(str(tmp_path), recursive=False)
    assert [os.path.basename(it.path) for it in flat] == ["a.JPEG", "b.png"]


def test_folder_label_keys(tmp_path):
    _write(tmp_path / "n01440764_1.JPEG", fmt="JPEG")
    _write(tmp_path / "plain.png")
    _write(tmp_path / "goldfish" / "g1.png")
    _write(tmp_path / "n01484850" / "shark.png")
    _write(tmp_path / "other" / "n01443537_7.png")
    _write(tmp_path / "unknown_thing" / "u.png")

    keys = {os.path.relpath(it.path, tmp_path): it.label_key for it in images(tmp_path)}
    assert keys == {
        "n01440764_1.JPEG": "n01440764",
        "plain.png": None,
        os.path.join("goldfish", "g1.png"): "goldfish",
        os.path.join("n01484850", "shark.png"): "n01484850",
        os.path.join("other", "n01443537_7.png"): "n01443537",
        os.path.join("unknown_thing", "u.png"): "unknown_thing",
    }


def test_labels_resolve_against_imagenet(tmp_path, caplog):
    names, wnids = imagenet_classes()
    _write(tmp_path / "a" / "n01440764_1.png")  # wnid prefix -> tench (0)
    _write(tmp_path / "goldfish" / "x.png")  # name -> 1
    _write(tmp_path / "Great_White_Shark" / "y.png")  # case-insensitive, '_' == ' ' -> 2
    _write(tmp_path / "nonsense" / "z.png")  # -> -1
    _write(tmp_path / "crane" / "w.png")  # ambiguous in ImageNet -> -1
    _write(tmp_path / "top.png")  # no key -> -1
    src = images(tmp_path)
    order = [os.path.relpath(it.path, tmp_path).split(os.sep)[0] for it in src]
    with caplog.at_level(logging.WARNING, logger="actatlas.data.sources"):
        labels = src.labels(names, wnids)
    assert labels.dtype == np.int64 and labels.shape == (len(src),)
    got = dict(zip(order, labels.tolist()))
    assert got == {"a": 0, "goldfish": 1, "Great_White_Shark": 2, "nonsense": -1, "crane": -1, "top.png": -1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 label keys" in warnings[0].getMessage()
    # without wnids only names resolve
    assert images(tmp_path / "a").labels(names).tolist() == [-1]


def test_head_and_slices(tmp_path):
    for i in range(5):
        _write(tmp_path / f"img{i}.png")
    src = images(tmp_path)
    h = src.head(3)
    assert isinstance(h, ImageSource) and len(h) == 3
    assert list(h) == list(src)[:3]
    assert "3 of 5" in h.description
    assert len(src.head(100)) == 5
    assert src[-1].index == 4 and isinstance(src[1:3], ImageSource)
    assert [it.index for it in src[1:3]] == [1, 2]
    assert isinstance(src[0], ImageItem)
    with pytest.raises(IndexError):
        src[5]
    assert h.fingerprint() != src.fingerprint()


def test_empty_and_missing(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        images(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        images(tmp_path / "nope")
    with pytest.raises(UserError):
        images(tmp_path / "readme.md")


def test_fingerprint_changes_with_files(tmp_path):
    p = _write(tmp_path / "a.png")
    _write(tmp_path / "b.png")
    fp1 = images(tmp_path).fingerprint()
    assert fp1 == images(tmp_path).fingerprint() and len(fp1) == 64
    _write(p, color=(200, 0, 0), size=(9, 9))
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    fp2 = images(tmp_path).fingerprint()
    assert fp2 != fp1
    _write(tmp_path / "c.png")
    assert images(tmp_path).fingerprint() != fp2


# ------------------------------------------------------------------------------------------
# List sources


def test_text_file_source(tmp_path):
    _write(tmp_path / "imgs" / "b.png", color=(1, 2, 3))
    _write(tmp_path / "imgs" / "n01440764_9.png")
    absolute = _write(tmp_path / "elsewhere" / "a.png", color=(250, 0, 0))
    lst = tmp_path / "list.txt"
    lst.write_text(
        "# my images\n"
        "imgs/b.png\tgoldfish\n"
        "\n"
        f"{absolute}\n"
        "   # indented comment\n"
        "imgs/n01440764_9.png\n"
    )
    src = images(str(lst))
    assert [it.path for it in src] == [
        str(tmp_path / "imgs" / "b.png"),
        str(absolute),
        str(tmp_path / "imgs" / "n01440764_9.png"),
    ]
    assert [it.label_key for it in src] == ["goldfish", None, "n01440764"]
    names, wnids = imagenet_classes()
    assert src.labels(names, wnids).tolist() == [1, -1, 0]
    assert tuple(_rgb_array(src.load(src[1]))[0, 0]) == (250, 0, 0)

    empty = tmp_path / "empty.lst"
    empty.write_text("# nothing\n\n")
    with pytest.raises(UserError):
        images(empty)


def test_list_of_paths(tmp_path):
    a = _write(tmp_path / "a.png")
    b = _write(tmp_path / "b.png")
    src = images([b, str(a)])
    assert [it.path for it in src] == [str(b), str(a)]
    with pytest.raises(UserError):
        images([])
    with pytest.raises(UserError):
        images([tmp_path / "missing1.png", tmp_path / "missing2.png"])


def test_single_image_file(tmp_path):
    p = _write(tmp_path / "one.png")
    src = images(p)
    assert len(src) == 1 and src[0].path == str(p)


# ------------------------------------------------------------------------------------------
# Decoding


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_mode_L_LA_1(tmp_path):
    arr = _rgb_array(load_rgb(_save(Image.new("L", (4, 4), 128), tmp_path / "l.png")))
    assert (arr == 128).all()

    la = Image.new("LA", (4, 4), (50, 255))
    la.putpixel((0, 0), (50, 0))
    arr = _rgb_array(load_rgb(_save(la, tmp_path / "la.png")))
    assert (arr[0, 0] == 255).all() and (arr[1, 1] == 50).all()

    one = Image.new("1", (8, 8), 0)
    one.putpixel((1, 1), 1)
    arr = _rgb_array(load_rgb(_save(one, tmp_path / "one.png")))
    assert (arr[0, 0] == 0).all() and (arr[1, 1] == 255).all()


def test_mode_P_with_and_without_transparency(tmp_path):
    rgb = Image.new("RGB", (4, 4), (255, 0, 0))
    rgb.putpixel((0, 0), (0, 0, 255))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    arr = _rgb_array(load_rgb(_save(pal, tmp_path / "p.png")))
    assert tuple(arr[0, 0]) == (0, 0, 255) and tuple(arr[2, 2]) == (255, 0, 0)

    blue_index = pal.getpixel((0, 0))
    path = _save(pal, tmp_path / "pt.png", transparency=blue_index)
    with Image.open(path) as im:
        assert im.mode == "P" and "transparency" in im.info
    arr = _rgb_array(load_rgb(path))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[2, 2]) == (255, 0, 0)

    gif = _save(pal, tmp_path / "pt.gif", transparency=blue_index)
    assert tuple(_rgb_array(load_rgb(gif))[0, 0]) == (255, 255, 255)


def test_mode_RGBA(tmp_path):
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (_rgb_array(load_rgb(_save(clear, tmp_path / "clear.png"))) == 255).all()
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    arr = _rgb_array(load_rgb(_save(half, tmp_path / "half.png")))
    assert 120 <= int(arr[0, 0, 0]) <= 135
    opaque = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    assert tuple(_rgb_array(load_rgb(_save(opaque, tmp_path / "opaque.webp", lossless=True)))[0, 0]) == (10, 200, 30)


def test_mode_CMYK_and_YCbCr(tmp_path):
    white = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert (_rgb_array(load_rgb(_save(white, tmp_path / "cmyk.tif"))) == 255).all()
    jpg = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    r, g, b = _rgb_array(load_rgb(jpg))[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60
    ycc = Image.new("RGB", (4, 4), (0, 128, 0)).convert("YCbCr")
    r, g, b = _rgb_array(to_rgb(ycc))[0, 0].astype(int)
    assert g > 100 and r < 30 and b < 30


def test_mode_16_bit(tmp_path):
    data = np.zeros((4, 4), dtype=np.uint16)
    data[0, 0] = 65535
    data[1, 1] = 257 * 100
    path = _save(Image.fromarray(data), tmp_path / "i16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    arr = _rgb_array(load_rgb(path))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (100, 100, 100)
    assert tuple(arr[2, 2]) == (0, 0, 0)

    big_endian = Image.frombytes("I;16B", (2, 1), np.array([65535, 0], dtype=">u2").tobytes())
    arr = _rgb_array(to_rgb(big_endian))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 1]) == (0, 0, 0)


def test_mode_I_and_F(tmp_path):
    small = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert small.mode == "I"
    arr = _rgb_array(load_rgb(_save(small, tmp_path / "small_i.tif")))
    assert arr[0, 1, 0] == 200 and arr[0, 0, 0] == 0

    wide = Image.fromarray(np.array([[0, 1_000_000, 500_000]], dtype=np.int32))
    arr = _rgb_array(load_rgb(_save(wide, tmp_path / "wide_i.tif")))
    assert arr[0, 1, 0] == 255 and 126 <= arr[0, 2, 0] <= 129

    unit = Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32))
    assert unit.mode == "F"
    arr = _rgb_array(load_rgb(_save(unit, tmp_path / "f.tif")))
    assert arr[0, 0, 0] == 0 and arr[0, 1, 0] == 255 and 126 <= arr[0, 2, 0] <= 129

    nan = Image.fromarray(np.array([[np.nan, 40.0, -3.0]], dtype=np.float32))
    arr = _rgb_array(to_rgb(nan))
    assert arr[0].tolist() == [[0, 0, 0], [40, 40, 40], [0, 0, 0]]


def test_exif_orientation(tmp_path):
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(path).size == (4, 8)


def test_broken_files_raise_decode_error(tmp_path):
    good = _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                 tmp_path / "good.jpg", quality=90)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.jpg"
    text.write_text("this is not an image\n" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (truncated, text, empty, tmp_path / "missing.png"):
        with pytest.raises(ImageDecodeError) as info:
            load_rgb(bad)
        assert str(bad) in str(info.value) and info.value.path == str(bad)
    src = images(tmp_path)
    results = {}
    for item in src:
        try:
            src.load(item)
            results[os.path.basename(item.path)] = "ok"
        except ImageDecodeError:
            results[os.path.basename(item.path)] = "bad"
    assert results == {"empty.png": "bad", "good.jpg": "ok", "text.jpg": "bad", "truncated.jpg": "bad"}


# ------------------------------------------------------------------------------------------
# Bundled sample


def test_bundled_photos_exist():
    photos = bundled.available_photos()
    assert len(photos) >= 8, photos


def test_sample_determinism_and_content():
    a = images("sample:6", seed=3)
    b = images("sample:6", seed=3)
    c = images("sample:6", seed=4)
    assert len(a) == 6 and [it.index for it in a] == list(range(6))
    assert [it.path for it in a] == [it.path for it in b]
    assert [it.path for it in a] != [it.path for it in c]
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert all(it.path.startswith("sample:") and "#" in it.path and it.label_key is None for it in a)
    for ia, ib in zip(a, b):
        pa, pb = a.load(ia), b.load(ib)
        arr = _rgb_array(pa)
        assert np.array_equal(arr, np.asarray(pb))
        assert arr.shape[0] == arr.shape[1] and arr.std() > 0
        assert np.array_equal(arr, np.asarray(load_rgb(ia.path)))
    assert len(images("sample")) == bundled.DEFAULT_COUNT
    assert all(-1 == v for v in a.labels(*imagenet_classes()))


def test_sample_crop_sizes():
    src = images("sample:200", seed=0)
    for it in src:
        name, box = it.path[len("sample:"):].split("#")
        x0, y0, x1, y1 = map(int, box.split(","))
        w, h = bundled._photo_size(name)
        side = x1 - x0
        assert side == y1 - y0
        assert 0.2 * min(w, h) - 1 <= side <= min(w, h)
        assert 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h
    assert len({it.path.split("#")[0] for it in src}) >= 8  # many different photos


@pytest.mark.parametrize("spec", ["sample:0", "sample:-2", "sample:abc", "sample:1.5", "sample:"])
def test_sample_bad_count(spec):
    with pytest.raises(UserError):
        images(spec)


def test_bad_sample_paths_raise_decode_error():
    for bad in ("sample:nope.png#0,0,5,5", "sample:astronaut.png#0,0,9999,9999", "sample:../x#0,0,1,1"):
        with pytest.raises(ImageDecodeError):
            load_rgb(bad)
