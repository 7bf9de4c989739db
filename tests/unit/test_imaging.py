"""Every supported image kind arrives as H x W x 3 uint8; bad files raise ImageLoadError."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from vision_tl import imaging
from vision_tl.imaging import ImageLoadError, load_rgb, resize


def test_grayscale_is_repeated_to_three_channels(tmp_path):
    Image.fromarray(np.full((5, 7), 100, np.uint8), "L").save(tmp_path / "g.png")
    arr = load_rgb(tmp_path / "g.png")
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8 and (arr == 100).all()


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128  # half transparent red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = load_rgb(tmp_path / "a.png")
    assert arr.shape == (4, 4, 3)
    assert 95 <= arr[0, 0, 0] <= 105 and arr[0, 0, 1] == 0


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, suffix):
    values = np.array([[0, 65535], [32768, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / f"d{suffix}")
    arr = load_rgb(tmp_path / f"d{suffix}")
    assert arr[0, 0, 0] == 0 and arr[0, 1, 0] == 255 and 127 <= arr[1, 0, 0] <= 128
    assert arr[1, 1, 0] == 4  # 1000 / 65535 * 255, not clipped to 255


def test_16_bit_scale_is_the_same_for_every_image(tmp_path, monkeypatch):
    """One brighter pixel must not change how a whole image reads: two 16-bit images that
    differ in one value (255 vs 256 at the top) decode alike, and low-bit data (12-bit
    camera data in a 16-bit file) is reported once, naming its file."""
    import vision_tl.imaging as imaging

    monkeypatch.setattr(imaging, "_warned_dim", False)
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    low, high = ramp.copy(), ramp.copy()
    low[0, 0], high[0, 0] = 255, 256
    Image.fromarray(low).save(tmp_path / "low.png")
    Image.fromarray(high).save(tmp_path / "high.png")
    with pytest.warns(UserWarning, match=r"low\.png: a 16-bit image whose brightest value is 255 of 65535"):
        a = load_rgb(tmp_path / "low.png")
    b = load_rgb(tmp_path / "high.png")  # reported once per process only
    assert np.array_equal(a[1:], b[1:]) and a.max() <= 1
    twelve = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64)  # 0..4032: 12-bit data
    Image.fromarray(twelve << 4).save(tmp_path / "shifted.png")  # scaled to the full range: bright
    assert load_rgb(tmp_path / "shifted.png").max() == 251


def _png_16_bit_rgb(path, pixels: np.ndarray) -> None:
    """A 48-bit RGB PNG, written by hand (Pillow cannot write one from an array)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_colour_png_reads_on_the_grey_scale_and_warns_about_low_bit_data(tmp_path, monkeypatch):
    import vision_tl.imaging as imaging

    monkeypatch.setattr(imaging, "_warned_dim", False)
    full = np.array([[[0, 32768 + 255, 65535]]], np.uint16)
    _png_16_bit_rgb(tmp_path / "full.png", full)
    assert load_rgb(tmp_path / "full.png")[0, 0].tolist() == [0, 128, 255]  # as 16-bit grey maps them
    twelve = (np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 80)  # 0..3760: 12-bit camera data
    _png_16_bit_rgb(tmp_path / "twelve.png", twelve)
    with pytest.warns(UserWarning, match=r"twelve\.png: a 16-bit image whose brightest value is at most 3839 of 65535"):
        assert load_rgb(tmp_path / "twelve.png").max() == 14
    monkeypatch.setattr(imaging, "_warned_dim", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_rgb(tmp_path / "full.png")  # full-range data: no warning
        Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / "dark8.png")
        load_rgb(tmp_path / "dark8.png")  # a dark 8-bit PNG is what it is: no warning


