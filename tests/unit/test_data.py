"""Image-folder scanning, seeded stratified splits and the bad-input messages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tl.data import (
    DatasetError,
    ImageFolderDataModule,
    build_augmentation,
    scan_folder,
    stratified_split,
)

TINY = "test_efficientnet"


def _folder(root, counts: dict[str, int], size: int = 16):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(root / name / f"{i}.png")
    return root


def _dm(root, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), backbone=TINY, image_size=32, num_workers=0, **kwargs)


@pytest.mark.parametrize("bad", ["0.2", 2, 0, True, None])
def test_val_fraction_is_checked_when_the_data_module_is_built(tmp_path, bad):
    """A string gave a bare '<' TypeError at set-up, and 2 was only refused there, after the model
    was built; the data module now names the setting at once."""
    root = _folder(tmp_path / "d", {"ok": 4, "dent": 4})
    with pytest.raises(ValueError, match=r"val_fraction \(--data.val_fraction\) must be a number between 0 and 1"):
        _dm(root, val_fraction=bad)
    assert type(_dm(root, val_fraction=np.float64(0.25)).hparams.val_fraction) is float


def test_split_is_stratified_seeded_and_recorded(tmp_path):
    root = _folder(tmp_path / "d", {"ok": 30, "dent": 10})
    dm = _dm(root, val_fraction=0.2, seed=3)
    dm.setup("fit")
    assert dm.class_counts("val") == [2, 6]  # classes sorted: dent, ok
    again = _dm(root, val_fraction=0.2, seed=3)
    again.setup("fit")
    assert [s.path for s in again.splits["val"]] == [s.path for s in dm.splits["val"]]
    other = _dm(root, val_fraction=0.2, seed=4)
    other.setup("fit")
    assert [s.path for s in other.splits["val"]] != [s.path for s in dm.splits["val"]]
    dm.save_split(tmp_path / "split.json")
    record = json.loads((tmp_path / "split.json").read_text())
    assert len(record["val"]) == 8 and {"path", "label", "sha256"} <= set(record["val"][0])


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not a readable split file"),
    ('["a"]', "a JSON list, expected an object"),
    ('{"classes": []}', 'no "root" string'),
    ('{"root": "/d", "val": [{"path": "a/1.png", "label": "a"}]}', r"val\[0\] is not an object"),
])
def test_a_damaged_split_file_is_named_by_every_reader(tmp_path, content, problem):
    """report, compare and export's parity (and a resume) read split.json through read_split:
    a damaged one stops each with the file's name, not a bare JSON or key error."""
    from vision_tl.data.folder import read_split
    from vision_tl.export.onnx_export import ExportError
    from vision_tl.export.parity import split_images
    from vision_tl.reports.compare import summarise_run
    from vision_tl.reports.report import ReportError
    from vision_tl.reports.report import split_images as report_split

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "split.json").write_text(content)
    (run / "metrics.json").write_text(json.dumps({"classes": ["a"], "val": {"accuracy": 1.0}}))
    with pytest.raises(DatasetError, match=problem) as info:
        read_split(run / "split.json")
    assert str(run / "split.json") in str(info.value)
    with pytest.raises(ExportError, match=problem):
        split_images(run / "checkpoints" / "best.ckpt", "val", ["a"])
    with pytest.raises(ReportError, match=problem):
        report_split(run, ["a"], data_root=tmp_path)
    with pytest.raises(ReportError, match=problem):
        summarise_run(run)


def test_byte_identical_files_stay_on_one_side(tmp_path):
    root = _folder(tmp_path / "d", {"a": 20, "b": 20})
    for i in range(1, 6):
        shutil.copy(root / "a" / "0.png", root / "a" / f"dup{i}.png")
    for seed in range(5):
        index = scan_folder(root)
        train, val = stratified_split(index, 0.3, seed)
        sides = {("val" if i in val else "train") for i, s in enumerate(index.samples)
                 if s.sha256 == index.samples[0].sha256}
        assert len(sides) == 1


def test_copies_in_different_classes_stay_on_one_side_and_are_flagged(tmp_path):
    root = _folder(tmp_path / "d", {"a": 20, "b": 20})
    for i in range(5):  # the same image filed under both classes: a labelling error
        shutil.copy(root / "a" / f"{i}.png", root / "b" / f"copy{i}.png")
    for seed in range(10):
        index = scan_folder(root)
        with pytest.warns(UserWarning, match=r"5 image\(s\) are filed under more than one class.*a/0.png == b/copy0.png"):
            train, val = stratified_split(index, 0.3, seed)
        for i in range(5):
            sha = (root / "a" / f"{i}.png").read_bytes()
            sides = {j in val for j, s in enumerate(index.samples) if s.path.read_bytes() == sha}
            assert len(sides) == 1, (seed, i)


