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


# ------------------------------------------------------------------------------------------
# Hardening: wide-mode and bomb patches, the pixel cap, draft (reduced-scale) JPEG decoding

SAMPLE_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def _bomb_png(path: Path, width: int, height: int, *, valid: bool = True) -> Path:
    """A tiny 1-bit grey PNG whose header says width x height (all zero pixels, compressed ~1000:1).
    valid=False: the pixel data is cut short (only a full decode would notice)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows = height if valid else 3
    idat = b"".join(comp.compress(row * min(1000, rows - a)) for a in range(0, rows, 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _grey16_gradient(path: Path) -> tuple[Path, np.ndarray]:
    """A 16-bit grey PNG 64 x 16 with a horizontal gradient over the full 0..65535 range; and the
    8-bit grey levels it should load as (value / 257)."""
    data = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.fromarray(data).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a wide-mode file
    return path, np.rint(data / 257.0).astype(np.uint8)


def _patch_world(tmp_path: Path):
    """A folder of small images labelled by the tiny patch model's own predictions, and a target
    class different from at least one image's class."""
    import actatlas as aa
    from patchmodels import labelled_folder  # tests/ on sys.path

    spec = aa.load_model("patchmodels:balanced_tiny_cnn")
    folder = tmp_path / "imgs"
    _, pred = labelled_folder(spec, folder, 6, seed=5, name="im{k}.png")
    target = next(c for c in range(10) if c != pred[0])
    return folder, target


def _patch_attack_argv(folder: Path, target: int, patch: Path, out: Path) -> list[str]:
    return ["patch-attack", "--model", "patchmodels:balanced_tiny_cnn", "--images", str(folder), "--target",
            f"c{target}", "--patch", str(patch), "--sizes", "0.5", "--corners", "1", "--out", str(out),
            "--quiet", "--threads", "1"]