def test_float_tiff_in_unit_range(tmp_path):
    Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], np.float32), "F").save(tmp_path / "f.tif")
    arr = load_rgb(tmp_path / "f.tif")
    assert arr[0, 1, 0] == 255 and arr[1, 0, 0] == 128


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    arr = load_rgb(tmp_path / "c.jpg")
    assert arr.shape == (8, 8, 3) and arr[0, 0, 0] > 200 and arr[0, 0, 1] < 60


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"not an image at all", "not a recognised image"), (None, "not found")],
)
def test_bad_files_name_the_path(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_is_an_error(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="t.jpg"):
        load_rgb(tmp_path / "t.jpg")


def test_a_process_that_allows_truncated_images_keeps_its_setting_and_is_told(tmp_path, monkeypatch):
    """The kit used to switch Pillow's LOAD_TRUNCATED_IMAGES off for the whole process at its first
    PNG: the caller's own reading of its cut-off files then failed."""
    from PIL import ImageFile

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 3 // 4])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(imaging, "_warned_truncated", False)
    with pytest.warns(UserWarning, match="LOAD_TRUNCATED_IMAGES is set in this process"):
        load_rgb(tmp_path / "t.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert load_rgb(tmp_path / "cut.png").shape == (64, 64, 3)  # as the process asked
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")


def test_decompression_bomb_guard_and_setting(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(imaging, "_max_pixels", 10_000)
    with pytest.raises(ImageLoadError, match="VISION_TL_MAX_IMAGE_PIXELS"):
        load_rgb(tmp_path / "big.png")
    imaging.set_max_image_pixels(100_000)
    assert load_rgb(tmp_path / "big.png").shape == (300, 300, 3)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_rgb(tmp_path)


def test_resize_is_plain_and_validates_interpolation():
    img = np.zeros((10, 20, 3), np.uint8)
    assert resize(img, (6, 8), "bilinear").shape == (6, 8, 3)
    with pytest.raises(ValueError, match="expected one of"):
        resize(img, (6, 8), "cubic")


def _jpegs(folder):
    """JPEGs as cameras and tools write them: chroma layouts, gray, progressive, restarts."""
    rng = np.random.default_rng(3)
    cases = [("RGB", {"subsampling": 2, "quality": 90}), ("RGB", {"subsampling": 1}),
             ("RGB", {"subsampling": 0, "quality": 98}), ("L", {"quality": 80}),
             ("RGB", {"progressive": True}), ("RGB", {"restart_marker_blocks": 3, "optimize": True})]
    paths = []
    for k, (mode, options) in enumerate(cases):
        h, w = rng.integers(9, 140, 2)
        pixels = np.clip(np.linspace(0, 220, w)[None, :, None] + rng.normal(0, 25, (h, w, 3)), 0, 255)
        paths.append(folder / f"{k}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(paths[-1], "JPEG", **options)
    return paths


@pytest.fixture
def fresh_decoder(monkeypatch):
    """Each test decides the JPEG decoder anew (it is chosen once per process)."""
    monkeypatch.setattr(imaging, "_fast_jpeg", None)
    monkeypatch.delenv(imaging.JPEG_DECODER_ENV, raising=False)
    return monkeypatch


def test_fast_jpeg_decoding_gives_pillows_pixels(tmp_path, fresh_decoder):
    pytest.importorskip("simplejpeg")
    simplejpeg = imaging.fast_jpeg_decoder()
    assert simplejpeg is not None, "simplejpeg is installed but disagrees with Pillow here"
    calls = []
    real = simplejpeg.decode_jpeg
    fresh_decoder.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    paths = _jpegs(tmp_path)
    fast = [load_rgb(p) for p in paths]
    assert len(calls) == len(paths)  # every one of them took the fast path
    fresh_decoder.setattr(imaging, "_fast_jpeg", None)
    fresh_decoder.setenv(imaging.JPEG_DECODER_ENV, "pillow")
    assert imaging.fast_jpeg_decoder() is None
    for path, pixels in zip(paths, fast):
        slow = load_rgb(path)
        assert pixels.shape == slow.shape and pixels.dtype == np.uint8 and pixels.flags.c_contiguous
        assert np.array_equal(pixels, slow), path.name


def test_fast_jpeg_path_keeps_errors_and_guards(tmp_path, fresh_decoder):
    pytest.importorskip("simplejpeg")
    assert imaging.fast_jpeg_decoder() is not None
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) - 40])  # Pillow's message, not simplejpeg's
    with pytest.raises(ImageLoadError, match=r"t\.jpg: corrupt or truncated image \(image file is truncated"):
        load_rgb(tmp_path / "t.jpg")
    Image.new("RGB", (300, 300)).save(tmp_path / "big.jpg")
    fresh_decoder.setattr(imaging, "_max_pixels", 10_000)
    with pytest.raises(ImageLoadError, match=r"big\.jpg: 300x300 = 90,000 pixels exceeds"):
        load_rgb(tmp_path / "big.jpg")
    fresh_decoder.setattr(imaging, "_max_pixels", None)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # Pillow's conversion
    assert load_rgb(tmp_path / "c.jpg")[0, 0, 0] > 200


def test_jpeg_decoder_falls_back_and_validates_its_setting(tmp_path, fresh_decoder):
    fresh_decoder.setattr(imaging, "_same_pixels_as_pillow", lambda module: False)
    assert imaging.fast_jpeg_decoder() is None  # disagreeing decoder: Pillow for everything
    path = _jpegs(tmp_path)[0]
    assert load_rgb(path).shape[2] == 3
    fresh_decoder.setattr(imaging, "_fast_jpeg", None)
    fresh_decoder.setenv(imaging.JPEG_DECODER_ENV, "simplejpeg")
    with pytest.raises(ValueError, match="VISION_TL_JPEG_DECODER=simplejpeg, but simplejpeg is"):
        imaging.fast_jpeg_decoder()
    fresh_decoder.setattr(imaging, "_fast_jpeg", None)
    fresh_decoder.setenv(imaging.JPEG_DECODER_ENV, "turbo")
    with pytest.raises(ValueError, match="VISION_TL_JPEG_DECODER='turbo' is not valid; expected auto"):
        imaging.fast_jpeg_decoder()
    with pytest.raises(ValueError, match="VISION_TL_JPEG_DECODER='turbo'"):  # every time, not once
        load_rgb(path)


def test_load_rgb_into_writes_the_pixels_of_load_rgb_and_resize(tmp_path, fresh_decoder):
    """Loaders decode into rows of a batch; JPEGs of the row's size take the direct path."""
    simplejpeg = pytest.importorskip("simplejpeg")
    size = (40, 56)
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (*size, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "exact.jpg", quality=85)  # the direct path
    Image.fromarray(pixels).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(pixels[:30]).save(tmp_path / "other.jpg")  # another size: resized
    Image.fromarray(pixels).save(tmp_path / "p.png")
    Image.new("CMYK", size[::-1], (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert imaging.fast_jpeg_decoder() is simplejpeg  # its self-check done before counting calls
    direct = []
    real = simplejpeg.decode_jpeg
    fresh_decoder.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: direct.append(k.get("buffer") is not None)
                          or real(*a, **k))
    batch = np.full((5, *size, 3), 7, np.uint8)
    names = ["exact.jpg", "gray.jpg", "other.jpg", "p.png", "c.jpg"]
    for row, name in zip(batch, names):
        imaging.load_rgb_into(tmp_path / name, row, "bilinear")
        assert np.array_equal(row, resize(load_rgb(tmp_path / name), size, "bilinear")), name
    assert direct[0] is True  # exact.jpg went straight into its row

    Image.fromarray(pixels).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) - 40])
    with pytest.raises(ImageLoadError, match=r"t\.jpg: corrupt or truncated image \(image file is truncated"):
        imaging.load_rgb_into(tmp_path / "t.jpg", batch[0], "bilinear")
    fresh_decoder.setattr(imaging, "_max_pixels", 1000)  # the guard holds on the direct path too
    with pytest.raises(ImageLoadError, match="exceeds the limit of 1,000 pixels"):
        imaging.load_rgb_into(tmp_path / "exact.jpg", batch[0], "bilinear")