def test_a_class_made_only_of_other_classes_copies_is_told_where_its_images_went(tmp_path):
    root = _folder(tmp_path / "d", {"ok": 12, "scratch": 8})
    (root / "zrare").mkdir()
    for i in range(2):  # its only images: copies of two 'ok' images (a labelling error)
        (root / "zrare" / f"c{i}.png").write_bytes((root / "ok" / f"{i}.png").read_bytes())
    outcomes = set()
    for seed in (0, 4, 12):  # seeds that send the copies to train, to both sides, to val
        index = scan_folder(root)
        try:
            with pytest.warns(UserWarning) as warned:
                _, val = stratified_split(index, 0.25, seed)
        except DatasetError as error:  # both copies went to val with their 'ok' twins
            assert "class 'zrare': 2 of its 2 distinct images are byte-identical" in str(error)
            assert "ended up in val" in str(error) and "a class needs images in train" in str(error)
            outcomes.add("val")
            continue
        zrare = index.classes.index("zrare")
        in_val = [index.samples[i].label == zrare for i in val]
        messages = " ".join(str(w.message) for w in warned)
        if not any(in_val):
            assert "every image of 'zrare' ended up in train" in messages and "not measured" in messages
            outcomes.add("train")
        else:
            outcomes.add("both")
    assert outcomes == {"train", "both", "val"}


def test_train_val_folders_and_cross_duplicates_warn(tmp_path):
    _folder(tmp_path / "d" / "train", {"a": 4, "b": 4})
    _folder(tmp_path / "d" / "val", {"a": 2, "b": 2})  # same rng seed: val files equal train's first ones
    dm = _dm(tmp_path / "d")
    with pytest.warns(UserWarning, match="byte-identical"):
        dm.setup("fit")
    assert dm.class_counts("train") == [4, 4] and dm.class_counts("val") == [2, 2]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: r.mkdir(), "no class folders"),
        (lambda r: _folder(r, {"only": 3}), "single class"),
        (lambda r: (_folder(r, {"a": 3}), (r / "b").mkdir()), "has no images"),
        (lambda r: None, "does not exist"),
        (lambda r: (r.write_text("x")), "is a file"),
        (lambda r: _folder(r / "val", {"a": 2, "b": 2}), "no train/ folder"),
        (lambda r: (_folder(r / "train", {"a": 3, "b": 3}), _folder(r / "val", {"a": 2, "c": 1})),
         r"val has class folder\(s\) that train/ lacks: 'c'"),
        (lambda r: (_folder(r / "train", {"a": 3, "b": 3}), (r / "val" / "a").mkdir(parents=True)),
         r"val holds no images"),
    ],
)
def test_bad_folders_get_clear_errors(tmp_path, make, message):
    root = tmp_path / "root"
    make(root)
    with pytest.raises(DatasetError, match=message):
        _dm(root).setup("fit")


def test_held_out_splits_may_lack_a_rare_class(tmp_path):
    """A defect with two images may have none to spare for val/ or test/: the split works,
    says which class it cannot measure, and balanced scores leave that class out."""
    root = tmp_path / "d"
    _folder(root / "train", {"ok": 4, "pit": 2, "scratch": 3})
    _folder(root / "val", {"ok": 2, "scratch": 1}, size=17)  # no val/pit at all
    _folder(root / "test", {"ok": 2, "scratch": 1}, size=18)
    (root / "test" / "pit").mkdir()  # an empty one
    dm = _dm(root)
    with pytest.warns(UserWarning, match=r"val/ has no images of 'pit'") as caught:
        dm.setup("fit")
    assert any("test/ has no images of 'pit'" in str(w.message) for w in caught)
    assert dm.class_counts("val") == [2, 0, 1] and dm.class_counts("test") == [2, 0, 1]


def test_class_names_match_whatever_their_accent_encoding(tmp_path):
    """macOS writes accents decomposed (NFD); a val/ folder or a --data.good_class typed
    elsewhere arrives composed (NFC). They name the same class."""
    root = tmp_path / "d"
    nfd, nfc = "e\u0301te\u0301", "\u00e9t\u00e9"
    _folder(root / "train", {nfd: 3, "ok": 3})
    _folder(root / "val", {nfc: 1, "ok": 1}, size=17)
    dm = _dm(root, good_class="ok")
    dm.setup("fit")
    assert dm.classes == [nfd, "ok"] and dm.class_counts("val") == [1, 1]
    assert _dm(root, good_class=nfc).hparams.good_class == nfd
    twins = tmp_path / "twins"
    _folder(twins, {nfd: 2, nfc: 2})
    with pytest.raises(DatasetError, match="differ only in how their accents are encoded"):
        _dm(twins)


