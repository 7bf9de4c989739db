"""``--decode device``: JPEGs decoded where the model runs (nvJPEG on a GPU). On a CPU the same
code runs with torchvision's decoder, so these tests check everything but the GPU's pixels:
the batches hold each image at its position, in the CPU path's pixels up to the resize's
rounding; what the device cannot take is decoded on the host with the same errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tl.backbones import create_backbone, resolve_preprocessing
from vision_tl.data import device_decode
from vision_tl.data.decode_threads import decode_batches
from vision_tl.data.device_decode import check_device, decoding_difference, device_batches
from vision_tl.features.extractor import FeatureExtractor, iter_embeddings

SIZE = (32, 32)


def _images(tmp_path):
    """Colour JPEGs (4:2:0, 4:4:4, progressive) at the output size and to resize, a grey JPEG,
    a PNG, a BMP, a damaged JPEG (3) and one cut short (6)."""
    rng = np.random.default_rng(0)
    cases = [("a.jpg", (32, 32), "RGB", {}), ("b.jpg", (45, 37), "RGB", {"subsampling": 0}),
             ("c.jpg", (20, 28), "L", {}), ("d.jpg", (32, 32), "RGB", {}), ("e.png", (40, 40), "RGB", {}),
             ("f.jpg", (50, 60), "RGB", {"progressive": True}), ("g.jpg", (64, 64), "RGB", {}),
             ("h.bmp", (32, 32), "RGB", {}), ("i.jpg", (32, 32), "L", {}), ("j.jpg", (33, 31), "RGB", {})]
    paths = []
    for name, (h, w), mode, options in cases:
        ramp = np.linspace(0, 180, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(tmp_path / name)
        Image.fromarray(pixels).convert(mode).save(paths[-1], **options)
    paths[3].write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 20)
    paths[6].write_bytes(paths[6].read_bytes()[:300])
    return paths


def _on_cpu_threads(paths, interpolation="bicubic"):
    pixels, errors = {}, {}
    for rows in decode_batches(paths, SIZE, interpolation, 4, 0):
        for k in range(len(rows.pixels)):
            if k in rows.errors:
                errors[rows.start + k] = rows.errors[k]
            else:
                pixels[rows.start + k] = rows.pixels[k].numpy()
    return pixels, errors


def _on_device(paths, threads, interpolation="bicubic", batch_size=4):
    pixels, errors = {}, {}
    for positions, x, failures in device_batches(paths, SIZE, interpolation, batch_size, "cpu", threads):
        assert x is None or (x.dtype == torch.uint8 and x.shape[1:] == (3, *SIZE) and len(x) == len(positions))
        pixels.update((p, x[k].permute(1, 2, 0).numpy()) for k, p in enumerate(positions))
        errors.update(failures)
    return pixels, errors


@pytest.mark.parametrize("threads", [0, 2])
def test_batches_hold_each_image_in_place_with_the_cpu_paths_pixels_and_errors(tmp_path, threads) -> None:
    paths = _images(tmp_path)
    want, want_errors = _on_cpu_threads(paths)
    got, got_errors = _on_device(paths, threads)
    assert sorted(got) == sorted(want) == [0, 1, 2, 4, 5, 7, 8, 9]
    assert got_errors == want_errors and sorted(got_errors) == [3, 6]
    for i in want:
        difference = np.abs(got[i].astype(int) - want[i])
        # decoding is exact on a CPU; the antialiased resize differs from Pillow's by rounding
        assert difference.max() <= (0 if paths[i].suffix != ".jpg" or i in (0, 8) else 8), paths[i].name
        assert difference.mean() < 0.6, paths[i].name
    np.testing.assert_array_equal(got[2][..., 0], got[2][..., 2])  # grey stays grey


@pytest.mark.parametrize("interpolation", ["lanczos", "nearest"])
def test_a_filter_pytorch_has_no_exact_twin_of_resizes_on_the_host_exactly(tmp_path, interpolation) -> None:
    paths = _images(tmp_path)
    want, want_errors = _on_cpu_threads(paths, interpolation)
    got, got_errors = _on_device(paths, 2, interpolation)
    assert got_errors == want_errors and sorted(got) == sorted(want)
    for i in want:
        np.testing.assert_array_equal(got[i], want[i], err_msg=paths[i].name)


def test_images_the_device_refuses_are_decoded_on_the_host(tmp_path, monkeypatch) -> None:
    """A decoder call fails as a whole when one image in it fails: the others still come from
    the device, the refused one from the host, each at its position."""
    paths = _images(tmp_path)
    refused = paths[1].read_bytes()
    real = device_decode._decode
    calls = []

    def picky(datas, gray, device):
        calls.append(len(datas))
        if any(bytes(d.numpy()) == refused for d in datas):
            raise RuntimeError("Error while decoding JPEG images")
        return real(datas, gray, device)

    monkeypatch.setattr(device_decode, "check_device", lambda *args: (0.0, 0))  # its own calls: not counted
    monkeypatch.setattr(device_decode, "_decode", picky)
    want, _ = _on_cpu_threads(paths)
    got, errors = _on_device(paths, 0, batch_size=len(paths))
    assert sorted(errors) == [3, 6] and sorted(got) == sorted(want)
    assert np.abs(got[1].astype(int) - want[1]).max() == 0  # the host's pixels exactly
    # the 4 colour JPEGs in one call, then halves down to the refused one (not one call per
    # image), the other half whole; then the 2 grey ones
    assert calls == [4, 2, 1, 1, 2, 2]


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory"),
    # torchvision's decoder re-raises the device's failures as plain RuntimeErrors
    RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 38.00 MiB"),
    RuntimeError("Error while decoding JPEG images: Failed to synchronize CUDA stream: 700"),
])
def test_the_device_failing_is_raised_not_taken_for_a_damaged_file(tmp_path, monkeypatch, error) -> None:
    def failing(datas, gray, device):
        raise error

    monkeypatch.setattr(device_decode, "_decode", failing)
    with pytest.raises(type(error)):
        _on_device(_images(tmp_path), 0)


def test_only_a_cuda_gpu_or_the_cpu_decodes(tmp_path) -> None:
    with pytest.raises(ValueError, match="--decode device decodes JPEGs on a CUDA GPU.*use --decode cpu"):
        device_batches(_images(tmp_path), SIZE, "bicubic", 4, "mps", 0)


def test_the_users_pixel_limit_and_jpeg_decoder_choice_do_not_break_the_check(tmp_path, monkeypatch) -> None:
    """The check's own test JPEGs are not the user's images; the headers are read with
    simplejpeg whichever decoder the host path uses."""
    from vision_tl import imaging

    monkeypatch.setenv("VISION_TL_JPEG_DECODER", "pillow")
    monkeypatch.setattr(imaging, "_fast_jpeg", None)
    monkeypatch.setattr(device_decode, "_checked", {})
    monkeypatch.setattr(imaging, "_max_pixels", 2000)  # below the check's images, above most of the user's
    paths = _images(tmp_path)
    want, want_errors = _on_cpu_threads(paths)
    got, errors = _on_device(paths, 0)
    assert errors == want_errors and sorted(errors) == [3, 5, 6] and "2,000" in errors[5]  # 50 x 60 is over it
    assert sorted(got) == sorted(want) == [0, 1, 2, 4, 7, 8, 9]

def test_decoder_check_measures_and_refuses_a_device_over_the_tolerance(monkeypatch) -> None:
    mean, largest = decoding_difference("cpu")
    assert 0 <= mean < 0.5 and largest <= 8  # torchvision's CPU decoder is Pillow's; resize rounding only
    for interpolation in ("bilinear", "nearest", "lanczos"):  # at the run's size and filter
        mean, largest = decoding_difference("cpu", (40, 24), interpolation)
        assert mean < 0.5 and largest <= (8 if interpolation == "bilinear" else 0), interpolation
    monkeypatch.setattr(device_decode, "_checked", {("cpu", (32, 32), "bicubic"): (7.5, 90)})
    with pytest.raises(ValueError, match=r"\(resized to 32x32, bicubic\) differs from Pillow's by 7\.50.*--decode cpu"):
        check_device(torch.device("cpu"), (32, 32), "bicubic")


def test_reading_threads_stop_when_the_caller_leaves_early(tmp_path) -> None:
    paths = _images(tmp_path) * 4
    batches = device_batches(paths, SIZE, "bicubic", 2, "cpu", 2)
    next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vision_tl-read")]
    # ... and when it leaves before the first batch (a GPU warm-up that failed): the generator
    # this was could not be closed then, and its threads read the batches queued ahead
    batches = device_batches(paths, SIZE, "bicubic", 2, "cpu", 2)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vision_tl-read")]


def test_extractor_keys_device_decoding_apart_and_embeds_alike(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_backbone("test_efficientnet", pretrained=False)
    pre = resolve_preprocessing("test_efficientnet", SIZE[0])
    on_cpu = FeatureExtractor(net, "test_efficientnet", pre)
    on_device = FeatureExtractor(net, "test_efficientnet", pre, decode="device")
    assert "decode" not in on_cpu.identity() and on_device.identity()["decode"] == "device:cpu"
    augmented = FeatureExtractor(net, "test_efficientnet", pre, augment="inspection", view=1, decode="device")
    assert augmented.decode == "cpu"  # augmented views are per-image work in loader processes
    with pytest.raises(ValueError, match="unknown decode 'gpu'"):
        FeatureExtractor(net, "test_efficientnet", pre, decode="gpu")
    paths = [p for i, p in enumerate(_images(tmp_path)) if i not in (3, 6)]
    features = [np.concatenate([b.features for b in iter_embeddings(fx, paths, 3, 2, "cpu", progress=False)])
                for fx in (on_cpu, on_device)]
    a, b = features
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_threads_start_reading_before_the_first_batch_is_asked_for(tmp_path, monkeypatch) -> None:
    """extract warms the GPU up between creating the batches and taking the first: the files
    must already be read meanwhile."""
    paths = _images(tmp_path)
    read = threading.Event()
    real = device_decode._read

    def counting(*args, **kwargs):
        read.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(device_decode, "_read", counting)
    batches = device_batches(paths, SIZE, "bicubic", 4, "cpu", 2)
    assert read.wait(10)
    assert sum(len(positions) for positions, _, _ in batches) == 8


def test_extract_says_device_decoding_on_a_cpu_is_the_slow_choice(tmp_path) -> None:
    from vision_tl.features.api import extract

    folder = tmp_path / "images"
    folder.mkdir()
    for path in _images(tmp_path):
        if path.name not in ("d.jpg", "g.jpg"):  # the damaged ones
            path.rename(folder / path.name)
    with pytest.warns(UserWarning, match="--decode device on cpu.*slower than --decode cpu"):
        features = extract(folder, "test_efficientnet", pretrained=False, image_size=SIZE[0], device="cpu",
                           decode="device", use_cache=False, progress=False, unlabelled=True)
    assert features.features.shape[0] == 8 and features.metadata["decode"] == "device:cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA GPU")
def test_on_a_gpu_batches_hold_each_image_in_place_and_stay_valid_while_later_ones_decode(tmp_path) -> None:
    """nvJPEG on the GPU (decoded on a side stream, used on the compute stream): every batch is
    kept on the device until the pass ends, so memory handed to a later batch while an earlier
    one was still to be read would show as other pixels."""
    paths = _images(tmp_path) * 3
    want, want_errors = _on_cpu_threads(paths)
    batches = list(device_batches(paths, SIZE, "bicubic", 4, "cuda", 2))
    got, errors = {}, {}
    for positions, x, failures in batches:
        errors.update(failures)
        if x is None:
            continue
        assert x.is_cuda and x.dtype == torch.uint8 and x.shape == (len(positions), 3, *SIZE)
        assert x.is_contiguous(memory_format=torch.channels_last)
        got.update((p, x[k].permute(1, 2, 0).cpu().numpy()) for k, p in enumerate(positions))
    assert errors == want_errors and sorted(got) == sorted(want)
    difference = np.stack([np.abs(got[i].astype(int) - want[i]) for i in sorted(want)])
    assert difference.mean() < device_decode.TOLERANCE
    for i in (2, 8, 12, 18):  # the grey JPEGs stay grey
        np.testing.assert_array_equal(got[i][..., 0], got[i][..., 2])