def _damaged_jpeg(path, height: int = 48, width: int = 80) -> None:
    """A JPEG whose scan data has 8 bytes flipped in the middle: Pillow decodes it without a word,
    the lower part of the image garbled; libjpeg warns that its data ends before the end marker."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 220, width)[None, :, None] + rng.normal(0, 15, (height, width, 3))
    Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8)).save(path, quality=92)
    data = bytearray(path.read_bytes())
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def test_damaged_jpeg_data_is_refused_on_every_path_not_read_as_garbled_pixels(tmp_path, fresh_decoder):
    """Pillow ignores libjpeg's warnings: a JPEG with damaged data decoded to grey or garbled pixels,
    trained on and predicted alike. simplejpeg's strict decode reports it at no extra cost."""
    pytest.importorskip("simplejpeg")
    from vision_tl.data.decode_threads import decode_batches

    _damaged_jpeg(tmp_path / "bad.jpg")
    message = r"bad\.jpg: damaged JPEG data \(libjpeg: Corrupt JPEG data: \d+ extraneous bytes before marker 0xd9\)"
    with pytest.raises(ImageLoadError, match=message):
        load_rgb(tmp_path / "bad.jpg")
    for size in ((48, 80), (32, 32)):  # decoded straight into the row, and resized
        with pytest.raises(ImageLoadError, match=message):
            imaging.load_rgb_into(tmp_path / "bad.jpg", np.zeros((*size, 3), np.uint8))
    (rows,) = decode_batches([tmp_path / "bad.jpg"], (32, 32), "bicubic", 1, 0)
    assert "damaged JPEG data" in rows.errors[0]
    assert imaging.decode_error(tmp_path / "bad.jpg").startswith(f"{tmp_path / 'bad.jpg'}: damaged JPEG data")

    fresh_decoder.setattr(imaging.ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # the process allows damaged files
    fresh_decoder.setattr(imaging, "_warned_truncated", True)
    assert load_rgb(tmp_path / "bad.jpg").shape == (48, 80, 3)


def test_zero_padding_before_a_jpegs_end_marker_is_not_damage(tmp_path, fresh_decoder):
    pytest.importorskip("simplejpeg")
    pixels = np.random.default_rng(4).integers(0, 256, (24, 40, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "padded.jpg").write_bytes(data[:-2] + bytes(6) + data[-2:])  # (libjpeg warns about these)
    assert np.array_equal(load_rgb(tmp_path / "padded.jpg"), load_rgb(tmp_path / "t.jpg"))


def test_jpegs_in_layouts_the_check_does_not_cover_go_through_pillow(tmp_path, fresh_decoder):
    simplejpeg = pytest.importorskip("simplejpeg")
    assert imaging.fast_jpeg_decoder() is simplejpeg
    pixels = np.random.default_rng(8).integers(0, 256, (24, 32, 3), np.uint8)
    (tmp_path / "440.jpg").write_bytes(simplejpeg.encode_jpeg(pixels, 90, colorsubsampling="440"))
    calls = []
    fresh_decoder.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1))
    with Image.open(tmp_path / "440.jpg") as img:
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(load_rgb(tmp_path / "440.jpg"), expected)
    row = np.zeros((24, 32, 3), np.uint8)
    imaging.load_rgb_into(tmp_path / "440.jpg", row)
    assert np.array_equal(row, expected) and calls == []