def test_copies_across_train_val_test_are_warned_with_their_labels(tmp_path):
    root = tmp_path / "d"
    _folder(root / "train", {"dent": 3, "ok": 3})
    _folder(root / "val", {"dent": 2, "ok": 2}, size=17)
    _folder(root / "test", {"dent": 2, "ok": 2}, size=18)
    shutil.copy(root / "train" / "dent" / "0.png", root / "test" / "ok" / "copy.png")
    with pytest.warns(UserWarning, match=r"in both train/ and test/ inflate the test scores.*1 of them are filed "
                                          r"under another class there.*\(dent\) == .*copy\.png \(ok\)"):
        _dm(root).setup("test")
    # without val/ (validation carved out of train/), the same copy is named all the same
    shutil.rmtree(root / "val")
    with pytest.warns(UserWarning, match=r"in both train/ and test/ inflate the test scores.*copy\.png \(ok\)"):
        _dm(root).setup("test")


def test_images_outside_the_class_folders_are_named(tmp_path):
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    shutil.copy(root / "a" / "0.png", root / "stray.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) directly in .* are in no class folder.*stray\.png"):
        index = scan_folder(root)
    assert len(index.samples) == 6


def test_corrupt_files_are_named_or_skipped(tmp_path):
    root = _folder(tmp_path / "d", {"a": 6, "b": 6})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "b" / "notes.txt").write_text("operator notes")
    (root / "b" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(DatasetError, match="broken.png") as info:
        _dm(root).setup("fit")
    assert "empty.jpg" in str(info.value) and "skip_bad_images" in str(info.value)
    dm = _dm(root, skip_bad_images=True)
    with pytest.warns(UserWarning, match="notes.txt"):
        dm.setup("fit")
    assert sum(dm.class_counts("train")) + sum(dm.class_counts("val")) == 12


def test_loader_gives_backbone_sized_normalised_tensors(tmp_path):
    root = _folder(tmp_path / "d", {"a": 6, "b": 6}, size=20)
    dm = _dm(root, batch_size=4)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() < 0 < x.max()  # normalised with the backbone's mean/std


def test_balanced_sampler_draws_classes_equally(tmp_path):
    root = _folder(tmp_path / "d", {"ok": 40, "rare": 6}, size=8)
    dm = _dm(root, batch_size=1000, sampler="balanced", augment="none")
    dm.setup("fit")
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    share = (labels == 1).float().mean().item()
    assert 0.35 < share < 0.65  # about half "rare" although it is 13 % of the files
    # ... so the loss does not weight "rare" up a second time (sqrt weights would make it ~2.6x)
    from types import SimpleNamespace

    from vision_tl.tasks import ImageClassifier

    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, class_weights="sqrt")
    model._trainer = SimpleNamespace(datamodule=dm, strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                     is_global_zero=True, progress_bar_callback=None)
    for stage in ("fit", "validate"):  # validate logs the val/loss that fit logged
        model.setup(stage)
        assert torch.equal(model.loss_weights, torch.ones(2))
    shuffled = _dm(root, batch_size=1000, sampler="none", augment="none")
    shuffled.setup("fit")
    model._trainer.datamodule = shuffled
    for stage in ("fit", "validate"):  # no balanced draw: the class weights, in both
        model.setup(stage)
        assert model.loss_weights[1] > 2 * model.loss_weights[0]


def test_augment_presets_and_yaml_lists():
    assert len(build_augmentation("inspection").transforms) >= 6
    custom = build_augmentation([{"name": "HorizontalFlip", "p": 1.0}])
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert (custom(image=img)["image"] == img[:, ::-1]).all()
    with pytest.raises(ValueError, match="expected one of: none, light, inspection"):
        build_augmentation("heavy")
    with pytest.raises(ValueError, match="unknown albumentations transform 'Flop'"):
        build_augmentation([{"name": "Flop"}])
    with pytest.raises(ValueError, match=r"item 'HorizontalFlip' is not a transform.*\{name: HorizontalFlip, p: 0.5\}"):
        build_augmentation(["HorizontalFlip"])
    # albumentations only warns about a misspelled argument and trains with the default: refused
    with pytest.raises(ValueError, match="'brightnes_limit' are not valid for transform RandomBrightnessContrast"):
        build_augmentation([{"name": "RandomBrightnessContrast", "brightnes_limit": 0.2, "p": 0.8}])


def test_bad_options_are_rejected(tmp_path):
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    with pytest.raises(ValueError, match="sampler"):
        _dm(root, sampler="oversample")
    with pytest.raises(ValueError, match="good_class 'ok'"):
        _dm(root, good_class="ok")
    # refused up front, not only when a CPU-pipeline loader is built (frozen mode never builds one)
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'"):
        _dm(root, augment="heavy")
    # 90-degree turns of a non-square input would give batches of mixed shapes
    with pytest.raises(ValueError, match="non-square input size 32x48"):
        ImageFolderDataModule(str(root), backbone=TINY, image_size=(32, 48), augment="inspection")
    wide = ImageFolderDataModule(str(root), backbone=TINY, image_size=(32, 48), augment="light", num_workers=0)
    wide.setup("fit")
    assert next(iter(wide.train_dataloader()))[0].shape[-2:] == (32, 48)


