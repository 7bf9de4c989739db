"""Damaged or unusable caches: the feature cache's shards and the decoded-image cache.

A cache file that is cut off, emptied (power loss) or has wrong bytes in the middle is
reported by name, dropped and rebuilt, and the command then gives the right answer; a cache
location that cannot be written says so, and how to pick another, before any slow work.
"""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tl.backbones import create_backbone, resolve_preprocessing
from vision_tl.data import decoded_cache as dc
from vision_tl.features import cache as cache_mod
from vision_tl.features import store as store_mod
from vision_tl.features.api import extract, scan_images
from vision_tl.features.cache import FeatureCache, FeatureCacheError
from vision_tl.features.extractor import FeatureExtractor
from vision_tl.features.store import FeatureStoreError, read_features

TINY = "test_efficientnet"
SIZE = 32


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three classes x three 40x40 PNGs, each class tinted a different colour."""
    root = tmp_path / "images"
    for k, name in enumerate(("crack", "good", "spot")):
        for i in range(3):
            rng = np.random.default_rng(10 * k + i)
            pixels = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
            pixels[..., k] += 120
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(TINY, pretrained=False)


@pytest.fixture(autouse=True)
def new_process(monkeypatch) -> None:
    """Each test starts like a new run: nothing is known to be checked already."""
    monkeypatch.setattr(store_mod, "_VERIFIED", set(), raising=False)
    monkeypatch.setattr(dc, "_VERIFIED", set(), raising=False)


def _read_only(monkeypatch) -> None:
    """A read-only mount: no file can be created (chmod does not stop root, which runs CI)."""
    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


# ------------------------------------------------------------------------- feature cache


def _filled(tmp_path: Path, folder: Path, net) -> tuple[FeatureCache, FeatureExtractor, list, list, np.ndarray]:
    cache = FeatureCache(tmp_path / "cache")
    fx = FeatureExtractor(net, TINY, resolve_preprocessing(TINY, SIZE))
    images = scan_images(folder)
    cache.ensure(fx, images.paths, images.hashes, progress=False)
    return cache, fx, images.paths, images.hashes, cache.read(fx, images.hashes)


def _shard(cache: FeatureCache, fx: FeatureExtractor, suffix: str) -> Path:
    (path,) = cache.store(fx).path.glob(f"*{suffix}")
    return path


def _overwrite_middle(path: Path, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(data)


@pytest.mark.parametrize("damage", ["finite bytes", "nan bytes"])
def test_extract_recomputes_a_shard_with_bad_bytes_in_the_middle(tmp_path, folder, damage) -> None:
    kwargs = {"pretrained": False, "image_size": SIZE, "cache_dir": tmp_path / "cache", "progress": False}
    torch.manual_seed(0)
    first = extract(folder, TINY, **kwargs)
    (feats,) = (tmp_path / "cache").rglob("*.feats.npy")
    value = np.float32(0.5) if damage == "finite bytes" else np.float32("nan")
    _overwrite_middle(feats, np.full(16, value, np.float32).tobytes())  # same size, header intact
    torch.manual_seed(0)  # same random weights: same cache key
    with pytest.warns(UserWarning, match=rf"feature cache shard {feats} is damaged.*not your data"):
        again = extract(folder, TINY, tmp_path / "out.npz", **kwargs)
    assert np.isfinite(again.features).all()
    np.testing.assert_allclose(again.features, first.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read_features(tmp_path / "out.npz").features, first.features, rtol=1e-5, atol=1e-6)
    assert not feats.exists()  # deleted, replaced by a new shard


@pytest.mark.parametrize("name, cut", [("feats", "half"), ("keys", "half"), ("feats", "empty"), ("keys", "empty")])
def test_cut_off_or_empty_shard_file_is_named_and_recomputed(tmp_path, folder, tiny_net, name, cut) -> None:
    cache, fx, paths, hashes, before = _filled(tmp_path, folder, tiny_net)
    path = _shard(cache, fx, f".{name}.npy")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    with pytest.warns(UserWarning, match=rf"{path.stem.split('.')[0]}\..*is damaged"):
        report = cache.ensure(fx, paths, hashes, progress=False)
    assert report.computed == len(paths)
    np.testing.assert_allclose(cache.read(fx, hashes), before, rtol=1e-5, atol=1e-6)


def test_shard_without_its_checksum_file_is_not_trusted(tmp_path, folder, tiny_net) -> None:
    """Without its .sum.json nothing shows whether a shard's bytes changed (here 8 bytes become a
    huge but finite float): it is recomputed, with a warning, rather than read."""
    cache, fx, paths, hashes, before = _filled(tmp_path, folder, tiny_net)
    _shard(cache, fx, ".sum.json").unlink()
    _overwrite_middle(_shard(cache, fx, ".feats.npy"), np.full(2, 3.4e38, np.float32).tobytes())
    store_mod._VERIFIED.clear()
    with pytest.warns(UserWarning, match=r"checksum file .*\.sum\.json is missing"):
        assert cache.ensure(fx, paths, hashes, progress=False).computed == len(paths)
    np.testing.assert_allclose(cache.read(fx, hashes), before, rtol=1e-5, atol=1e-6)


def test_read_never_returns_rows_of_a_damaged_shard(tmp_path, folder, tiny_net) -> None:
    cache, fx, _, hashes, _ = _filled(tmp_path, folder, tiny_net)
    feats = _shard(cache, fx, ".feats.npy")
    _overwrite_middle(feats, b"\x00" * 64)
    store_mod._VERIFIED.clear()
    with pytest.warns(UserWarning, match="damaged"), pytest.raises(FeatureStoreError, match="run again"):
        cache.read(fx, hashes)


def test_frozen_fit_on_a_damaged_shard_trains_on_recomputed_features(tmp_path, folder) -> None:
    import lightning as L

    from vision_tl.data import ImageFolderDataModule
    from vision_tl.tasks.classifier import ImageClassifier

    def fit():
        L.seed_everything(0, verbose=False)
        dm = ImageFolderDataModule(str(folder), backbone=TINY, image_size=SIZE, val_fraction=0.4,
                                   batch_size=4, num_workers=0)
        model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=SIZE,
                                mode="frozen", feature_cache=str(tmp_path / "cache"))
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)
        return trainer, model

    _, first = fit()
    for feats in (tmp_path / "cache").rglob("*.feats.npy"):
        _overwrite_middle(feats, np.full(64, np.nan, np.float32).tobytes())
    store_mod._VERIFIED.clear()
    with pytest.warns(UserWarning, match="feature cache shard .*feats.npy is damaged"):
        trainer, model = fit()
    assert np.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for a, b in zip(first.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_read_only_cache_fails_before_computing_and_says_how_to_move_it(tmp_path, folder, tiny_net,
                                                                         monkeypatch) -> None:
    cache, fx, paths, hashes, before = _filled(tmp_path, folder, tiny_net)
    _read_only(monkeypatch)
    assert cache.ensure(fx, paths, hashes, progress=False).computed == 0  # filled: reading is fine
    np.testing.assert_array_equal(cache.read(fx, hashes), before)
    new = tmp_path / "new.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(new)
    monkeypatch.setattr(cache_mod, "iter_embeddings", lambda *a, **k: pytest.fail("computed before checking"))
    with pytest.raises(FeatureCacheError, match=rf"feature cache {tmp_path / 'cache'} is not writable.*"
                                                r"--cache-dir DIR.*\$VISION_TL_CACHE.*--no-cache"):
        cache.ensure(fx, [*paths, new], [*hashes, "0" * 64], progress=False)
    with pytest.raises(FeatureCacheError, match="feature cache .* is not writable"):  # a new store
        FeatureCache(tmp_path / "other").ensure(fx, paths, hashes, progress=False)


def test_nan_features_from_the_backbone_are_never_cached(tmp_path, folder, tiny_net, monkeypatch) -> None:
    cache = FeatureCache(tmp_path / "cache")
    fx = FeatureExtractor(tiny_net, TINY, resolve_preprocessing(TINY, SIZE))
    images = scan_images(folder)
    real = cache_mod.iter_embeddings

    def poisoned(*args, **kwargs):
        for batch in real(*args, **kwargs):
            batch.features[:] = np.nan
            yield batch

    monkeypatch.setattr(cache_mod, "iter_embeddings", poisoned)
    with pytest.raises(FeatureCacheError, match="NaN or infinite features .*crack_0.png"):
        cache.ensure(fx, images.paths, images.hashes, progress=False)
    assert not list((tmp_path / "cache").rglob("*.feats.npy"))


# ------------------------------------------------------------------- decoded-image cache


def _images(tmp_path: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 12, 3), 40 + i * 40, np.uint8)).save(paths[-1])
    return paths


def _shas(paths: list[Path]) -> list[str]:
    from vision_tl.utils.files import file_sha256

    return [file_sha256(p) for p in paths]


def _decoded(paths: list[Path], cache: Path) -> np.ndarray:
    pixels, bad = dc.decoded_images(paths, _shas(paths), (8, 8), "bilinear", cache)
    assert bad == []
    return np.array(pixels)


@pytest.mark.parametrize("damage", ["json broken", "json empty", "npy cut off", "npy empty", "npy zeroed"])
def test_damaged_decoded_cache_is_named_and_rebuilt(tmp_path, damage) -> None:
    paths, cache = _images(tmp_path), tmp_path / "cache"
    expected = _decoded(paths, cache)
    (npy,), (meta,) = cache.glob("*.npy"), cache.glob("*.json")
    target = meta if damage.startswith("json") else npy
    data = target.read_bytes()
    if damage == "json broken":
        target.write_text(data.decode()[:-5] + ", }")
    elif damage == "npy cut off":
        target.write_bytes(data[: len(data) - 100])
    elif damage == "npy zeroed":  # same size, header intact: the black images the audit saw
        _overwrite_middle(target, b"\x00" * 64)
    else:
        target.write_bytes(b"")
    dc._VERIFIED.clear()
    with pytest.warns(UserWarning, match=rf"decoded-image cache file {target} is damaged.*rebuilding"):
        again = _decoded(paths, cache)
    np.testing.assert_array_equal(again, expected)
    assert json.loads(meta.read_text())["crc32"] is not None
    dc._VERIFIED.clear()
    np.testing.assert_array_equal(_decoded(paths, cache), expected)  # sound again: reused as is


def test_decoded_cache_of_an_older_version_without_checksum_is_reused(tmp_path, recwarn) -> None:
    paths, cache = _images(tmp_path), tmp_path / "cache"
    expected = _decoded(paths, cache)
    (npy,), (meta,) = cache.glob("*.npy"), cache.glob("*.json")
    fields = json.loads(meta.read_text())
    del fields["crc32"]
    meta.write_text(json.dumps(fields))
    stamp = npy.stat().st_mtime_ns
    dc._VERIFIED.clear()
    np.testing.assert_array_equal(_decoded(paths, cache), expected)
    assert npy.stat().st_mtime_ns == stamp and not [w for w in recwarn if "decoded" in str(w.message)]


def test_decoded_cache_env_pointing_at_a_file_is_named(tmp_path, monkeypatch) -> None:
    paths, not_a_dir = _images(tmp_path), tmp_path / "notes.txt"
    not_a_dir.write_text("mine")
    monkeypatch.setenv(dc.CACHE_ENV, str(not_a_dir))
    with pytest.raises(dc.DecodedCacheError, match=rf"decoded-image cache {not_a_dir} \(from \$VISION_TL_DECODED_"
                                                   r"CACHE\) is a file.*set \$VISION_TL_DECODED_CACHE to a "
                                                   r"writable folder or pass --data.decoded_cache DIR"):
        dc.decoded_images(paths, ["a", "b", "c"], (8, 8), "bilinear")
    assert not_a_dir.read_text() == "mine"
    with pytest.raises(dc.DecodedCacheError, match=r"cannot be created.*--data.decoded_cache DIR"):
        dc.decoded_images(paths, ["a", "b", "c"], (8, 8), "bilinear", not_a_dir / "sub")


def test_read_only_decoded_cache_fails_before_decoding_and_says_how_to_move_it(tmp_path, monkeypatch) -> None:
    paths, cache = _images(tmp_path), tmp_path / "cache"
    expected = _decoded(paths, cache)
    monkeypatch.setenv(dc.CACHE_ENV, str(cache))
    _read_only(monkeypatch)
    got, _ = dc.decoded_images(paths, _shas(paths), (8, 8), "bilinear")  # filled: reading is fine
    np.testing.assert_array_equal(got, expected)
    monkeypatch.setattr(dc, "decode_batches", lambda *a, **k: pytest.fail("decoded before checking"))
    with pytest.raises(dc.DecodedCacheError, match=rf"decoded-image cache {cache} \(from \$VISION_TL_DECODED_CACHE"
                                                   r"\) is not writable.*--data.decoded_cache DIR"):
        dc.decoded_images(paths, ["a", "b", "NEW"], (8, 8), "bilinear")


def test_a_full_disk_while_building_the_decoded_cache_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    """The pixel file is mapped into memory: left sparse, a disk that fills up while it is
    written kills the process with SIGBUS, without a word. Its space is reserved first."""
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(dc.DecodedCacheError, match=r"cannot make room for \w+\.npy .*No space left on device"):
        _decoded(_images(tmp_path), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no temporary file left


def test_feature_store_removes_what_killed_writers_left_and_names_a_full_disk(tmp_path, folder, tiny_net,
                                                                            monkeypatch) -> None:
    import os
    import time

    cache, fx, paths, hashes, _ = _filled(tmp_path, folder, tiny_net)
    store = cache.store(fx).path
    old = time.time() - 3600
    for name in ("dead.feats.npy", "dead.sum.json", "young.feats.npy"):  # uncommitted: no keys file
        (store / name).write_bytes(b"x")
    for name in ("dead.feats.npy", "dead.sum.json"):
        os.utime(store / name, (old, old))
    monkeypatch.setattr(store_mod, "_SWEPT", set())  # a new process
    store_mod.ShardStore(store, fx.identity())
    assert not (store / "dead.feats.npy").exists() and not (store / "dead.sum.json").exists()
    assert (store / "young.feats.npy").exists()  # perhaps a writer at work this very moment

    def full(path, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "atomic_write_bytes", full)
    with pytest.raises(FeatureStoreError, match=rf"feature cache {store}: cannot write \w+\.feats\.npy "
                                                r"\(No space left on device\)"):
        store_mod.ShardStore(store, fx.identity()).append(["k"], np.zeros((1, 4), np.float32))