def test_image_files_walks_one_way_for_training_and_deployment(tmp_path):
    """Training's scan and the line predictor list a folder alike: sorted, hidden entries left
    out, a dangling link with an image name kept (so reading it reports it), other files apart."""
    from vision_tl.data.folder import scan_folder
    from vision_tl.deploy import scan_images

    for rel in ("ok/b.png", "ok/sub/a.jpg", "ok/.x.png", ".cache/ok/c.png", "dent/d.TIF"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / rel, format="PNG" if "png" in rel else "TIFF")
    (tmp_path / "ok" / "notes.txt").write_text("x")
    (tmp_path / "ok" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "ok" / "gone.txt").symlink_to(tmp_path / "missing.txt")
    images, others = imaging.image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == [
        "dent/d.TIF", "ok/b.png", "ok/gone.jpg", "ok/sub/a.jpg"]
    assert [p.relative_to(tmp_path).as_posix() for p in others] == ["ok/gone.txt", "ok/notes.txt"]
    scan = scan_images(tmp_path)
    assert (scan.images, scan.ignored) == (images, others)
    with pytest.warns(UserWarning, match="non-image file|unreadable image"):
        index = scan_folder(tmp_path, skip_bad=True)
    assert [s.path for s in index.samples] == [images[0], images[1], images[3]]
    assert [p for p, _ in index.bad_files] == [images[2]]