def test_a_second_scan_reads_each_unchanged_image_once_and_a_changed_one_again(tmp_path, monkeypatch):
    """A resumed fit scans its data twice (the check against split.json, then training); the
    second scan hashes and checks only what changed."""
    from vision_tl.data import folder

    root = _folder(tmp_path / "d", {"good": 3, "dent": 2})
    # files written just now would count as "racily" changed (see folder._RACY_NS) and be hashed
    # again until 2 s have passed; this disk keeps nanoseconds, so only a change after the hash is
    monkeypatch.setattr(folder, "_RACY_NS", 0)
    hashed = []
    real = folder.file_sha256
    monkeypatch.setattr(folder, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    first = scan_folder(root)
    assert len(hashed) == 5
    again = scan_folder(root)
    assert len(hashed) == 5 and [s.sha256 for s in again.samples] == [s.sha256 for s in first.samples]
    changed = root / "dent" / "1.png"
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(changed)  # other pixels, other size
    third = scan_folder(root)
    assert hashed[5:] == ["1.png"] and len(third.samples) == 5
    assert {str(s.path): s.sha256 for s in third.samples}[str(changed)] == real(changed)
    changed.write_bytes(b"not an image")  # and a file that went bad is reported, not reused
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        assert scan_folder(root, skip_bad=True).bad_files[0][0] == changed


def test_scan_lists_truncated_jpegs_up_front_and_keeps_ones_with_a_trailer(tmp_path):
    """A JPEG cut off in transfer passes Pillow's header check and used to stop training only
    when it was decoded, one file per attempt; the scan now lists every one. A valid JPEG with
    data after its end marker (camera trailers) is still accepted."""
    import io

    root = _folder(tmp_path / "d", {"ok": 3, "dent": 3})
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    (root / "ok" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dent" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "dent" / "trailer.jpg").write_bytes(jpeg + bytes(10_000))
    with pytest.raises(DatasetError, match=r"2 unreadable image\(s\)") as info:
        scan_folder(root)
    assert str(root / "ok" / "cut.jpg") in str(info.value) and str(root / "dent" / "cut.jpg") in str(info.value)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        index = scan_folder(root, skip_bad=True)
    assert root / "dent" / "trailer.jpg" in [s.path for s in index.samples]


def test_scan_lists_every_cut_off_tiff_bmp_and_ppm_up_front(tmp_path):
    """Pillow's verify reads only these formats' headers: a file cut off in transfer stopped
    training once decoded, naming one file per attempt; the scan now decodes them and lists all."""
    import io

    from vision_tl.data import folder

    root = _folder(tmp_path / "d", {"ok": 3, "dent": 3})
    pixels = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8))
    kinds = (("TIFF", "tif", {}), ("TIFF", "lzw.tif", {"compression": "tiff_lzw"}), ("BMP", "bmp", {}),
             ("PPM", "ppm", {}), ("WEBP", "webp", {"lossless": True}))
    for kind, suffix, options in kinds:
        buf = io.BytesIO()
        pixels.save(buf, kind, **options)
        whole = buf.getvalue()
        (root / "ok" / f"whole.{suffix}").write_bytes(whole)
        (root / "dent" / f"cut.{suffix}").write_bytes(whole[: len(whole) * 6 // 10])
    with pytest.raises(DatasetError, match=r"5 unreadable image\(s\)") as info:
        scan_folder(root)
    assert all(str(root / "dent" / f"cut.{s}") in str(info.value) for _, s, _ in kinds)
    kept = {s.path.name for s in scan_folder(root, skip_bad=True).samples}
    assert {f"whole.{s}" for _, s, _ in kinds} <= kept
    # a whole WebP or compressed TIFF is checked without decoding it (that took 60-100 ms per camera image)
    decoded = []
    real = folder.load_rgb
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(folder, "load_rgb", lambda path: decoded.append(path.name) or real(path))
        folder._SCANNED.clear()
        scan_folder(root, skip_bad=True)
    assert not {"whole.webp", "whole.lzw.tif", "whole.tif", "whole.bmp"} & set(decoded)


def test_a_large_group_of_copies_does_not_flood_val(tmp_path):
    """Copies stay on one side; a group that would overshoot val's share goes to train, so a
    class with 10 copies of one image still gets its 20 % (4 of 20), not 12 of 20."""
    root = _folder(tmp_path / "d", {"a": 10, "b": 10})
    for i in range(10):
        shutil.copy(root / "b" / "0.png", root / "b" / f"copy{i}.png")
    index = scan_folder(root)
    for seed in range(8):
        train, val = stratified_split(index, 0.2, seed)
        b_val = [i for i in val if index.samples[i].label == 1]
        assert len(b_val) == 4, seed
    # every group too large for the share (two images, five copies each): val still gets one
    two = _folder(tmp_path / "two", {"a": 10, "b": 2})
    for i in range(4):
        for k in range(2):
            shutil.copy(two / "b" / f"{k}.png", two / "b" / f"copy{k}_{i}.png")
    index = scan_folder(two)
    train, val = stratified_split(index, 0.2, 0)
    assert sorted(index.samples[i].label for i in val).count(1) == 5
    assert sorted(index.samples[i].label for i in train).count(1) == 5


def test_small_training_sets_use_every_image_each_epoch(tmp_path):
    """62 images at batch size 32 trained on 32 per epoch while partial batches were dropped."""
    root = _folder(tmp_path / "d", {"a": 40, "b": 38}, size=8)
    dm = _dm(root, batch_size=32, augment="none", val_fraction=0.2)
    dm.setup("fit")
    assert sum(len(y) for _, y in dm.train_dataloader()) == len(dm.splits["train"]) == 62
    assert dm._drop_last(65) and not dm._drop_last(66)  # a last batch of 1: BatchNorm cannot train on it
    assert dm._drop_last(16 * 32 + 5)  # large sets: one batch shape (GPU kernels, torch.compile)


def test_good_class_typed_with_other_accents_reaches_the_model_as_the_folder_spells_it(tmp_path):
    """The CLI gives the model the typed good_class and the data module the folder's spelling;
    they name one class and must not be reported as two that differ."""
    from vision_tl.tasks.classifier import ImageClassifier

    nfc, nfd = "bon_\u00e9", "bon_e\u0301"
    root = _folder(tmp_path / "d", {nfd: 3, "rayure": 3})
    dm = _dm(root, good_class=nfc)
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, good_class=nfc)
    model._check_datamodule(dm)
    assert model.hparams.good_class == nfd == dm.hparams.good_class


def test_a_split_file_with_no_val_images_is_refused(tmp_path):
    """validate/test on such a file would score nothing and exit 0 with no result."""
    from vision_tl.data.folder import recorded_parts

    _folder(tmp_path / "d", {"good": 4, "bad": 4})
    index = scan_folder(tmp_path / "d")
    record = {"root": str(tmp_path / "d"), "classes": index.classes, "val": [],
              "train": [{"path": str(s.path.relative_to(index.root)), "label": index.classes[s.label],
                         "sha256": s.sha256} for s in index.samples]}
    with pytest.raises(DatasetError, match="split.json lists no val images: there is nothing to evaluate"):
        recorded_parts(index, record, tmp_path / "split.json")


def test_a_split_file_from_before_a_class_folder_was_added_is_refused(tmp_path):
    """Reused, it trained a class it listed no image of (0 training images, an output never fitted)."""
    root = _folder(tmp_path / "d", {"good": 4, "bad": 4})
    dm = _dm(root, val_fraction=0.25)
    dm.setup("fit")
    assert dm.save_split(tmp_path / "split.json")
    _folder(root, {"zzz": 3})
    with pytest.raises(DatasetError, match=r"records the classes \['bad', 'good'\].*added since: 'zzz'"):
        _dm(root, split_file=str(tmp_path / "split.json")).setup("fit")


def test_split_folders_beside_odd_folders_and_numpy_counts(tmp_path, monkeypatch):
    """A folder beside train/ is left out (warned), whatever its name's encoding; a disk's
    lost+found no user can read does not stop a scan; numpy integers are counts too."""
    import errno
    import os

    import numpy as np

    from vision_tl.data import ImageFolderDataModule
    from vision_tl.data.synthetic import make_inspection_dataset
    from vision_tl.imaging import image_files

    for part in ("train", "val"):
        make_inspection_dataset(tmp_path / part, 3, size=32, seed=0, overwrite=True)
    os.mkdir(os.fsencode(str(tmp_path)) + b"/old_backup_\xe9t\xe9")
    (tmp_path / "lost+found").mkdir()
    real_scandir = os.scandir

    def guarded(path="."):  # root can read anything: the permission error is simulated
        if str(path).endswith("lost+found"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    with pytest.warns(UserWarning, match="left out"):
        dm = ImageFolderDataModule(tmp_path, backbone="test_efficientnet", image_size=32,
                                   batch_size=np.int64(4), num_workers=np.int64(0))
    assert set(dm.layout) == {"train", "val"} and dm.hparams.batch_size == 4 and type(dm.num_workers) is int
    assert len(image_files(tmp_path)[0]) == 2 * 4 * 3  # every image; lost+found skipped


def test_skipped_unreadable_images_of_a_split_folder_are_reported_by_predict_and_report(tmp_path):
    """With skip_bad_images, `predict` of the run's test/ split gives an unreadable image its
    error row (as for --data.predict_root), and `report --split test` leaves it out with a note
    instead of refusing the run's own data."""
    import yaml

    from vision_tl.data import ImageFolderDataModule
    from vision_tl.data.synthetic import make_inspection_dataset
    from vision_tl.reports.report import split_images

    for part in ("train", "val", "test"):
        make_inspection_dataset(tmp_path / "data" / part, 3, size=32, seed=0, overwrite=True)
    bad = tmp_path / "data" / "test" / "good" / "cut.png"
    bad.write_bytes((tmp_path / "data" / "test" / "good" / "good_0000.png").read_bytes()[:100])
    dm = ImageFolderDataModule(tmp_path / "data", backbone="test_efficientnet", image_size=32, num_workers=0,
                               skip_bad_images=True)
    with pytest.warns(UserWarning, match="unreadable"):
        dm.setup("predict")
    dm.predict_dataloader()
    assert [path for path, _ in dm.predict_bad] == [bad] and bad not in [s.path for s in dm.predict_samples]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "data"),
                                                             "skip_bad_images": True}}))
    with pytest.warns(UserWarning, match="unreadable"):
        paths, labels, notes = split_images(run, dm.classes, "test", tmp_path / "data")
    assert bad not in paths and len(paths) == 12 and any("1 unreadable image(s) of test/ left out" in n for n in notes)


