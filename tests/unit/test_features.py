"""Feature extraction, the content-keyed cache, outputs and probe heads (tiny models, tmp folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tl.backbones import create_backbone, resolve_preprocessing
from vision_tl.data.folder import DatasetError
from vision_tl.features import cache as cache_mod
from vision_tl.features.api import extract, partial_dir, scan_images
from vision_tl.features.cache import FeatureCache, FeatureCacheError
from vision_tl.features.extractor import FeatureExtractor, parse_stages
from vision_tl.features.probe import cross_validate, few_shot, format_table, pca_scatter, probe
from vision_tl.features.store import FeatureSet, FeatureStoreError, ShardStore, read_features

TINY = "test_efficientnet"
SIZE = 32


def _write_image(path: Path, seed: int, tint: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
    pixels[..., tint % 3] += 120
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three classes x five 40x40 PNGs, each class tinted a different colour."""
    root = tmp_path / "images"
    for k, name in enumerate(("crack", "good", "spot")):
        for i in range(5):
            _write_image(root / name / f"{name}_{i}.png", seed=10 * k + i, tint=k)
    return root


@pytest.fixture(scope="module")
def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(TINY, pretrained=False)


def _extractor(net, size: int = SIZE, stages=None) -> FeatureExtractor:
    return FeatureExtractor(net, TINY, resolve_preprocessing(TINY, size), stages)


def _index(root: Path):
    images = scan_images(root)
    return images.paths, images.hashes


def test_parse_stages() -> None:
    assert parse_stages(None) == ("pooled",)
    assert parse_stages("3, 4,pooled") == ("3", "4", "pooled")
    assert parse_stages([2, "pooled"]) == ("2", "pooled")
    for bad in ("", "top", "3,3"):
        with pytest.raises(ValueError):
            parse_stages(bad)


def test_multi_stage_width_and_values(tiny_net) -> None:
    widths = [f["num_chs"] for f in tiny_net.feature_info]
    fx = _extractor(tiny_net, stages="2,4,pooled")
    assert fx.num_features == widths[2] + widths[4] + tiny_net.num_features
    x = torch.randn(2, 3, SIZE, SIZE)
    out = fx.embed(x)
    assert out.shape == (2, fx.num_features)
    torch.testing.assert_close(out[:, -tiny_net.num_features:], tiny_net.eval()(x))
    with pytest.raises(ValueError, match="stage 9 does not exist"):
        _extractor(tiny_net, stages="9")


def test_a_stage_counted_from_the_end_shares_the_cache_entry_of_its_number(tiny_net) -> None:
    """--stages -1 and --stages 4 (of 5) are the same features: they were keyed apart, so the cache
    computed and stored them twice."""
    last = len(tiny_net.feature_info) - 1
    assert _extractor(tiny_net, stages="-1,pooled").identity() == _extractor(tiny_net, stages=f"{last},pooled").identity()
    assert _extractor(tiny_net, stages="-1").identity() != _extractor(tiny_net, stages=f"{last - 1}").identity()


def test_uint8_batches_are_normalised_on_the_device_exactly_as_on_the_workers(tiny_net) -> None:
    """Workers send uint8 (4x less to move); ``embed`` normalises it bit-identically to the
    float path, so features and cache entries do not depend on where normalisation ran."""
    from vision_tl.data.transforms import ImageTransform

    fx = _extractor(tiny_net, stages="2,pooled")
    images = [np.random.default_rng(i).integers(0, 256, (50, 45, 3), dtype=np.uint8) for i in range(3)]
    as_uint8 = torch.stack([fx.transform()(im) for im in images])
    as_float = torch.stack([ImageTransform(fx.preprocessing)(im) for im in images])
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == as_float.shape
    assert torch.equal(fx.embed(as_uint8), fx.embed(as_float))


def test_warm_up_batch_changes_neither_weights_nor_features(tiny_net) -> None:
    """On a GPU extract runs a blank batch while the loaders decode the first one; it must
    leave the model (BatchNorm statistics included) and its train/eval mode as they were."""
    from vision_tl.features.extractor import state_digest, warm_up

    fx = _extractor(tiny_net)
    x = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    tiny_net.train()  # a model handed over in train mode: BatchNorm would learn from zeros
    before, digest = fx.embed(x), state_digest(tiny_net)
    warm_up(fx, 4, torch.device("cpu"))
    assert tiny_net.training and state_digest(tiny_net) == digest
    assert torch.equal(fx.embed(x), before)


def test_bf16_precision_is_its_own_cache_identity(tiny_net) -> None:
    fp32, bf16 = _extractor(tiny_net), FeatureExtractor(tiny_net, TINY, resolve_preprocessing(TINY, SIZE),
                                                        precision="bf16")
    assert "precision" not in fp32.identity()  # fp32 cache keys stay those of earlier versions
    assert bf16.identity()["precision"] == "bf16" and bf16.identity() != fp32.identity()
    x = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    a, b = fp32.embed(x), bf16.embed(x)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="unknown precision"):
        FeatureExtractor(tiny_net, TINY, resolve_preprocessing(TINY, SIZE), precision="fp8")