def test_image_files_follows_linked_folders_once(tmp_path):
    """A class folder that gathers images from elsewhere by a folder link keeps them, and a link
    back up the tree does not loop."""
    elsewhere = tmp_path / "nas" / "batch2"
    elsewhere.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(elsewhere / "x.png")
    (tmp_path / "data" / "ok").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "data" / "ok" / "a.png")
    (tmp_path / "data" / "ok" / "batch2").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "data" / "ok" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    images, _ = imaging.image_files(tmp_path / "data")
    assert [p.relative_to(tmp_path / "data").as_posix() for p in images] == ["ok/a.png", "ok/batch2/x.png"]


def test_integer_data_beyond_16_bits_or_signed_is_refused_not_misread(tmp_path):
    """32-bit data came back all white and signed data had its negatives clipped to black (or,
    8-bit, wrapped round to bright), silently."""
    tifffile = pytest.importorskip("tifffile", reason="writes the signed and 32-bit TIFFs")
    ramp = np.arange(64).reshape(8, 8)
    tifffile.imwrite(tmp_path / "u32.tif", (ramp * 16843009).astype(np.uint32))
    tifffile.imwrite(tmp_path / "s16.tif", ((ramp - 32) * 200).astype(np.int16))
    tifffile.imwrite(tmp_path / "s8.tif", (ramp - 32).astype(np.int8))
    for name, pattern in (("u32.tif", r"outside 0\.\.65535"), ("s16.tif", r"-6400\.\.6200 lie outside"),
                          ("s8.tif", "signed 8-bit")):
        with pytest.raises(ImageLoadError, match=rf"{name}: .*{pattern}"):
            load_rgb(tmp_path / name)
    tifffile.imwrite(tmp_path / "u32ok.tif", (ramp * 1000).astype(np.uint32))  # 16-bit values in 32 bits
    assert load_rgb(tmp_path / "u32ok.tif")[7, 7, 0] == round(63000 * 255 / 65535)