def test_an_augmentation_list_that_changes_the_image_size_is_refused_up_front(tmp_path):
    from vision_tl.data import ImageFolderDataModule
    from vision_tl.data.synthetic import make_inspection_dataset

    make_inspection_dataset(tmp_path, 2, size=32, seed=0, overwrite=True)
    for augment, got in (([{"name": "RandomResizedCrop", "size": [64, 64], "p": 1.0}], "64x64"),
                         ([{"name": "RandomCrop", "height": 24, "width": 24, "p": 0.5}], "24x24")):
        with pytest.raises(ValueError, match=f"turned a 32x32 image into {got}; it must keep the model's input size"):
            ImageFolderDataModule(tmp_path, backbone="test_efficientnet", image_size=32, augment=augment)
    ImageFolderDataModule(tmp_path, backbone="test_efficientnet", image_size=32,
                          augment=[{"name": "RandomCrop", "height": 32, "width": 32, "p": 1.0}])
    # the kit normalises after augmenting: a list that normalises (or scales to float) itself
    # trained on near-constant inputs that validation and the export never see
    for step, kind in (({"name": "Normalize"}, "float32 32x32x3"), ({"name": "ToFloat"}, "float32 32x32x3"),
                       ({"name": "ToTensorV2"}, "Tensor")):
        with pytest.raises(ValueError, match=rf"turned uint8 RGB pixels into {kind}; it must keep them uint8"):
            ImageFolderDataModule(tmp_path, backbone="test_efficientnet", image_size=32,
                                  augment=[{"name": "HorizontalFlip", "p": 0.5}, step])