def test_patch_16_bit_grey_loads_like_collect(tmp_path, capsys):
    """A 16-bit grey patch keeps its grey levels (it used to become all white through
    ``Image.open(...).convert("RGB")``), in ``_open_patch`` and in the patch-attack report."""
    import json

    from actatlas.cli import main
    from actatlas.cli.patches import _open_patch

    path, want = _grey16_gradient(tmp_path / "grey16.png")
    name, img, info = _open_patch(str(path), None, None)
    arr = _rgb_array(img)
    assert name == "grey16.png" and info == {"file": str(path)}
    for c in range(3):
        np.testing.assert_array_equal(arr[:, :, c], want)
    np.testing.assert_array_equal(arr, _rgb_array(load_rgb(path)))  # the collect loader's result

    folder, target = _patch_world(tmp_path)
    rc = main(_patch_attack_argv(folder, target, path, tmp_path / "rep") + ["--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    saved = _rgb_array(Image.open(s["patches"][0]["patch_png"]).convert("RGB"))
    np.testing.assert_array_equal(saved[:, :, 0], want)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 169 MP > PIL's 89 MP
@pytest.mark.parametrize("side", [13000, 20000])
def test_patch_decompression_bomb_is_a_user_error(tmp_path, capsys, side):
    """A patch whose header claims 13000^2 (over our 50 MP cap) or 20000^2 pixels (over PIL's own
    bomb limit, which used to escape as a traceback): one 'actatlas: error:' line, exit 2."""
    from actatlas.cli import main

    bomb = _bomb_png(tmp_path / f"bomb{side}.png", side, side)
    assert bomb.stat().st_size < 1_000_000
    folder, target = _patch_world(tmp_path)
    rc = main(_patch_attack_argv(folder, target, bomb, tmp_path / "rep"))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("actatlas: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--patch" in lines[0] and str(bomb) in lines[0]
    assert (f"{side}x{side}" if side == 13000 else f"{side * side} pixels") in lines[0], lines[0]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 169 MP > PIL's 89 MP
def test_max_pixels_skips_before_decoding(tmp_path):
    from actatlas.batches import decode_batch
    from actatlas.data import DEFAULT_MAX_PIXELS
    from actatlas.models.spec import Preprocess

    limit_before = Image.MAX_IMAGE_PIXELS
    folder = tmp_path / "imgs"
    folder.mkdir()
    _write(folder / "a_small.png", size=(40, 30))
    _bomb_png(folder / "b_huge.png", 13000, 13000)
    # a header of 3000 x 3000 with its pixel data cut short: only the cap, read from the header, can
    # explain refusing it (a decode would report a truncated file instead)
    _bomb_png(folder / "c_mid.png", 3000, 3000, valid=False)

    src = images(folder)
    assert src.max_pixels == DEFAULT_MAX_PIXELS == 50_000_000
    with pytest.raises(ImageDecodeError, match=r"13000x13000 pixels \(169 MP\), over the limit of 50 MP"):
        src.load(src[1])
    db = decode_batch(src, Preprocess(size=16, resize=16), "k", [0, 1])
    assert db.index.tolist() == [0] and [i for i, _ in db.skipped] == [1]
    assert "13000x13000" in db.skipped[0][1] and "max_pixels=50000000" in db.skipped[0][1]

    low = images(folder, max_pixels=1_000_000)
    assert low.max_pixels == 1_000_000 and low.head(2).max_pixels == 1_000_000 and low[1:].max_pixels == 1_000_000
    with pytest.raises(ImageDecodeError) as info:
        low.load(low[2])
    assert "3000x3000" in info.value.reason and "1 MP" in info.value.reason
    assert "runcat" not in info.value.reason.lower() and "truncat" not in info.value.reason.lower()
    assert low.load(low[0]).size == (40, 30)
    assert load_rgb(folder / "a_small.png", max_pixels=1200).size == (40, 30)  # 1200 px: at the cap, kept
    with pytest.raises(ImageDecodeError, match="over the limit"):
        load_rgb(folder / "a_small.png", max_pixels=1199)
    # no cap (None or 0): the small file decodes; the cap changes the source's fingerprint
    for off in (None, 0):
        assert images(folder, max_pixels=off).max_pixels is None
    assert images(folder, max_pixels=DEFAULT_MAX_PIXELS).fingerprint() == src.fingerprint()
    assert low.fingerprint() != src.fingerprint()
    assert images(src, max_pixels=1_000_000).max_pixels == 1_000_000 and images(src) is src
    for bad in (-1, 2.5, "many", True):
        with pytest.raises(UserError):
            images(folder, max_pixels=bad)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # nothing process-wide was changed


@pytest.mark.slow  # measures memory in a subprocess
def test_max_pixels_memory_stays_small(tmp_path):
    """Refusing a 13000 x 13000 PNG (169 MP, 0.5 GB as RGB) costs no memory: measured in a fresh
    process as its peak RSS growth (ru_maxrss) across the load."""
    import subprocess
    import sys

    bomb = _bomb_png(tmp_path / "huge.png", 13000, 13000)
    code = (
        "import resource, sys\n"
        "from actatlas.data import ImageDecodeError, load_rgb, images\n"
        "from PIL import Image\n"
        "Image.new('RGB', (64, 64)).load()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "src = images(sys.argv[1], max_pixels=10_000_000)\n"
        "for load in (lambda: load_rgb(sys.argv[1]), lambda: src.load(src[0])):\n"
        "    try:\n"
        "        load()\n"
        "        raise SystemExit('decoded')\n"
        "    except ImageDecodeError as e:\n"
        "        assert '13000x13000' in e.reason, e.reason\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    grown_mb = int(res.stdout.strip().splitlines()[-1])
    assert grown_mb < 40, f"peak RSS grew by {grown_mb} MB"


def test_cli_max_pixels(tmp_path, capsys):
    """--max-pixels reaches the source of eval and collect: over-cap files are counted as skipped."""
    import json

    from actatlas.cli import build_parser, main

    for cmd in (["collect", "-i", "x", "-o", "y"], ["eval", "-i", "x"], ["build", "-i", "x", "-o", "y"]):
        assert build_parser().parse_args(cmd).max_pixels == 50_000_000
        assert build_parser().parse_args(cmd + ["--max-pixels", "7"]).max_pixels == 7
    folder = tmp_path / "imgs"
    _write(folder / "c1" / "small.png", size=(36, 36))  # 1296 px
    _write(folder / "c2" / "big.png", size=(60, 60))  # 3600 px
    argv = ["eval", "--model", "tinymodels:tiny_cnn", "--images", str(folder), "--quiet", "--json"]
    assert main(argv + ["--max-pixels", "2000"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["n"] == 1 and s["skipped"] == 1
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["n"] == 2 and s["skipped"] == 0
    assert main(["collect", "--model", "tinymodels:tiny_cnn", "--images", str(folder), "--out",
                 str(tmp_path / "run"), "--attributions", "none", "--max-pixels", "2000", "--quiet", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["images"] == 1 and s["skipped"] == 1
    assert main(argv + ["--max-pixels", "-5"]) == 2
    assert "--max-pixels must be >= 1" in capsys.readouterr().err


def _textured(w: int, h: int, seed: int = 0) -> Image.Image:
    """A synthetic photo-like RGB image: smooth colour gradients, oblique stripes at several periods
    (down to 3 px), a few sharp-edged discs and mild pixel noise."""
    rng = np.random.default_rng(seed)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    a = np.empty((h, w, 3), np.float32)
    a[..., 0] = 255 * x / w
    a[..., 1] = 255 * y / h
    a[..., 2] = 128 + 60 * np.sin(x / 97.0) * np.cos(y / 53.0)
    stripes = np.zeros((h, w), np.float32)
    for period in (3.0, 7.0, 23.0, 61.0):  # sin(u + v) = sin u cos v + cos u sin v: outer products
        u, v = 2 * np.pi * 0.8 * x / period, 2 * np.pi * 0.6 * y / period
        stripes += 18 * (np.cos(v) * np.sin(u) + np.sin(v) * np.cos(u))
    a += stripes[..., None]
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * min(w, h)
        x0, x1, y0, y1 = int(max(cx - r, 0)), int(min(cx + r + 1, w)), int(max(cy - r, 0)), int(min(cy + r + 1, h))
        inside = (x[:, x0:x1] - cx) ** 2 + (y[y0:y1] - cy) ** 2 < r * r
        a[y0:y1, x0:x1][inside] = rng.uniform(0, 255, 3)
    a += rng.integers(-10, 11, (h, w, 1), dtype=np.int8)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def test_preprocess_decode_side():
    from actatlas.models.spec import Preprocess

    assert Preprocess().target_side == 256 and Preprocess().decode_side == 512
    assert Preprocess(size=224, resize=None).decode_side == 448
    assert Preprocess(size=224, resize=200).target_side == 224  # geometry resizes up to the crop
    assert Preprocess(size=299, mode="squash").decode_side == 598
    for pre in (Preprocess(), Preprocess(size=224, resize=None), Preprocess(size=64, mode="squash")):
        assert pre.decode_side >= pre.target_side >= pre.size


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> dict[str, Path]:
    """Synthetic camera-sized JPEGs: 4000x3000, its 3000x4000 rotation, a 2300x1300 crop (quality 85)."""
    folder = tmp_path_factory.mktemp("large")
    img = _textured(4000, 3000, seed=1)
    return {"land": _save(img, folder / "land.jpg", quality=90),
            "port": _save(img.transpose(Image.Transpose.ROTATE_90), folder / "port.jpg", quality=90),
            "mid": _save(img.crop((1200, 900, 3500, 2200)), folder / "mid.jpg", quality=85)}


def test_draft_decode_sizes(tmp_path, large_jpegs):
    """min_side: a JPEG decodes at the smallest 1/2, 1/4, 1/8 scale whose short side is still
    >= min_side (never below); other formats and small JPEGs at full size; EXIF rotation kept."""
    jpg = large_jpegs["land"]
    expected = {256: (500, 375), 375: (500, 375), 376: (1000, 750), 512: (1000, 750), 1000: (2000, 1500),
                1500: (2000, 1500), 1501: (4000, 3000), 5000: (4000, 3000), None: (4000, 3000)}
    for side, size in expected.items():
        got = load_rgb(jpg, min_side=side).size
        assert got == size, (side, got)
    assert load_rgb(large_jpegs["port"], min_side=512).size == (750, 1000)
    img = load_rgb(large_jpegs["mid"])
    odd = _save(img.crop((0, 0, 1001, 777)), tmp_path / "odd.jpg", quality=90)
    for side in range(100, 800, 37):
        assert min(load_rgb(odd, min_side=side).size) >= min(side, 777)
    png = _save(img.resize((1000, 750)), tmp_path / "big.png")
    assert load_rgb(png, min_side=64).size == (1000, 750)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rot = _save(img.crop((0, 0, 2000, 1200)), tmp_path / "rot.jpg", quality=90, exif=exif)
    assert load_rgb(rot, min_side=300).size == (300, 500)
    grey = _save(img.crop((0, 0, 2000, 1200)).convert("L"), tmp_path / "grey.jpg", quality=90)
    g = load_rgb(grey, min_side=300)
    assert g.size == (500, 300) and g.mode == "RGB"
    src = images(jpg)
    assert src.load(src[0], min_side=512).size == (1000, 750) and src.load(src[0]).size == (4000, 3000)


def _input_diff(paths, pre) -> list[float]:
    """Mean absolute difference (grey levels) of the uint8 model input with and without draft."""
    out = []
    for p in paths:
        full = pre.to_uint8(load_rgb(p)).astype(np.int16)
        draft = pre.to_uint8(load_rgb(p, min_side=pre.decode_side)).astype(np.int16)
        out.append(float(np.abs(full - draft).mean()))
    return out


def test_draft_model_input_matches_full_decode_large_jpeg(large_jpegs):
    """A 12 MP JPEG decoded at reduced scale gives (nearly) the model input of a full decode, and the
    collect loader (decode_batch) uses the reduced decode."""
    from actatlas.batches import decode_batch
    from actatlas.models.spec import Preprocess

    paths = list(large_jpegs.values())
    for pre in (Preprocess(), Preprocess(size=224, mode="squash", interpolation="bilinear")):
        diffs = _input_diff(paths, pre)
        assert max(diffs) < 3.0, diffs
    pre = Preprocess()
    src = images(paths)
    db = decode_batch(src, pre, "k", range(len(src)))
    for k, item in enumerate(src):
        np.testing.assert_array_equal(db.pixels[k].numpy(), pre.to_uint8(load_rgb(item.path, min_side=512)))

    class PlainSource:  # a duck-typed source whose load takes no min_side still works
        def __init__(self, s):
            self.s = s

        def __getitem__(self, i):
            return self.s[i]

        def load(self, item):
            return load_rgb(item.path)

    db2 = decode_batch(PlainSource(src), pre, "k", [0])
    np.testing.assert_array_equal(db2.pixels[0].numpy(), pre.to_uint8(load_rgb(src[0].path)))


@pytest.mark.skipif(not SAMPLE_PHOTOS.is_dir(), reason=f"real ImageNet sample photos not found at {SAMPLE_PHOTOS}")
def test_draft_model_input_matches_full_decode_real_photos():
    """On the real photos large enough to be decoded at reduced scale (short side >= 2 x 512), the
    model input stays within 3 grey levels (mean absolute difference) of a full-size decode."""
    from actatlas.models.spec import Preprocess

    pre = Preprocess()
    paths = []
    for p in sorted(SAMPLE_PHOTOS.glob("*.JPEG")):
        with Image.open(p) as im:
            if min(im.size) >= 2 * pre.decode_side:
                paths.append(p)
    if not paths:
        pytest.skip(f"no photo in {SAMPLE_PHOTOS} has a short side >= {2 * pre.decode_side}")
    diffs = _input_diff(paths, pre)
    assert max(diffs) < 3.0, max(diffs)
    assert float(np.mean(diffs)) < 1.0, float(np.mean(diffs))


def _resize_then_crop(pre, img: Image.Image) -> np.ndarray:
    """The reference geometry: resize the whole image (short side to the resize target), then crop."""
    from actatlas.models.spec import _INTERP

    interp, short = _INTERP[pre.interpolation], pre.resize or pre.size
    w, h = img.size
    nw, nh = (short, max(1, round(h * short / w))) if w <= h else (max(1, round(w * short / h)), short)
    left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
    return np.asarray(img.resize((nw, nh), interp).crop((left, top, left + pre.size, top + pre.size)))


def test_geometry_resizes_only_the_crop_like_resize_then_crop():
    """geometry resizes just the crop's box of the source: the same pixels as resizing everything and
    cropping, up to 8-bit rounding between PIL's two passes."""
    from actatlas.models.spec import Preprocess

    img = _textured(900, 700, seed=4)
    for pre in (Preprocess(), Preprocess(size=224, resize=256, interpolation="bilinear"),
                Preprocess(size=224, resize=None, interpolation="lanczos"), Preprocess(size=32, resize=36)):
        for w, h in ((900, 700), (700, 900), (333, 500), (517, 389), (256, 300), (1000, 241)):
            src = img.resize((w, h), Image.Resampling.BILINEAR)
            got = np.asarray(pre.geometry(src)).astype(np.int16)
            want = _resize_then_crop(pre, src).astype(np.int16)
            assert got.shape == want.shape == (pre.size, pre.size, 3)
            d = np.abs(got - want)
            assert d.mean() < 0.5 and np.mean(d > 2) < 0.01, (pre, (w, h), d.mean(), d.max())
    pre = Preprocess()
    same = img.crop((0, 0, 256, 300))  # already at the target: crop only, exactly
    np.testing.assert_array_equal(np.asarray(pre.geometry(same)), np.asarray(same)[38:262, 16:240])
    small = img.resize((100, 150))  # resize 256 < size 300: resized up, then cropped, as before
    assert Preprocess(size=300, resize=256).geometry(small).size == (300, 300)


@pytest.mark.skipif(not SAMPLE_PHOTOS.is_dir(), reason=f"real ImageNet sample photos not found at {SAMPLE_PHOTOS}")
def test_geometry_matches_resize_then_crop_on_real_photos():
    from actatlas.models.spec import Preprocess

    pre = Preprocess()
    means = []
    for p in sorted(SAMPLE_PHOTOS.glob("*.JPEG"))[::5]:
        img = load_rgb(p)
        d = np.abs(np.asarray(pre.geometry(img)).astype(np.int16) - _resize_then_crop(pre, img).astype(np.int16))
        means.append(float(d.mean()))
    assert float(np.mean(means)) < 0.1 and max(means) < 1.0, (float(np.mean(means)), max(means))


def test_patch_attack_max_pixels(tmp_path, capsys):
    """patch-attack's --max-pixels caps the patch files and the attacked images (ImageBank)."""
    from actatlas.analysis.attack import ImageBank, labelled_images
    from actatlas.cli import main

    import actatlas as aa

    folder, target = _patch_world(tmp_path)
    patch, _ = _grey16_gradient(tmp_path / "grey16.png")  # 64 x 16 = 1024 px
    argv = _patch_attack_argv(folder, target, patch, tmp_path / "rep")
    assert main(argv + ["--max-pixels", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("actatlas: error: --patch") and "64x16" in err and "--max-pixels" in err
    assert len(err.splitlines()) == 1
    spec = aa.load_model("patchmodels:balanced_tiny_cnn")
    imgs = labelled_images(folder, spec, max_pixels=1000)  # the images are 36 x 36 = 1296 px
    assert imgs.max_pixels == 1000 and labelled_images(folder, spec).max_pixels == 50_000_000
    bank = ImageBank(spec, imgs, progress=False)
    assert bank.load(range(len(imgs.paths))) == [] and len(bank.skipped) == len(imgs.paths)
    assert all("36x36" in r for r in bank.skipped.values())


def test_in_memory_16_bit_patch_is_not_white():
    """A 16-bit grey PIL image handed straight to the attack code keeps its grey levels (to_rgb)."""
    from actatlas.analysis.patches import composite

    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    patch = Image.fromarray(arr)
    assert patch.mode.startswith("I")
    bg = Image.new("RGB", (32, 32), (0, 0, 0))
    out = np.asarray(composite(bg, patch, 1.0, (0.0, 0.0)))
    assert out.max() <= 255 and 0 < out.mean() < 200     # not all white: the 16-bit range was scaled