def test_16_bit_colour_tiff_with_low_bit_data_warns_like_a_png(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile", reason="writes a 16-bit RGB TIFF")
    monkeypatch.setattr(imaging, "_warned_dim", False)
    tifffile.imwrite(tmp_path / "rgb12.tif", (np.arange(48).reshape(4, 4, 3) * 80).astype(np.uint16))
    with pytest.warns(imaging.DimImageWarning, match=r"rgb12\.tif: a 16-bit image"):
        assert load_rgb(tmp_path / "rgb12.tif").max() == 14


def test_alpha_in_a_tiff_only_tifffile_reads_is_composited_on_black(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="writes a float RGBA TIFF")
    colour = np.full((4, 4, 3), 0.8, np.float32)
    alpha = np.zeros((4, 4, 1), np.float32)
    alpha[:2] = 1.0
    tifffile.imwrite(tmp_path / "rgba.tif", np.concatenate([colour, alpha], 2), extrasamples=["unassalpha"])
    arr = load_rgb(tmp_path / "rgba.tif")
    assert (arr[2:] == 0).all() and (arr[:2] == 204).all()  # transparent: black, as for an RGBA PNG


def test_a_multi_page_tiff_is_read_as_its_first_page_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "_warned_frames", False)
    first, second = np.full((6, 6, 3), 10, np.uint8), np.full((9, 9, 3), 200, np.uint8)
    Image.fromarray(first).save(tmp_path / "pages.tif", save_all=True, append_images=[Image.fromarray(second)])
    with pytest.warns(imaging.MultiFrameWarning, match=r"pages\.tif: holds 2 pages or frames; .* the first only"):
        assert np.array_equal(load_rgb(tmp_path / "pages.tif"), first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_rgb(tmp_path / "pages.tif")  # once per process
    # a damaged pointer to the second page: the first still reads, every time
    import struct

    monkeypatch.setattr(imaging, "_warned_frames", False)
    data = bytearray((tmp_path / "pages.tif").read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[ifd:ifd + 2])[0]
    data[ifd + 2 + 12 * entries: ifd + 6 + 12 * entries] = struct.pack("<I", len(data) + 1000)
    (tmp_path / "bad_next.tif").write_bytes(bytes(data))
    for _ in range(2):
        assert np.array_equal(load_rgb(tmp_path / "bad_next.tif"), first)


def test_a_decoding_thread_does_not_put_a_callers_warning_recorder_out_of_action(tmp_path, monkeypatch):
    """A thread inside ``load_rgb`` when a caller starts recording warnings, and leaving after it:
    the caller's recorder must still get the warnings raised later (it used to be swapped back
    for the one the thread saw first, and they were lost)."""
    import sys
    import threading

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    inside, go_on = threading.Event(), threading.Event()
    real_open = Image.open

    def slow_open(*args, **kwargs):  # the thread waits inside the decompression-bomb guard's block
        if threading.current_thread() is not threading.main_thread() and sys._getframe(1).f_code.co_name == "open_image":
            inside.set()
            go_on.wait(10)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    thread = threading.Thread(target=load_rgb, args=(path,))
    thread.start()
    assert inside.wait(10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        go_on.set()
        thread.join(10)
        warnings.warn("raised after the thread left", UserWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["raised after the thread left"]


def test_a_raised_limit_lets_tiffs_through_and_keeps_pillows_warning_off_every_thread(tmp_path, monkeypatch):
    """Pillow checks a TIFF's size again when it loads, and warns (at its own limit) on any thread:
    the kit's limit, raised above Pillow's, must decide everywhere, and Pillow's setting stays."""
    import threading

    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "t.tif")
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "p.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # Pillow's guard: 4,000 (refuses over 8,000)
    monkeypatch.setattr(imaging, "_max_pixels", 1_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_rgb(tmp_path / "t.tif").shape == (100, 100, 3)
        results = []
        thread = threading.Thread(target=lambda: results.append(load_rgb(tmp_path / "p.png").shape))
        thread.start()
        thread.join(10)
    assert results == [(100, 100, 3)]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == 4000
    with pytest.raises(Image.DecompressionBombError):  # the caller's own Image.open keeps Pillow's guard
        Image.open(tmp_path / "t.tif")
    monkeypatch.setattr(imaging, "_max_pixels", 5_000)
    with pytest.raises(ImageLoadError, match="10,000 pixels exceeds the limit of 5,000"):
        load_rgb(tmp_path / "t.tif")


def test_an_icon_declaring_a_small_size_is_refused_before_its_large_image_is_decoded(tmp_path, monkeypatch):
    """Pillow decodes an ICO's embedded image inside Image.open, right after its own size check:
    with that check merely switched off, a 190 kB file named .png made the kit decode 196 Mpx
    before refusing it. The check applies the kit's limit instead."""
    import io
    import struct

    from PIL import PngImagePlugin

    buffer = io.BytesIO()
    Image.new("L", (400, 400)).save(buffer, "PNG")
    png = buffer.getvalue()
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 8, len(png), 22)
    (tmp_path / "icon.png").write_bytes(header + png)
    decoded = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    monkeypatch.setattr(imaging, "_max_pixels", 10_000)
    with pytest.raises(ImageLoadError, match="160,000 pixels exceeds the limit of 10,000"):
        load_rgb(tmp_path / "icon.png")
    assert decoded == []


def _tricky_files(folder) -> dict[str, tuple]:
    """name -> (file, the file's stored pixels as the kit must read them, or None: as ``plain.jpg``)."""
    from PIL import ImageCms

    rng = np.random.default_rng(6)
    base = np.clip(np.linspace(0, 220, 40)[None, :, None] + rng.normal(0, 15, (24, 40, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    image.save(folder / "plain.jpg", quality=90)
    files = {}
    for orientation in (2, 3, 6, 8):  # mirrored, turned 180, turned 90 either way: read as stored
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(folder / f"exif{orientation}.JPG", quality=90, exif=exif.tobytes())
        files[f"exif{orientation}"] = (folder / f"exif{orientation}.JPG", None)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # a profile far from sRGB: not applied
    image.save(folder / "icc.jpg", quality=90, icc_profile=icc)
    files["icc_jpeg"] = (folder / "icc.jpg", None)
    image.save(folder / "icc.png", icc_profile=icc)
    files["icc_png"] = (folder / "icc.png", base)
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(folder / "trns.png", transparency=0)
    index = np.asarray(palette)
    expected = np.asarray(palette.convert("RGB")).copy()
    expected[index == 0] = 0  # the transparent colour on black
    files["palette_transparency"] = (folder / "trns.png", expected)
    la = np.dstack([base[:, :, 0], np.where(np.arange(40) < 10, 0, 255)[None, :].repeat(24, 0)]).astype(np.uint8)
    Image.fromarray(la, "LA").save(folder / "la.PNG")
    files["grey_alpha"] = (folder / "la.PNG", np.repeat(np.where(la[:, :, 1:] == 0, 0, la[:, :, :1]), 3, axis=2))
    one_bit = base[:, :, 0] > 100
    Image.fromarray(one_bit).save(folder / "bit.tif")
    files["one_bit"] = (folder / "bit.tif", np.repeat(one_bit[:, :, None].astype(np.uint8) * 255, 3, axis=2))
    image.save(folder / "frames.gif", save_all=True, append_images=[Image.fromarray(255 - base)])
    with Image.open(folder / "frames.gif") as first:
        files["gif_first_frame"] = (folder / "frames.gif", np.asarray(first.convert("RGB")))
    Image.fromarray(base[:1, :1]).save(folder / "one.jpg")
    Image.fromarray(np.ascontiguousarray(base[:3, :])).save(folder / "thin.jpg")
    files["1x1_jpeg"] = (folder / "one.jpg", "any")
    files["3x40_jpeg"] = (folder / "thin.jpg", "any")
    return files


def test_tricky_files_read_as_stored_and_alike_on_every_host_path(tmp_path, fresh_decoder):
    """EXIF orientation and colour profiles are not applied, transparency lands on black, a GIF
    gives its first frame; simplejpeg or Pillow, whole or into a batch row, the same pixels."""
    from vision_tl.data.decode_threads import decode_batches

    files = _tricky_files(tmp_path)
    names = list(files)
    paths = [files[n][0] for n in names]
    plain = load_rgb(tmp_path / "plain.jpg")
    fast = {n: load_rgb(p) for n, p in zip(names, paths)}
    (rows,) = decode_batches(paths, (16, 20), "bicubic", len(paths), 0)
    assert rows.errors == {}
    fresh_decoder.setattr(imaging, "_fast_jpeg", False)  # a machine without simplejpeg
    for k, (name, (path, expected)) in enumerate(files.items()):
        want = plain if expected is None else fast[name] if isinstance(expected, str) else expected
        assert np.array_equal(fast[name], want), name
        assert np.array_equal(load_rgb(path), want), name
        assert np.array_equal(rows.pixels[k].numpy(), resize(want, (16, 20), "bicubic")), name


def test_zero_padding_is_not_damage_with_a_picture_after_the_image_or_between_scans(tmp_path, fresh_decoder):
    """The padding was looked for before the file's last end marker only: a zero-padded JPEG
    followed by a camera's second picture (MPF) or a trailer ending in FF D9 was refused as
    damaged; so was a progressive JPEG whose scans are padded (libjpeg warns of the bytes
    before the next scan's marker). Pillow reads the same pixels as from the unpadded file."""
    pytest.importorskip("simplejpeg")
    pixels = np.random.default_rng(4).integers(0, 256, (24, 40, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "t.jpg")
    Image.fromarray(pixels).save(tmp_path / "p.jpg", progressive=True)
    data, progressive = (tmp_path / "t.jpg").read_bytes(), (tmp_path / "p.jpg").read_bytes()
    padded = data[:-2] + bytes(6) + data[-2:]
    (tmp_path / "mpf.jpg").write_bytes(padded + progressive)
    (tmp_path / "trailer.jpg").write_bytes(padded + b"TRAILER\xff\xd9")
    first_scan = progressive.find(b"\xff\xda")
    second = progressive.find(b"\xff\xc4", first_scan)  # the tables of the next scan
    (tmp_path / "scans.jpg").write_bytes(progressive[:second] + bytes(4) + progressive[second:])
    for name in ("mpf.jpg", "trailer.jpg"):
        assert np.array_equal(load_rgb(tmp_path / name), load_rgb(tmp_path / "t.jpg")), name
    assert np.array_equal(load_rgb(tmp_path / "scans.jpg"), load_rgb(tmp_path / "p.jpg"))