def test_shard_store_ignores_unfinished_shard(tmp_path: Path) -> None:
    identity = {"backbone": "x", "num_features": 3}
    store = ShardStore(tmp_path / "s", identity)
    store.append(["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.save(tmp_path / "s" / "dead.feats.npy", np.ones((1, 3), np.float32))  # killed before its keys
    again = ShardStore(tmp_path / "s", identity)
    assert set(again.index()) == {"a", "b"}
    np.testing.assert_array_equal(again.read(["b", "a"])[0], [3, 4, 5])
    with pytest.raises(FeatureStoreError, match="different settings"):
        ShardStore(tmp_path / "s", {"backbone": "y", "num_features": 3})


def test_cache_computes_once_and_recomputes_changed_bytes(tmp_path, folder, tiny_net) -> None:
    cache, fx = FeatureCache(tmp_path / "cache"), _extractor(tiny_net)
    paths, hashes = _index(folder)
    first = cache.ensure(fx, paths, hashes, progress=False)
    assert first.computed == len(paths) == 15
    assert cache.ensure(fx, paths, hashes, progress=False).computed == 0
    before = cache.read(fx, hashes)
    _write_image(paths[0], seed=999, tint=2)  # new bytes under the same name
    paths2, hashes2 = _index(folder)
    assert hashes2[0] != hashes[0] and hashes2[1:] == hashes[1:]
    assert cache.ensure(fx, paths2, hashes2, progress=False).computed == 1
    # probe's extract img/s stays the 15-image run's: one new image measures mostly start-up
    assert cache.throughput(fx) == pytest.approx(first.images_per_second)
    after = cache.read(fx, hashes2)
    expected = fx.embed(fx.transform()(np.asarray(Image.open(paths2[0]).convert("RGB")))[None])
    np.testing.assert_allclose(after[0], expected[0].numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(after[0], before[0])
    np.testing.assert_array_equal(after[1:], before[1:])
    # a damaged speed note costs the probe its extract img/s column, not the run
    (cache.store(fx).path / "stats.json").write_text("{not json")
    assert np.isnan(cache.throughput(fx))
    (cache.store(fx).path / "stats.json").write_text('{"images": 3}')
    assert np.isnan(cache.throughput(fx))


def test_an_image_rewritten_after_the_scan_is_never_cached_under_its_old_hash(tmp_path, folder, tiny_net) -> None:
    """A line folder written to during an extraction: the features of the new content must not
    be stored under the scanned content's hash, where every later run would read them."""
    import shutil

    paths, hashes = _index(folder)
    shutil.copy(paths[5], paths[0])  # rewritten between the scan and the extraction
    cache, fx = FeatureCache(tmp_path / "c"), _extractor(tiny_net)
    report = cache.ensure(fx, paths, hashes, progress=False)
    assert [p for p, _ in report.failed] == [paths[0]] and "changed while it was being embedded" in report.failed[0][1]
    assert report.computed == len(paths) - 1
    store = cache.store(fx)
    assert hashes[0] not in store and all(h in store for h in hashes[1:])


def test_progress_bar_says_why_it_counts_fewer_images_than_files(tmp_path, folder, tiny_net, monkeypatch) -> None:
    """Byte-identical files are embedded once: a bar of 14 after "15 images" needs its reason."""
    import shutil

    from vision_tl.features import extractor as extractor_mod

    shutil.copy(folder / "good" / "good_0.png", folder / "good" / "good_copy.png")
    paths, hashes = _index(folder)
    bars = []
    real = extractor_mod.progress_bar
    monkeypatch.setattr(extractor_mod, "progress_bar", lambda **kw: bars.append(kw) or real(**kw))
    report = FeatureCache(tmp_path / "c").ensure(_extractor(tiny_net), paths, hashes, progress="features train")
    assert report.computed == 15 and len(paths) == 16
    assert bars[0]["total"] == 15 and bars[0]["desc"] == "features train (1 byte-identical copy embedded once)"


def test_cache_keyed_by_input_size_weights_and_stages(tmp_path, folder, tiny_net) -> None:
    cache = FeatureCache(tmp_path / "cache")
    paths, hashes = _index(folder)
    cache.ensure(_extractor(tiny_net), paths, hashes, progress=False)
    assert cache.ensure(_extractor(tiny_net, size=48), paths, hashes, progress=False).computed == 15
    assert cache.ensure(_extractor(tiny_net, stages="3"), paths, hashes, progress=False).computed == 15
    torch.manual_seed(1)
    other = create_backbone(TINY, pretrained=False)  # same "random-init" identity, other weights
    assert cache.ensure(_extractor(other), paths, hashes, progress=False).computed == 15
    assert len(list((tmp_path / "cache" / TINY).iterdir())) == 4


def test_cache_written_by_another_backbone_is_refused(tmp_path, folder, tiny_net) -> None:
    paths, hashes = _index(folder)
    FeatureCache(tmp_path / "c").ensure(_extractor(tiny_net), paths, hashes, progress=False)
    (store_dir,) = (tmp_path / "c" / TINY).iterdir()
    other = create_backbone("resnet10t", pretrained=False)
    fx = FeatureExtractor(other, "resnet10t", resolve_preprocessing("resnet10t", SIZE))
    with pytest.raises(FeatureCacheError, match=r"resnet10t") as err:
        FeatureCache(store_dir).ensure(fx, paths, hashes, progress=False)  # a store dir as cache root
    assert str(store_dir) in str(err.value)


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_extract_writes_rows_and_metadata(tmp_path, folder, suffix) -> None:
    out = tmp_path / f"feats{suffix}"
    fs = extract(folder, TINY, out, pretrained=False, image_size=SIZE, stages="3,pooled",
                 cache_dir=tmp_path / "cache", progress=False)
    back = read_features(out)
    assert back.features.shape == fs.features.shape == (15, fs.metadata["num_features"])
    np.testing.assert_array_equal(back.features, fs.features)
    assert back.paths[0] == "crack/crack_0.png" and back.classes == ["crack", "good", "spot"]
    assert back.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert back.sha256 == fs.sha256 and len(back.sha256[0]) == 64
    meta = back.metadata
    assert meta["backbone"] == TINY and meta["weights"] == "random-init"
    assert meta["preprocessing"]["input_size"] == [SIZE, SIZE] and meta["stages"] == ["3", "pooled"]
    # how long it took, and how long until the first batch was done (start-up: what a GPU run waits for)
    assert 0 < meta["seconds_to_first_batch"] <= meta["seconds"]
    assert meta["images_per_second"] == pytest.approx(15 / meta["seconds"])
    # all from the cache: no timing, written as JSON null (NaN is not JSON, other readers choke on it)
    torch.manual_seed(0)  # the same random weights (their digest keys the cache) ...
    extract(folder, TINY, None, pretrained=False, image_size=SIZE, stages="3,pooled", cache_dir=tmp_path / "cache",
            progress=False)
    torch.manual_seed(0)  # ... again: every feature comes from the cache
    again = extract(folder, TINY, tmp_path / f"again{suffix}", pretrained=False, image_size=SIZE,
                    stages="3,pooled", cache_dir=tmp_path / "cache", progress=False)
    assert again.metadata["images_per_second"] is None and again.metadata["seconds"] < meta["seconds"]
    assert read_features(tmp_path / f"again{suffix}").metadata["seconds_to_first_batch"] is None


def test_a_feature_set_prints_its_size_and_origin_not_its_arrays() -> None:
    """In a notebook the dataclass's repr printed the feature matrix and every path and hash."""
    fs = FeatureSet(np.zeros((1800, 1280), np.float32), [f"crack/{i}.png" for i in range(1800)],
                    np.zeros(1800, np.int64), ["crack", "good"], ["0" * 64] * 1800,
                    {"backbone": "tf_efficientnet_lite0", "stages": ["pooled"]})
    assert repr(fs) == ("FeatureSet(1800 images x 1280 features, classes=['crack', 'good'], "
                        "backbone='tf_efficientnet_lite0', stages=['pooled'])")


def test_extract_refuses_bad_outputs(tmp_path, folder) -> None:
    kwargs = {"pretrained": False, "image_size": SIZE, "cache_dir": tmp_path / "c", "progress": False}
    with pytest.raises(FeatureStoreError, match="does not exist"):
        extract(folder, TINY, tmp_path / "missing" / "f.npz", **kwargs)
    with pytest.raises(FeatureStoreError, match="expected one of: .npz, .parquet"):
        extract(folder, TINY, tmp_path / "f.csv", **kwargs)
    (tmp_path / "f.npz").write_bytes(b"keep me")
    with pytest.raises(FeatureStoreError, match="already exists; pass --overwrite"):
        extract(folder, TINY, tmp_path / "f.npz", **kwargs)
    assert (tmp_path / "f.npz").read_bytes() == b"keep me"
    extract(folder, TINY, tmp_path / "f.npz", overwrite=True, **kwargs)
    assert read_features(tmp_path / "f.npz").features.shape[0] == 15


def test_killed_extraction_resumes_and_leaves_no_final_file(tmp_path, folder, monkeypatch) -> None:
    out = tmp_path / "f.parquet"
    monkeypatch.setattr(cache_mod, "SHARD_ROWS", 4)
    calls = {"n": 0}
    real_embed = FeatureExtractor.embed

    def dying_embed(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed during the third batch
        return real_embed(self, x)

    monkeypatch.setattr(FeatureExtractor, "embed", dying_embed)
    kwargs = {"pretrained": False, "image_size": SIZE, "batch_size": 4, "use_cache": False,
              "progress": False}
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        extract(folder, TINY, out, **kwargs)
    assert not out.exists() and partial_dir(out).is_dir()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".f.parquet.*.tmp"))
    monkeypatch.setattr(FeatureExtractor, "embed", real_embed)
    calls["n"] = 0
    seen = []
    monkeypatch.setattr(FeatureExtractor, "embed", lambda self, x: seen.append(len(x)) or real_embed(self, x))
    torch.manual_seed(0)  # same random weights: same cache key
    extract(folder, TINY, out, **kwargs)
    assert sum(seen) == 15 - 8  # the two finished batches were not recomputed
    assert out.exists() and not partial_dir(out).exists()
    # a second extraction to the same output while one is under way is refused (its finish
    # removed the first one's finished shards from under it)
    from vision_tl.features.store import FeatureStoreError
    from vision_tl.utils import files
    from vision_tl.utils.files import path_lock

    if files.fcntl is not None:  # (no flock, as on Windows: no lock to take)
        with path_lock(partial_dir(out)), pytest.raises(FeatureStoreError, match="another extraction is writing"):
            extract(folder, TINY, out, overwrite=True, **kwargs)


def test_unreadable_image_is_named(tmp_path, folder) -> None:
    bad = folder / "good" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        extract(folder, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    fs = extract(folder, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c",
                 progress=False, skip_bad=True)
    assert len(fs.paths) == 15 and "good/broken.png" not in fs.paths


@pytest.mark.parametrize("workers, cores", [(0, 2), (2, 2), (2, 16)])
def test_whole_batch_decoding_gives_the_per_image_embeddings(tmp_path, tiny_net, workers, cores,
                                                             monkeypatch) -> None:
    """Threads (few cores) or loader processes (many) decode whole batches; the embeddings and
    the failures are those of decoding, resizing and transforming image by image."""
    from vision_tl.data import decode_threads
    from vision_tl.features.extractor import _ImageFiles, iter_embeddings
    from vision_tl.imaging import load_rgb

    monkeypatch.setattr(decode_threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(decode_threads, "_start_method", lambda: "fork")
    assert decode_threads.decode_in_processes(workers) == (cores == 16)
    assert _ImageFiles([], _extractor(tiny_net).transform()).whole_batches  # the path under test
    rng = np.random.default_rng(2)
    paths = []
    for i in range(7):  # JPEGs at the model's size (direct), PNGs and JPEGs to resize, a damaged one
        pixels = rng.integers(0, 256, (SIZE if i % 2 else 45, SIZE, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.{'jpg' if i % 3 else 'png'}")
        Image.fromarray(pixels).save(paths[-1])
    paths[4].write_bytes(paths[4].read_bytes()[:200])
    fx = _extractor(tiny_net)
    batches = list(iter_embeddings(fx, paths, batch_size=3, num_workers=workers, device="cpu", progress=False))
    got = {i: f for b in batches for i, f in zip(b.positions, b.features)}
    failures = [i for b in batches for i, _ in b.failures]
    assert failures == [4] and sorted(got) == [0, 1, 2, 3, 5, 6]
    for i, features in got.items():
        expected = fx.embed(fx.transform()(load_rgb(paths[i]))[None]).numpy()[0]
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_random_init_extraction_is_the_same_every_run_and_cached_once(tmp_path, folder) -> None:
    """A random-init baseline must be reproducible, and a re-run must find its features cached."""
    runs = [extract(folder, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].features, runs[1].features)
    assert runs[0].metadata["state_digest"] == runs[1].metadata["state_digest"]
    assert runs[1].metadata["images_per_second"] is None  # nothing computed: every row from the cache


def test_flat_folder_has_no_labels(tmp_path) -> None:
    for i in range(3):
        _write_image(tmp_path / "flat" / f"{i}.png", seed=i, tint=i)
    fs = extract(tmp_path / "flat", TINY, pretrained=False, image_size=SIZE,
                 cache_dir=tmp_path / "c", progress=False)
    assert fs.classes == [] and fs.labels.tolist() == [-1, -1, -1]


def test_images_beside_class_folders_are_never_dropped(tmp_path) -> None:
    """A folder of images with a dated sub-folder: read as classes, the images beside the
    sub-folder would be lost, so extract refuses and names them; --unlabelled embeds all."""
    root = tmp_path / "line"
    for i in range(3):
        _write_image(root / f"{i}.png", seed=i, tint=i)
    _write_image(root / "2024-06-02" / "3.png", seed=3, tint=3)
    with pytest.raises(DatasetError, match=r"3 image\(s\) beside them that no class holds: 0\.png, 1\.png, "
                                           r"2\.png.*--unlabelled"):
        extract(root, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    fs = extract(root, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False,
                 unlabelled=True)
    assert fs.paths == ["0.png", "1.png", "2.png", "2024-06-02/3.png"] and fs.labels.tolist() == [-1] * 4


def test_split_folders_keep_a_class_only_val_has(tmp_path) -> None:
    """train/ + val/ where val/ has a class folder train/ lacks: every image gets a row, with its
    own label after train/'s classes (whose indices stay a train/-fitted model's), and a warning."""
    root = tmp_path / "extra2"
    for split, names in (("train", ("crack", "good")), ("val", ("crack", "dent", "good")),
                         ("test", ("good",))):
        for k, name in enumerate(names):
            for i in range(2):
                _write_image(root / split / name / f"{name}_{i}.png", seed=100 * k + 10 * i + len(split), tint=k)
    with pytest.warns(UserWarning, match=r"val/ has dent, which train/ lacks.*dent = 2"):
        fs = extract(root, TINY, tmp_path / "f.npz", pretrained=False, image_size=SIZE,
                     cache_dir=tmp_path / "c", progress=False)
    assert fs.classes == ["crack", "good", "dent"] and len(fs.paths) == 12
    assert read_features(tmp_path / "f.npz").classes == fs.classes
    rows = dict(zip(fs.paths, fs.labels.tolist()))
    assert rows["val/dent/dent_0.png"] == rows["val/dent/dent_1.png"] == 2
    assert rows["train/good/good_0.png"] == rows["test/good/good_1.png"] == 1  # test/ lacks crack: fine
    assert rows["val/crack/crack_0.png"] == 0


def _blobs(n_per_class: int = 30, classes: int = 3, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centers = rng.normal(0, 4, (classes, dim))
    return (centers[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels


def test_probe_heads_on_separable_features(tmp_path) -> None:
    x, y = _blobs()
    for head in ("logreg", "knn", "logreg-l2"):
        assert cross_validate(x, y, head, folds=5).acc > 0.95
    score = few_shot(x, y, shots=2, draws=4)
    assert score.balanced > 0.8 and score.balanced_std >= 0.0
    views = np.stack([x, x + 0.01], 1)  # [N, K, F]: training uses both views
    assert cross_validate(views, y, "logreg", folds=3).acc > 0.95
    with pytest.raises(ValueError, match="more than 30 distinct images"):
        few_shot(x, y, shots=30)
    with pytest.raises(ValueError, match="unknown head"):
        cross_validate(x, y, "svm")
    png = pca_scatter(x, y, ["a", "b", "c"], tmp_path / "pca.png", title="blobs")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_probe_end_to_end_tiny(tmp_path, folder) -> None:
    rows = probe(folder, [TINY], heads=["logreg", "knn"], folds=2, shots=[1], draws=2,
                 plot_dir=tmp_path, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c",
                 progress=False)
    assert [r.head for r in rows] == ["logreg", "knn"]
    assert 0.0 <= rows[0].cv.acc <= 1.0 and 1 in rows[0].few_shot
    assert rows[0].images_per_second > 0
    table = format_table(rows, folds=2)
    assert "2-fold acc" in table and "1-shot bal. acc" in table
    shots_only = format_table([r for r in rows if r.head == "knn"], folds=0).splitlines()[0].split()
    assert "0-fold" not in shots_only and "balanced" not in shots_only  # --folds 0: no empty CV columns
    assert (tmp_path / f"pca_{TINY}.png").exists()


def _frozen_run(root: Path, tmp_path: Path, feature_cache: str | None, views: int = 1):
    import lightning as L

    from vision_tl.data import ImageFolderDataModule
    from vision_tl.tasks.classifier import ImageClassifier

    L.seed_everything(0, verbose=False)
    dm = ImageFolderDataModule(str(root), backbone=TINY, image_size=SIZE, val_fraction=0.4,
                               batch_size=4, num_workers=0, augment="light")
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=SIZE,
                            mode="frozen", feature_cache=feature_cache, cached_views=views)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm


def test_frozen_fit_trains_head_on_cached_features(tmp_path, folder) -> None:
    cache_dir = tmp_path / "cache"
    trainer, model, dm = _frozen_run(folder, tmp_path, str(cache_dir), views=2)
    assert len(list((cache_dir / TINY).iterdir())) == 2  # one store per view (clean, augmented)
    assert dm._feature_data == {}  # images again after fit
    fit_val = dict(model.eval_results["val"])
    trainer.validate(model, datamodule=dm, verbose=False)  # image path, same weights
    image_val = model.eval_results["val"]
    for key in ("acc", "balanced_acc", "f1_macro"):
        assert fit_val[key] == pytest.approx(image_val[key], abs=1e-6)
    assert fit_val["confusion_matrix"] == image_val["confusion_matrix"]


def test_frozen_fit_without_cache_keeps_image_path(tmp_path, folder, monkeypatch) -> None:
    from vision_tl.features import training

    monkeypatch.setattr(training, "cached_feature_datasets",
                        lambda *a, **k: pytest.fail("cache used although feature_cache=None"))
    _, model, _ = _frozen_run(folder, tmp_path, None)
    assert "val" in model.eval_results


def test_default_cache_dir_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VISION_TL_CACHE", str(tmp_path / "envcache"))
    assert FeatureCache().root == tmp_path / "envcache"


def test_probe_scores_do_not_count_copies_of_training_images():
    """Random labels on random features score chance; with every image present twice,
    ungrouped folds let 1-NN find each test image's copy in training (92.5 % here)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    y = np.repeat([0, 1], 20)
    rng.shuffle(y)
    features, labels = np.concatenate([x, x]), np.concatenate([y, y])
    shas = np.concatenate([np.arange(40)] * 2).astype(str)
    assert cross_validate(features, labels, "knn", folds=4).acc > 0.9  # what grouping prevents
    assert cross_validate(features, labels, "knn", folds=4, groups=shas).acc < 0.7
    assert few_shot(features, labels, 5, "knn", draws=5, groups=shas).acc < 0.7


def test_probe_counts_distinct_images_and_draws_distinct_shots(tmp_path, folder, monkeypatch) -> None:
    """Copies count once: a class of 5 files that are 3 distinct images cannot fill 5 folds
    (two folds would test without it), a 4-shot draw trains on 4 distinct images, and these
    checks come before the slow extraction. A random-init baseline is the same for a seed."""
    import importlib

    probe_module = importlib.import_module("vision_tl.features.probe")

    y = np.array([0] * 5 + [1] * 8)
    shas = np.array(["a", "a", "a", "b", "c"] + [f"d{i}" for i in range(8)])
    x = np.random.default_rng(0).normal(size=(13, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"--folds 5: every class needs at least 5 distinct images.*smallest "
                                         r"class has 3 \(byte-identical copies count once\).*Use --folds 3, "
                                         r"or --folds 0 to skip cross-validation"):
        cross_validate(x, y, folds=5, groups=shas)
    assert cross_validate(x, y, folds=3, groups=shas).acc >= 0
    trained = []
    real_fit = probe_module._fit_score

    def spy(head, x_train, y_train, *args):
        trained.append(y_train)
        return real_fit(head, x_train, y_train, *args)

    monkeypatch.setattr(probe_module, "_fit_score", spy)
    few_shot(x, y, shots=2, draws=20, groups=shas)
    assert all(np.bincount(t).tolist() == [2, 2] for t in trained)  # one row per distinct image
    with pytest.raises(ValueError, match="more than 3 distinct images.*Use shots below 3"):
        few_shot(x, y, shots=3, groups=shas)
    monkeypatch.undo()
    _write_image(tmp_path / "one.png", seed=99, tint=1)
    for copy in range(4):  # one class made of copies of a single file
        (folder / "copies").mkdir(exist_ok=True)
        (folder / "copies" / f"{copy}.png").write_bytes((tmp_path / "one.png").read_bytes())
    try:
        with pytest.raises(ValueError, match=r"--folds 2: .*smallest class has 1 .*too few in: copies \(1\)\. "
                                             r"Add images to it, or --folds 0 to skip cross-validation$"):
            probe(folder, TINY, heads="logreg", folds=2, pretrained=False, image_size=SIZE,
                  cache_dir=tmp_path / "never", progress=False)
        assert not (tmp_path / "never").exists()  # refused before anything was extracted
    finally:
        for f in (folder / "copies").iterdir():
            f.unlink()
        (folder / "copies").rmdir()
    runs = [probe(folder, TINY, heads="logreg", folds=2, pretrained=False, image_size=SIZE,
                  cache_dir=tmp_path / "c", progress=False, seed=3)[0].cv.acc for _ in range(2)]
    assert runs[0] == runs[1] and len(list((tmp_path / "c" / TINY).iterdir())) == 1


def test_documented_imports_give_the_functions_not_the_submodules() -> None:
    import importlib
    import subprocess
    import sys

    import vision_tl.features as features
    from vision_tl.features import probe as probe_name  # the package docstring's import

    assert probe_name is probe and callable(probe_name)
    for name, module in features._EXPORTS.items():  # noqa: SLF001 - the lazy table itself
        assert getattr(features, name) is getattr(importlib.import_module(module), name), name
    assert set(features.__all__) == set(features._EXPORTS)  # noqa: SLF001
    assert sys.modules["vision_tl.features.probe"].probe is probe  # the submodule is still importable
    fresh = "from vision_tl.features import probe; import sys; print(callable(probe), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]  # a function, and still lazy


def test_extract_runs_without_importing_lightning(folder, tmp_path) -> None:
    """`vision-tl extract` starts without Lightning (about 1.5 s of imports it never uses)."""
    import subprocess
    import sys

    out = tmp_path / "f.npz"
    code = (f"import sys; from vision_tl.cli import main; rc = main(['extract', {str(folder)!r}, '--backbone', "
            f"{TINY!r}, '--random-init', '--image-size', '{SIZE}', '--out', {str(out)!r}, '--no-cache', "
            "'--no-progress']); print(rc, 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout + done.stderr[-2000:]
    assert out.is_file()


def test_probe_takes_one_backbone_name_and_any_label_sequence(tmp_path, folder) -> None:
    rows = probe(folder, TINY, heads="logreg", folds=2, pretrained=False, image_size=SIZE,
                 cache_dir=tmp_path / "c", progress=False)
    assert [(r.backbone, r.head) for r in rows] == [(TINY, "logreg")]
    x, y = _blobs()
    assert cross_validate(x.tolist(), y.tolist(), "logreg", folds=3).acc == cross_validate(x, y, "logreg", folds=3).acc
    assert few_shot(x.tolist(), tuple(y), shots=2, draws=2).acc == few_shot(x, y, shots=2, draws=2).acc
    with pytest.raises(ValueError, match="integer class indices"):
        cross_validate(x, y.astype(float), folds=3)
    with pytest.raises(ValueError, match=r"features must be \[N, F\]"):
        cross_validate(x[:-1], y, folds=3)
    unlabelled = np.where(np.arange(len(y)) < 3, -1, y)  # an extract of images without class folders
    for score in (lambda: cross_validate(x, unlabelled, folds=3), lambda: few_shot(x, unlabelled, shots=2)):
        with pytest.raises(ValueError, match=r"3 of \d+ labels are negative.*labels >= 0"):
            score()


def test_extract_with_a_fixed_size_vit_at_another_image_size(tmp_path, folder) -> None:
    fs = extract(folder, "vit_tiny_patch16_224", pretrained=False, image_size=SIZE,
                 cache_dir=tmp_path / "cache", progress=False)
    assert fs.features.shape == (15, 192) and fs.metadata["preprocessing"]["input_size"] == [SIZE, SIZE]


@pytest.mark.parametrize("device, batch", [("cpu", 8), ("cuda", 24)])
def test_frozen_training_features_decode_on_threads_and_use_the_gpu_batch(inspection_folder, tiny_net, monkeypatch,
                                                                         tmp_path, device, batch):
    """The feature cache of a frozen fit is filled by clean views decoded on the data module's
    threads and augmented views through its loader processes; on a GPU in training-size batches."""
    from vision_tl.data import ImageFolderDataModule
    from vision_tl.features import training
    from vision_tl.features.cache import CacheReport, FeatureCache

    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=SIZE, batch_size=24,
                               num_workers=None, augment="inspection")
    dm.setup("fit")
    calls = []

    def ensure(self, extractor, paths, hashes, **kwargs):
        calls.append((extractor.view, kwargs["batch_size"], kwargs["num_workers"]))
        return CacheReport(len(paths), len(paths), [], 1.0)

    monkeypatch.setattr(FeatureCache, "ensure", ensure)
    monkeypatch.setattr(FeatureCache, "read", lambda self, extractor, hashes: np.zeros((len(hashes), 4), np.float32))
    training.cached_feature_datasets(tiny_net, TINY, dm, tmp_path / "fc", views=2, device=device, progress=False)
    assert calls == [(0, batch, dm.decode_threads), (1, batch, dm.num_workers), (0, batch, dm.decode_threads)]


def test_extract_reads_a_class_spelled_with_other_accents_as_one_class(tmp_path) -> None:
    """train/été typed on one system, val/été copied from macOS (decomposed accents): one class."""
    nfc, nfd = "\u00e9t\u00e9", "e\u0301te\u0301"
    for split, name, seed in (("train", nfc, 1), ("train", "ok", 2), ("val", nfd, 3), ("val", "ok", 4)):
        _write_image(tmp_path / "d" / split / name / f"{seed}.png", seed=seed, tint=seed % 3)
    fs = extract(tmp_path / "d", TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert fs.classes == ["ok", nfc] and sorted(fs.labels.tolist()) == [0, 0, 1, 1]  # sorted folder names
    _write_image(tmp_path / "d" / "train" / nfd / "5.png", seed=5, tint=1)  # both spellings in train/
    with pytest.raises(DatasetError, match="differ only in how their accents are encoded"):
        extract(tmp_path / "d", TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False)


def test_weights_changed_between_two_calls_get_another_cache_store(tmp_path, folder) -> None:
    """Through the Python API one extractor may see its model trained further: the features of
    the new weights must never land in (or be read from) the old weights' store."""
    torch.manual_seed(0)
    net = create_backbone(TINY, pretrained=False)
    fx, cache = _extractor(net), FeatureCache(tmp_path / "c")
    paths, hashes = _index(folder)
    before = cache.features(fx, paths[:5], hashes[:5], progress=False)
    first_key = fx.identity()["state_digest"]
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    assert fx.identity()["state_digest"] != first_key
    after = cache.features(fx, paths, hashes, progress=False)
    assert not np.allclose(after[:5], before)  # computed again with the new weights
    fresh = FeatureCache(tmp_path / "fresh").features(_extractor(net), paths, hashes, progress=False)
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-6)


def test_augmented_views_are_the_same_in_every_run_and_with_any_worker_count(tmp_path, folder, tiny_net) -> None:
    """probe --views and frozen fit with cached_views read augmented views from the cache: which
    run filled it must not change them (the README promises the same augmentation per seed)."""
    from vision_tl.features.extractor import iter_embeddings

    paths, _ = _index(folder)
    pre = resolve_preprocessing(TINY, SIZE)
    views = {}
    for workers in (0, 2, 0):
        fx = FeatureExtractor(tiny_net, TINY, pre, augment="inspection", view=1)
        views.setdefault(workers, []).append(np.concatenate(
            [b.features for b in iter_embeddings(fx, paths, 4, workers, "cpu", progress=False)]))
    np.testing.assert_array_equal(views[0][0], views[0][1])
    np.testing.assert_allclose(views[0][0], views[2][0], rtol=1e-5, atol=1e-6)
    other = FeatureExtractor(tiny_net, TINY, pre, augment="inspection", view=2)
    second = np.concatenate([b.features for b in iter_embeddings(other, paths, 4, 0, "cpu", progress=False)])
    assert not np.allclose(second, views[0][0])  # another view is another augmentation


def test_options_that_would_silently_repeat_work_or_columns_are_refused(tmp_path, folder, tiny_net, capsys) -> None:
    from vision_tl.features.cli import main as features_main
    from vision_tl.features.store import check_output_path

    with pytest.raises(ValueError, match="name stage 3 twice"):
        FeatureExtractor(tiny_net, TINY, resolve_preprocessing(TINY, SIZE), "3,-2")
    (tmp_path / "out.npz").mkdir()
    with pytest.raises(FeatureStoreError, match="is a directory"):
        check_output_path(tmp_path / "out.npz", overwrite=True)
    with pytest.raises(SystemExit):
        features_main(["probe", str(folder), "--backbone", TINY, "--backbone", TINY, "--random-init"])
    assert "--backbone test_efficientnet is given more than once" in capsys.readouterr().err


def test_knn_cross_validation_on_a_tiny_set_uses_no_more_neighbours_than_training_rows():
    """8 images, 2 folds: 4 training rows per fold, fewer than knn's 5 neighbours (sklearn
    stopped with 'Expected n_neighbors <= n_samples_fit')."""
    from vision_tl.features.probe import cross_validate

    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    features = rng.normal(size=(8, 6)) * 0.3 + np.eye(6)[labels] * 3.0  # two directions (knn is cosine)
    score = cross_validate(features, labels, head="knn", folds=2)
    assert score.acc == 1.0


def test_extraction_runs_without_cudnn_benchmarking_and_gives_the_setting_back(tmp_path, tiny_net,
                                                                                monkeypatch) -> None:
    """A fit with configs/gpu.yaml benchmarks cuDNN kernels per batch shape; its feature-cache
    pass must not (seconds per shape on a GPU), and training after it must get it back."""
    from vision_tl.features.extractor import iter_embeddings

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((SIZE, SIZE, 3), 20 * i, np.uint8)).save(paths[-1])
    fx = _extractor(tiny_net)
    seen = []
    real = fx.embed
    monkeypatch.setattr(fx, "embed", lambda x: seen.append(torch.backends.cudnn.benchmark) or real(x))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    rows = [b for b in iter_embeddings(fx, paths, batch_size=2, num_workers=0, device="cpu", progress=False)]
    assert sum(len(b.positions) for b in rows) == 5
    assert seen == [False, False, False] and torch.backends.cudnn.benchmark is True


def test_one_image_in_two_classes_is_named_before_any_work(tmp_path, folder) -> None:
    """A byte-identical image under two class folders is a labelling error: probe named nothing and
    few-shot could draw an empty test set (a raw scikit-learn error); now the two files are named."""
    (folder / "good" / "also_crack.png").write_bytes((folder / "crack" / "crack_0.png").read_bytes())
    with pytest.raises(ValueError, match=r"crack_0.png \(crack\) and .*also_crack.png \(good\) are the same image"):
        probe(folder, TINY, heads="logreg", folds=0, shots=[2], pretrained=False, image_size=SIZE,
              cache_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"row 0 \(class 0\) and row 2 \(class 1\) are the same image"):
        few_shot(x, np.array([0, 0, 1, 1]), 1, groups=np.array(["s", "t", "s", "u"]))


def test_an_image_rewritten_in_place_with_its_old_mtime_is_hashed_again(tmp_path) -> None:
    """Same inode, same size, mtime put back with os.utime: a process that scanned the file before
    must not keep its old hash, or its new pixels are cached under the old content's key."""
    import os
    import time

    from vision_tl.data.folder import content_hash

    path = tmp_path / "a.bmp"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    before, stat = content_hash(path), path.stat()
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms): a later ctime
    with open(path, "r+b") as fh:  # new pixels, same size, same file
        data = bytearray(fh.read())
        data[-10:] = b"\xff" * 10
        fh.seek(0)
        fh.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert content_hash(path) != before


def _undecodable_png() -> bytes:
    """A PNG whose chunk checksums are right (the scan's header check passes) but whose pixel
    data is not zlib data: it fails only when decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 40, 40, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x78\x9c" + b"garbage!" * 20)
            + chunk(b"IEND", b""))


def test_skip_bad_leaves_out_every_copy_of_an_undecodable_image(tmp_path, folder) -> None:
    for name in ("good/zz_bad.png", "spot/zz_copy.png"):  # the same bytes twice: embedded (and failed) once
        (folder / name).write_bytes(_undecodable_png())
    with pytest.warns(UserWarning, match="the same bytes as"):
        fs = extract(folder, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False,
                     skip_bad=True)
    assert len(fs.paths) == 15 and not any("zz_" in p for p in fs.paths)


def test_probe_with_skip_bad_leaves_out_images_that_fail_to_decode(tmp_path, folder) -> None:
    (folder / "good" / "zz_bad.png").write_bytes(_undecodable_png())
    kwargs = {"pretrained": False, "image_size": SIZE, "cache_dir": tmp_path / "c", "progress": False,
              "folds": 2, "heads": "knn"}
    with pytest.raises(ValueError, match="(?s)zz_bad.png.*--skip-bad"):
        probe(folder, TINY, **kwargs)
    with pytest.warns(UserWarning, match="left out 1 image"):
        (row,) = probe(folder, TINY, skip_bad=True, **kwargs)
    assert row.cv is not None


def test_weights_written_through_data_get_another_cache_key(tiny_net) -> None:
    import copy

    fx = _extractor(copy.deepcopy(tiny_net))
    before = fx.identity()["state_digest"]
    with torch.no_grad():
        next(fx.model.parameters()).data.mul_(0.5)  # moves no version counter
    assert fx.identity()["state_digest"] != before


def test_a_file_rewritten_at_its_size_within_a_timestamp_step_is_hashed_again(tmp_path, monkeypatch) -> None:
    """On disks that keep whole seconds (FAT, ext2 with small inodes, some shares) such a rewrite
    keeps the file's size and times: the scan's memo must not vouch for the new bytes."""
    import hashlib
    import pathlib

    from vision_tl.data.folder import content_hash

    real_stat = pathlib.Path.stat

    class Coarse:  # the stat of a disk with one-second timestamps
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            value = getattr(self._st, name)
            return value // 10**9 * 10**9 if name in ("st_mtime_ns", "st_ctime_ns") else value

    monkeypatch.setattr(pathlib.Path, "stat", lambda self, **kw: Coarse(real_stat(self, **kw)))
    path = tmp_path / "a.bmp"  # uncompressed: another image of its size is a file of the same size
    _write_image(path, seed=1, tint=0)
    first, size = content_hash(path), path.stat().st_size
    _write_image(path, seed=2, tint=0)
    assert path.stat().st_size == size
    assert content_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_an_output_folder_that_cannot_be_written_fails_before_any_work(tmp_path, monkeypatch) -> None:
    """extract, export and predict-onnx probe the folder up front (export failed after loading the
    checkpoint, naming its temporary file; predict-onnx asked os.access, which says yes to root)."""
    import tempfile

    from vision_tl.deploy import DeployError
    from vision_tl.deploy.cli import _check_output
    from vision_tl.export import ExportError
    from vision_tl.export.onnx_export import check_output_path as check_onnx_path
    from vision_tl.features.store import check_output_path

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(FeatureStoreError, match=r"cannot write in .*Permission denied.*--out"):
        check_output_path(tmp_path / "x.npz", overwrite=False)
    with pytest.raises(ExportError, match=rf"--out {tmp_path}/m\.onnx: cannot write in .*Permission denied"):
        check_onnx_path(tmp_path / "m.onnx", overwrite=False)
    with pytest.raises(DeployError, match=rf"--out {tmp_path}/p\.csv: cannot write in .*Permission denied"):
        _check_output(tmp_path / "p.csv", overwrite=False)


def test_extract_lists_a_class_whose_every_image_is_unreadable_and_skips_it_when_asked(tmp_path, folder) -> None:
    for path in (folder / "spot").iterdir():
        path.write_bytes(b"\x89PNG not really")
    (folder / "notes.json").symlink_to(tmp_path / "gone.json")  # a dangling file link: not a class, ignored
    with pytest.raises(DatasetError, match="(?s)5 unreadable image.*spot_0.png"):
        extract(folder, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    with pytest.warns(UserWarning, match="left out 5 unreadable"):
        fs = extract(folder, TINY, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c", progress=False,
                     skip_bad=True)
    assert len(fs.paths) == 10


def test_parquet_gives_back_a_file_name_that_is_not_utf8_as_npz_does(tmp_path, folder) -> None:
    import os

    odd = folder / "good" / os.fsdecode(b"bad\xffname.png")  # another system's encoding
    _write_image(odd, seed=99, tint=1)
    kwargs = {"pretrained": False, "image_size": SIZE, "cache_dir": tmp_path / "c", "progress": False}
    paths = {}
    for suffix in (".npz", ".parquet"):
        extract(folder, TINY, tmp_path / f"f{suffix}", **kwargs)
        paths[suffix] = read_features(tmp_path / f"f{suffix}").paths
    assert paths[".npz"] == paths[".parquet"]
    assert (folder / next(p for p in paths[".parquet"] if "name.png" in p)).is_file()  # it opens the file


def test_the_logistic_heads_count_a_rare_class_as_much_as_a_common_one() -> None:
    rng = np.random.default_rng(0)  # 200 good, 10 defects, overlapping: an unweighted head scores 0.85
    x = np.concatenate([rng.normal(0, 1, (200, 8)), rng.normal(1.2, 1, (10, 8))]).astype(np.float32)
    y = np.array([0] * 200 + [1] * 10)
    assert cross_validate(x, y, "logreg", folds=5).balanced > 0.9


@pytest.mark.parametrize("unlabelled", [False, True])
def test_extract_says_which_files_of_a_flat_folder_it_ignores(tmp_path, unlabelled) -> None:
    """A flat folder (or --unlabelled) dropped README.txt and the like without a word, where fit,
    predict and predict-onnx count them."""
    for seed in range(2):
        Image.fromarray(np.full((8, 8, 3), seed * 50, np.uint8)).save(tmp_path / f"{seed}.png")
    (tmp_path / "README.txt").write_text("line 3, camera 2")
    with pytest.warns(UserWarning, match=r"ignoring 1 non-image file\(s\) under .*README\.txt"):
        images = scan_images(tmp_path, unlabelled=unlabelled)
    assert [p.name for p in images.paths] == ["0.png", "1.png"]


def test_the_feature_cache_keys_on_the_version_of_the_decoded_pixels(tiny_net) -> None:
    from vision_tl.imaging import PIXELS_VERSION

    extractor = FeatureExtractor(tiny_net, TINY, resolve_preprocessing(TINY, SIZE))
    assert extractor.identity()["pixels"] == PIXELS_VERSION


def test_extract_leaves_the_multiprocessing_start_method_free(folder, tmp_path) -> None:
    """tqdm's first bar fixed the start method ('fork'): a notebook's later
    set_start_method('spawn') failed with 'context has already been set'."""
    import subprocess
    import sys

    script = (f"import multiprocessing as mp\nfrom vision_tl.features import extract\n"
              f"extract({str(folder)!r}, {TINY!r}, pretrained=False, image_size={SIZE}, progress=False, "
              f"cache_dir={str(tmp_path / 'c')!r})\n"
              "print(mp.get_start_method(allow_none=True))\nmp.set_start_method('spawn')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None"]


def test_an_empty_class_folder_in_val_is_read_as_fit_reads_it(tmp_path) -> None:
    """val/ with an empty class folder (a rare defect with no held-out image yet): fit trains on such
    a root, so extract and probe read it too, rather than stopping at the empty folder; an empty
    class folder of train/ (or of a root without splits) is still refused."""
    root = tmp_path / "held_out"
    for split in ("train", "val"):
        for k, name in enumerate(("crack", "good")):
            for i in range(2):
                _write_image(root / split / name / f"{name}_{i}.png", seed=10 * k + i + len(split), tint=k)
    (root / "val" / "rare").mkdir()
    (root / "train" / "rare").mkdir()
    _write_image(root / "train" / "rare" / "rare_0.png", seed=99, tint=2)
    (root / "test" / "good").mkdir(parents=True)
    images = scan_images(root)
    assert images.classes == ["crack", "good", "rare"] and len(images.paths) == 9
    (root / "train" / "rare" / "rare_0.png").unlink()
    with pytest.raises(DatasetError, match=r"train/rare has no images"):
        scan_images(root)


def test_probe_with_skip_bad_names_a_class_left_without_images(tmp_path) -> None:
    """--skip-bad leaving one class only (the other's every image unreadable): a message naming the
    empty class, before any image is embedded, not scikit-learn's 'needs samples of at least 2 classes'."""
    root = tmp_path / "one_left"
    for i in range(3):
        _write_image(root / "good" / f"good_{i}.png", seed=i, tint=0)
        (root / "crack" / f"crack_{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / "crack" / f"crack_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.warns(UserWarning, match="unreadable"), \
            pytest.raises(ValueError, match=r"at least two classes, found images of good only; no readable images in: crack"):
        probe(root, TINY, folds=2, skip_bad=True, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c",
              progress=False)
    assert not (tmp_path / "c").exists()  # refused before the backbone ran
    with pytest.raises(ValueError, match="at least two classes"):
        cross_validate(np.zeros((4, 3), np.float32), np.zeros(4, np.int64), folds=2)


def test_probe_says_which_class_it_scores_without(tmp_path) -> None:
    """--skip-bad leaving a class without a readable image but two others: the probe scored the two
    without a word beyond the generic 'left out N unreadable image(s)', so its balanced accuracy
    silently covered fewer classes than the folder has."""
    root = tmp_path / "two_left"
    for i in range(3):
        _write_image(root / "good" / f"good_{i}.png", seed=i, tint=0)
        _write_image(root / "dent" / f"dent_{i}.png", seed=10 + i, tint=1)
        (root / "crack" / f"crack_{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / "crack" / f"crack_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.warns(UserWarning, match=r"no readable image in class 'crack': the probe scores the other 2 classes"):
        probe(root, TINY, folds=2, skip_bad=True, pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c",
              progress=False)


def test_the_output_names_its_image_folder_absolute(tmp_path, folder, monkeypatch) -> None:
    """The rows' paths are relative to the recorded root; a root stored as typed ('images') could
    not be found again from another working directory."""
    monkeypatch.chdir(folder.parent)
    extract(folder.name, TINY, tmp_path / "f.npz", pretrained=False, image_size=SIZE, cache_dir=tmp_path / "c",
            progress=False)
    monkeypatch.chdir(tmp_path)
    root = Path(read_features(tmp_path / "f.npz").metadata["root"])
    assert root.is_absolute() and (root / "crack" / "crack_0.png").is_file()