def test_extract_and_fit_read_a_split_layout_alike_and_say_what_they_leave_out(tmp_path):
    import os

    from vision_tl.data.folder import detect_layout
    from vision_tl.data.synthetic import make_inspection_dataset
    from vision_tl.features import scan_images

    root = tmp_path / "split"
    for part in ("train", "val"):
        make_inspection_dataset(root / part, 2, size=32, seed=0, overwrite=True)
    os.mkdir(os.fsencode(str(root)) + b"/junk\xff")  # never a class here: extract must not refuse it
    (root / "stray.png").write_bytes((root / "train" / "good" / "good_0000.png").read_bytes())
    with pytest.warns(UserWarning) as caught:
        images = scan_images(root)
    shown = " ".join(str(w.message) for w in caught)
    assert "junk\\xff/ beside train/" in shown and "1 image(s) beside train/ (e.g. stray.png)" in shown
    assert len(images.paths) == 16
    (root / "Train").mkdir()  # beside a real train/ (a case-sensitive disk): another folder, refused
    with pytest.raises(DatasetError, match="rename Train/ to train/"):
        detect_layout(root)
    classes = tmp_path / "classes"
    for name in ("cat", "dog", "test"):
        (classes / name).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"a class folder named test/ is read as a split folder: rename it"):
        detect_layout(classes)


@pytest.mark.parametrize("chosen", [None, 3])
def test_loader_processes_fit_the_shared_memory_there_is(tmp_path, monkeypatch, chosen):
    """A Docker container's /dev/shm holds 64 MB unless told otherwise; loader processes that fill it
    die of a bus error mid-epoch. The default count shrinks to what fits, a chosen one is kept, and
    both say why and what to do."""
    from vision_tl.data import device

    root = _folder(tmp_path / "d", {"ok": 8, "dent": 8})
    dm = ImageFolderDataModule(str(root), backbone=TINY, image_size=32, batch_size=4, pipeline="cpu",
                               num_workers=chosen)
    dm.num_workers = 3  # the machine's default share, as on a 4-core machine
    dm.setup("fit")
    batch_bytes = 4 * 32 * 32 * 3 * 4  # float32 batches from the CPU pipeline
    monkeypatch.setattr(device, "shared_memory_free", lambda: 2 * 2 * batch_bytes)  # half of it: one process
    with pytest.warns(UserWarning, match=r"/dev/shm has 0 MB free, room for 1 of 3 .*--shm-size") as caught:
        loader = dm.train_dataloader()
    assert loader.num_workers == (3 if chosen else 1)
    assert ("kept as set" in str(caught[0].message)) == bool(chosen)
    monkeypatch.setattr(device, "shared_memory_free", lambda: None)  # nothing to measure (macOS, Windows)
    assert dm.train_dataloader().num_workers == 3


def test_a_class_folder_that_is_a_broken_link_is_named_not_left_out(tmp_path):
    from vision_tl.data.folder import DatasetError, scan_folder

    for name in ("good", "scratch"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    (tmp_path / "crack").symlink_to(tmp_path / "share_not_mounted")
    with pytest.raises(DatasetError, match="crack is a symbolic link to .*share_not_mounted, which does not exist"):
        scan_folder(tmp_path)
    (tmp_path / "crack").unlink()
    (tmp_path / "dent.v2").symlink_to(tmp_path / "moved")  # a dot in a folder's name: still a folder
    with pytest.raises(DatasetError, match=r"dent\.v2 is a symbolic link to .*moved, which does not exist"):
        scan_folder(tmp_path)


def test_skipping_every_image_of_a_class_is_an_error_not_a_class_without_training_images(tmp_path):
    from vision_tl.data.folder import DatasetError, scan_folder

    for name in ("good", "crack"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    (tmp_path / "crack" / "a.png").write_text("version https://git-lfs.github.com/spec/v1\n")  # a pointer
    with pytest.raises(DatasetError, match=r"crack hold no readable image: all were unreadable and skipped"):
        scan_folder(tmp_path, skip_bad=True)


def test_a_negative_seed_is_named_as_the_data_seed(tmp_path):
    with pytest.raises(ValueError, match=r"seed \(--data.seed\) must be a whole number from 0"):
        ImageFolderDataModule(str(tmp_path), seed=-1)


def test_fit_warns_when_val_holds_one_or_two_images_of_a_class(tmp_path):
    import warnings

    root = _folder(tmp_path / "d", {"ok": 20, "pitted": 5, "scratch": 20})
    with pytest.warns(UserWarning, match=r"val holds only 1 of 'pitted' \(image count\).*best epoch"):
        _dm(root).setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dm(root).setup("validate")  # said when training, not on every evaluation
        _dm(_folder(tmp_path / "e", {"ok": 20, "pitted": 20})).setup("fit")  # 4 each: nothing to say


def test_the_summary_names_each_class_with_its_counts_and_images_in_sub_folders(tmp_path):
    root = _folder(tmp_path / "d", {"ok": 10, "scratch": 5, "_archive": 3})
    nested = root / "ok" / "old"
    nested.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(nested / f"n{i}.png")
    dm = _dm(root)
    dm.setup("fit")
    lines = dm.summary().splitlines()
    train, val = (dm.class_counts(s) for s in ("train", "val"))
    assert lines[0] == (f"3 classes (train/val images): _archive {train[0]}/{val[0]}, ok {train[1]}/{val[1]}, "
                        f"scratch {train[2]}/{val[2]}")
    assert train[1] + val[1] == 12  # the sub-folder's images are 'ok' images
    assert lines[1] == "images in sub-folders count as their class folder's class: ok/old/ (2)"
    flat = _dm(_folder(tmp_path / "e", {"ok": 4, "scratch": 4}))
    flat.setup("fit")
    assert len(flat.summary().splitlines()) == 1


def test_sampler_auto_balances_a_folder_whose_largest_class_has_4x_the_smallest(tmp_path):
    skewed = _dm(_folder(tmp_path / "d", {"ok": 40, "dent": 8}))
    skewed.setup("fit")  # train: 32 ok, 6 dent (over 4x)
    assert skewed.hparams.sampler == "auto" and skewed.sampler_choice() == "balanced"
    assert "the balanced sampler draws every class equally often" in skewed.summary()
    drawn = [skewed.splits["train"][i].label for i in skewed.train_dataloader().sampler]
    assert 0.3 < np.mean(np.array(drawn) == skewed.classes.index("dent")) < 0.7  # about half, not 6 of 38
    mild = _dm(_folder(tmp_path / "e", {"ok": 30, "dent": 10}))  # 3x, like the demo: shuffled as it is
    mild.setup("fit")
    assert mild.sampler_choice() == "none" and "balanced sampler" not in mild.summary()
    chosen = _dm(tmp_path / "d", sampler="none")
    chosen.setup("fit")
    assert chosen.sampler_choice() == "none"


def test_the_summary_of_a_val_split_carved_out_of_train(tmp_path):
    root = tmp_path / "d"
    _folder(root / "train", {"ok": 10, "dent": 5})
    _folder(root / "test", {"ok": 2, "dent": 2})
    dm = _dm(root)
    dm.setup("fit")
    assert dm.summary().startswith("2 classes (train/val images): dent 4/1, ok 8/2")


@pytest.mark.parametrize("word", ["0", "no", "maybe", "off"])
def test_decoded_cache_words_meant_as_switches_are_refused_not_made_folders(tmp_path, word, monkeypatch):
    from vision_tl.data import ImageFolderDataModule

    root = _folder(tmp_path / "d", {"ok": 2, "dent": 2})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"decoded_cache '{word}': give true, false or a folder path"):
        ImageFolderDataModule(root, backbone="test_efficientnet", image_size=32, decoded_cache=word)
    assert not (tmp_path / word).exists()


def test_a_data_module_keeps_its_folder_across_a_change_of_directory_and_saves_its_split_unasked(
        tmp_path, monkeypatch):
    """A relative root was scanned lazily, from whatever directory a notebook was in by then
    ('class folder ds/crack is missing'); save_split before set-up wrote nothing, silently."""
    from vision_tl.data import ImageFolderDataModule

    _folder(tmp_path / "ds", {"ok": 4, "dent": 4})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    dm = ImageFolderDataModule("ds", backbone="test_efficientnet", image_size=32, num_workers=0)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert dm.save_split(tmp_path / "split.json")  # sets itself up
    assert json.loads((tmp_path / "split.json").read_text())["train"]


@pytest.mark.parametrize("shape, dtype", [((20, 30), np.uint8), ((20, 30, 4), np.uint8), ((20, 30, 1), np.uint8),
                                          ((20, 30, 3), np.float32), ((20, 30, 3), np.uint16)])
def test_the_eval_transform_names_an_array_it_cannot_take_and_how_to_read_one(shape, dtype):
    """A notebook user handing in their own pixels (grey, RGBA, float) gets what to pass, not a
    numpy broadcasting error; an RGB uint8 array of any size works."""
    from vision_tl.backbones import resolve_preprocessing
    from vision_tl.data import eval_transform

    transform = eval_transform(resolve_preprocessing(TINY, 32))
    assert transform(np.zeros((20, 30, 3), np.uint8)).shape == (3, 32, 32)
    import re

    with pytest.raises(ValueError, match=rf"H x W x 3 uint8.*{np.dtype(dtype).name}.*{re.escape(str(shape))}.*load_rgb"):
        transform(np.zeros(shape, dtype))


def test_a_preset_extended_with_augment_plus_says_to_give_the_whole_list():
    """`--data.augment+ {...}` over the default preset makes ['inspection', {...}]: the message says
    why, and the preset's transforms it shows build as a list of their own."""
    import json

    with pytest.raises(ValueError, match="'inspection' is a preset, which a list cannot extend") as info:
        build_augmentation(["inspection", {"name": "Transpose", "p": 0.5}])
    shown = json.loads(str(info.value).rsplit("'inspection' is ", 1)[1])
    assert len(build_augmentation([*shown, {"name": "Transpose", "p": 0.5}]).transforms) == 8


@pytest.mark.parametrize("spec", [None, False])
def test_augment_none_says_to_name_the_none_preset(inspection_folder, spec):
    """augment=None, meant as "no augmentation", failed with "'NoneType' object is not iterable"."""
    with pytest.raises(ValueError, match=rf"augment {spec} is neither a preset .*; for no augmentation give 'none'"):
        ImageFolderDataModule(str(inspection_folder), backbone=TINY, augment=spec)


def test_the_data_module_prints_its_folder_classes_and_settings(inspection_folder):
    """It printed as <...ImageFolderDataModule object at 0x...>, which says nothing in a notebook."""
    data = _dm(inspection_folder, batch_size=8, augment="light", good_class="good")
    assert repr(data) == (f"ImageFolderDataModule({str(inspection_folder.absolute())!r}, classes={data.classes}, "
                          f"backbone='{TINY}', input_size=(32, 32), batch_size=8, augment='light', good_class='good')")


def test_folder_scans_and_the_evaluation_transform_do_without_albumentations(tmp_path):
    """Scanning a folder imports neither torch nor albumentations, and the evaluation transform
    (extract, reports, export's checks) works without albumentations, which costs about a second
    to import (benchmarks/startup.py); augmenting still uses it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        import numpy as np
        sys.modules["albumentations"] = None  # unimportable: importing it raises ImportError
        from vision_tl.data import scan_folder
        assert "torch" not in sys.modules, "scanning a folder imported torch"
        from vision_tl.backbones import Preprocessing
        from vision_tl.data import eval_transform
        x = eval_transform(Preprocessing((8, 8), (0.5,) * 3, (0.5,) * 3, "bilinear"))(np.zeros((4, 6, 3), np.uint8))
        assert tuple(x.shape) == (3, 8, 8) and float(x.min()) == -1.0
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
