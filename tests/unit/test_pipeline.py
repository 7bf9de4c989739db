"""Input pipelines: CPU vs on-device augmentation, with and without the decoded-image cache."""

from __future__ import annotations

import io

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vision_tl.data import ImageFolderDataModule, decode_threads
from vision_tl.data import decoded_cache as dc
from vision_tl.tasks import ImageClassifier
from vision_tl.utils.files import file_sha256

TINY = "test_efficientnet"


def _dm(root, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), backbone=TINY, image_size=40, num_workers=0, batch_size=8, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("pipeline, cached", [("cpu", True), ("device", False), ("device", True)])
def test_every_pipeline_gives_identical_validation_batches(inspection_folder, tmp_path, pipeline, cached):
    reference = _dm(inspection_folder, pipeline="cpu")
    other = _dm(inspection_folder, pipeline=pipeline, decoded_cache=str(tmp_path) if cached else False)
    for ref_batch, batch in zip(reference.val_dataloader(), other.val_dataloader(), strict=True):
        x, y = other.on_after_batch_transfer(batch, 0)
        assert torch.equal(y, ref_batch[1])
        assert torch.allclose(x, ref_batch[0], atol=1e-5)


def test_decoded_cache_is_built_once_and_keyed_by_content(tmp_path, capsys):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 12, 3), i * 40, np.uint8)).save(paths[-1])
    cache = tmp_path / "cache"
    shas = [file_sha256(p) for p in paths]
    pixels, bad = dc.decoded_images(paths, shas, (8, 8), "bilinear", cache)
    assert pixels.shape == (3, 8, 8, 3) and bad == [] and int(pixels[2].mean()) == 80
    files = sorted(cache.glob("*.npy"))
    stamp = files[0].stat().st_mtime_ns
    # the size in a unit that shows it (576 bytes, not "0.00 GiB"), as the cache note after it
    assert f"decoded-image cache: wrote {files[0]} (3 images, 576 B)" in capsys.readouterr().out
    dc.decoded_images(paths, shas, (8, 8), "bilinear", cache)
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert f"decoded-image cache: reusing {files[0]}" in capsys.readouterr().out  # and said so
    dc.decoded_images(paths, shas, (16, 16), "bilinear", cache)
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(paths[2])
    with pytest.raises(ValueError, match=r"1 image\(s\) changed since the folder was scanned \(e\.g\. "
                                         r".*2\.png\)"):  # the scan's hash is no longer the file's
        dc.decoded_images(paths, shas, (12, 12), "bilinear", cache)  # (a size not built yet)
    assert len(list(cache.glob("*.npy"))) == 2  # nothing cached under the stale hash
    dc.decoded_images(paths, [*shas[:2], file_sha256(paths[2])], (8, 8), "bilinear", cache)
    assert len(list(cache.glob("*.npy"))) == 3  # new content or new size: new entries


def test_killed_cache_build_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    for p in paths:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    calls = {"n": 0}

    def dying_load(path, out, interpolation):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        out[...] = 0

    monkeypatch.setattr(decode_threads, "load_rgb_into", dying_load)
    with pytest.raises(KeyboardInterrupt):
        dc.decoded_images(paths, list("abcd"), (8, 8), "bilinear", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_bad_images_in_the_cache_are_named_or_skipped(inspection_folder, tmp_path, monkeypatch):
    real_load = decode_threads.load_rgb_into

    def load(path, out, interpolation):  # a file that passed the folder scan but fails to decode
        if path.name == "good_0003.png":  # (e.g. changed on a share)
            raise decode_threads.ImageLoadError(f"{path}: corrupt or truncated image")
        real_load(path, out, interpolation)

    monkeypatch.setattr(decode_threads, "load_rgb_into", load)
    dm = _dm(inspection_folder, decoded_cache=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="(?s)1 image\(s\) could not be decoded:.*good_0003.png"):
        dm.dataset("train"), dm.dataset("val")
    dm = _dm(inspection_folder, decoded_cache=str(tmp_path / "c2"), skip_bad_images=True)
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 4 * 12 - 1
    # reports name each row's image (predictions_test.csv had an empty path column with the cache)
    for split in ("train", "val"):
        ds = dm.dataset(split)
        kept = [s for s in dm.splits[split] if s.path.name != "good_0003.png"]
        assert [s.path for s in ds.samples] == [s.path for s in kept] and len(ds.samples) == len(ds)


def test_device_pipeline_trains_end_to_end_on_cpu(inspection_folder, tmp_path):
    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, num_workers=0,
                               batch_size=8, pipeline="device", decoded_cache=str(tmp_path / "c"))
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, mode="full")
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished and "val" in model.eval_results


def test_pixels_on_device_serve_the_loaders_batches(inspection_folder, tmp_path):
    """With the decoded pixels kept on the device, the loader sends only row numbers (no
    workers), and the batches gathered on the device are the loader's own, image for image."""
    common = {"pipeline": "device", "decoded_cache": str(tmp_path), "augment": "inspection"}
    loader_dm, device_dm = _dm(inspection_folder, **common), _dm(inspection_folder, pixels_on_device=True, **common)
    for split in ("train", "val"):
        loader = getattr(device_dm, f"{split}_dataloader")()
        assert loader.num_workers == 0
        for ref, batch in zip(getattr(loader_dm, f"{split}_dataloader")(), loader, strict=True):
            assert isinstance(batch, dc.PixelRows) and batch.rows.dtype == torch.int64
            pixels = device_dm._pixels_on(batch.source, batch.rows.device).index_select(0, batch.rows)
            assert torch.equal(pixels.permute(0, 3, 1, 2), ref[0]) and torch.equal(batch.labels, ref[1])
            if split == "val":  # normalised (not augmented) exactly as the loader's batch
                x, y = device_dm.on_after_batch_transfer(batch, 0)
                assert torch.equal(x, loader_dm.on_after_batch_transfer(ref, 0)[0]) and torch.equal(y, ref[1])
    device_dm.teardown("fit")
    assert device_dm._device_pixels == {}


def test_pixels_on_device_train_end_to_end(inspection_folder, tmp_path):
    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, num_workers=0, batch_size=8,
                               pipeline="device", decoded_cache=str(tmp_path / "c"), pixels_on_device=True)
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, mode="full")
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished and "val" in model.eval_results
    assert len(model.eval_outputs["val"]["labels"]) == len(dm.splits["val"])


def test_pixels_on_device_that_do_not_fit_fail_with_a_clear_message(inspection_folder, tmp_path, monkeypatch):
    from vision_tl.data import datamodule as dm_module

    def out_of_memory(pixels, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    monkeypatch.setattr(dm_module, "pixels_to", out_of_memory)
    dm = _dm(inspection_folder, pipeline="device", decoded_cache=str(tmp_path), pixels_on_device=True)
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match=r"decoded train images \(.* GiB\) do not fit .*--data.pixels_on_device false"):
        dm.on_after_batch_transfer(batch, 0)


def test_pixels_on_device_auto_stays_off_without_a_gpu(inspection_folder, tmp_path):
    dm = _dm(inspection_folder, pipeline="device", decoded_cache=str(tmp_path))
    assert not isinstance(next(iter(dm.train_dataloader())), dc.PixelRows)


def test_pixels_on_device_asked_for_under_auto_on_a_cpu_says_it_has_no_effect(inspection_folder, tmp_path):
    dm = _dm(inspection_folder, pipeline="auto", decoded_cache=str(tmp_path), pixels_on_device=True)
    with pytest.warns(UserWarning, match="pixels_on_device true has no effect here"):
        batch = next(iter(dm.train_dataloader()))
    assert not isinstance(batch, dc.PixelRows)


@pytest.mark.parametrize("kwargs", [{"pipeline": "cpu", "decoded_cache": True}, {"pipeline": "device"}])
def test_pixels_on_device_needs_the_device_pipeline_and_the_cache(inspection_folder, kwargs):
    with pytest.raises(ValueError, match="pixels_on_device .* needs pipeline 'device' or 'auto'"):
        ImageFolderDataModule(str(inspection_folder), backbone=TINY, pixels_on_device=True, **kwargs)


class _ReadBacks(L.Callback):
    """Counts operations that read a value back to Python (``.item()``, ``bool(t)``, masks):
    on a GPU each makes the CPU wait for every queued kernel, so training steps must have none.
    Watches training batches 1-4 (copy, augmentation, step and Lightning's loop between them).
    The optimizer's step counters are left out: they stay in CPU memory on a GPU too."""

    def __init__(self) -> None:
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        self.calls: list[str] = []
        calls = self.calls

        class Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero"):
                    frames = traceback.extract_stack()[:-1]
                    if not any("/torch/optim/" in f.filename.replace("\\", "/") for f in frames):
                        calls.append(f"{func.__name__} at {frames[-2].filename}:{frames[-2].lineno}")
                return func(*args, **(kwargs or {}))

        self.mode, self.active = Watch(), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1 and trainer.current_epoch == 0:
            self.mode.__enter__()
            self.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.active and batch_idx == 4:
            self.mode.__exit__(None, None, None)
            self.active = False


@pytest.mark.parametrize("pixels_on_device", [False, True])
def test_training_steps_never_read_values_back_from_the_device(inspection_folder, tmp_path, pixels_on_device):
    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, num_workers=0, batch_size=4,
                               pipeline="device", decoded_cache=str(tmp_path / "c"), pixels_on_device=pixels_on_device)
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, mode="partial")
    watch = _ReadBacks()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=50,
                        callbacks=[watch])
    trainer.fit(model, datamodule=dm)
    assert not watch.active and watch.calls == []
    assert model.last_train_loss is not None and torch.isfinite(model.last_train_loss)


def test_train_loss_is_logged_on_logging_steps_only_and_the_log_is_unchanged(inspection_folder, tmp_path,
                                                                            monkeypatch):
    """``self.log`` is skipped on steps whose metrics reach no logger (CPU time a GPU step
    cannot spare): the CSV log has the same rows as when every step logged (checked against
    the earlier code), and the epoch's last step reaches ``callback_metrics``."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, num_workers=0, batch_size=4,
                               val_fraction=0.25, sampler="none")
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                            feature_cache=None)
    calls = []
    real = model.log
    monkeypatch.setattr(model, "log", lambda name, *a, **k: calls.append((name, model.global_step)) or real(name, *a, **k))
    trainer = L.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=4)
    trainer.fit(model, datamodule=dm)
    steps = trainer.num_training_batches  # 9 per epoch
    train_calls = [step for name, step in calls if name == "train/loss"]
    assert train_calls == [3, 7, 8, 11, 15, 17], train_calls  # every 4th step, and the last of each epoch
    with open(f"{trainer.logger.log_dir}/metrics.csv") as fh:
        logged = [int(row["step"]) for row in csv.DictReader(fh) if row.get("train/loss")]
    assert logged == [3, 7, 11, 15] and steps == 9, logged
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(model.last_train_loss))


@pytest.mark.parametrize("local_rank, expected", [(0, ["decode", "barrier"]), (1, ["barrier", "decode"])])
def test_under_ddp_one_process_per_machine_decodes_first(inspection_folder, tmp_path, monkeypatch, local_rank,
                                                          expected):
    """The first process of a machine builds the decoded cache; the others wait at a barrier and
    then find the file built (every rank decoding the same images wasted the machine's cores)."""
    from types import SimpleNamespace

    from vision_tl.data import datamodule as dm_module

    events: list[str] = []
    real = dm_module.decoded_images

    def recording(*args, **kwargs):
        events.append("decode")
        return real(*args, **kwargs)

    monkeypatch.setattr(dm_module, "decoded_images", recording)
    dm = _dm(inspection_folder, pipeline="cpu", decoded_cache=str(tmp_path))
    dm.trainer = SimpleNamespace(world_size=2, local_rank=local_rank,
                                 strategy=SimpleNamespace(barrier=lambda name: events.append("barrier")))
    assert len(dm.dataset("train")) == len(dm.splits["train"])
    assert events == expected


def test_unknown_pipeline_is_rejected(inspection_folder):
    with pytest.raises(ValueError, match="expected one of: auto, cpu, device"):
        ImageFolderDataModule(str(inspection_folder), backbone=TINY, pipeline="gpu")


@pytest.mark.parametrize("cached", [False, True])
def test_cpu_augmentation_follows_the_seed_whatever_the_workers(inspection_folder, tmp_path, cached):
    """albumentations ignores the global seeds; each draw of the sampler carries its own
    augmentation seed, so the same seed augments every image the same way, in any number
    of loader workers, and another seed does not."""
    def first_batches(seed: int, workers: int, epoch: int = 0) -> list[torch.Tensor]:
        dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=40, batch_size=8,
                                   pipeline="cpu", augment="inspection", seed=seed, num_workers=workers,
                                   decoded_cache=str(tmp_path / "cache") if cached else False)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        batches = iter(loader)
        return [next(batches)[0] for _ in range(2)]

    a, b, c = first_batches(0, workers=0), first_batches(0, workers=2), first_batches(1, workers=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    # a resumed run starting at epoch 1 sees what the uninterrupted run saw in epoch 1
    assert all(torch.equal(x, y) for x, y in zip(first_batches(0, 0, epoch=1), first_batches(0, 2, epoch=1),
                                                 strict=True))


@pytest.mark.parametrize("cached", [False, True])
def test_device_pipeline_sends_channels_last_uint8_from_workers(inspection_folder, tmp_path, cached):
    """Loader workers batch the device pipeline's images channels-last (no transposing copy,
    in shared memory); on the device they normalise to exactly the CPU pipeline's tensors."""
    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=40, num_workers=1, batch_size=8,
                               pipeline="device", decoded_cache=str(tmp_path) if cached else False)
    dm.setup("fit")
    reference = _dm(inspection_folder, pipeline="cpu")
    for batch, ref in zip(dm.val_dataloader(), reference.val_dataloader(), strict=True):
        assert batch[0].dtype == torch.uint8 and batch[0].is_contiguous(memory_format=torch.channels_last)
        x, y = dm.on_after_batch_transfer(batch, 0)
        assert torch.equal(y, ref[1]) and torch.equal(x, ref[0])
    # training batches hold exactly the sampler's draws, read from the cache in file order
    loader = dm.train_dataloader()
    draws = list(loader.sampler)[:8]
    x, y = next(iter(loader))
    labels = [dm.dataset("train").labels[i] for i in draws] if cached else [
        dm.splits["train"][i].label for i in draws]
    assert sorted(y.tolist()) == sorted(int(v) for v in labels)


def test_fit_progress_bar_redraws_by_time_not_every_batch(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import TQDMProgressBar

    from vision_tl.tasks import callbacks

    drawn = []
    monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end", lambda self, t, m, o, b, i: drawn.append(i))
    clock = iter([0.0, 0.1, 0.2, 0.7, 0.8, 0.9])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    bar = callbacks.ThrottledProgressBar(min_interval=0.5)
    bar.train_progress_bar = SimpleNamespace(total=6)
    for i in range(6):
        bar.on_train_batch_end(None, None, None, None, i)
    assert drawn == [0, 3, 5]  # the first, one after 0.5 s, and always the last


@pytest.mark.parametrize("cores, gpu, expected", [(2, True, 0), (4, False, 3), (16, False, 8), (16, True, 15),
                                                  (64, True, 16)])
def test_loader_processes_follow_the_cores_and_the_gpu(monkeypatch, cores, gpu, expected):
    """A GPU gets every core but one for decoding (it has nothing else for them to do);
    CPU training keeps cores for the model; a 2-core machine decodes in-process."""
    from vision_tl.data.device import default_num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers(gpu=gpu) == expected


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **{"enable_progress_bar": False, **kwargs})


def test_model_and_data_module_must_agree_when_built_from_python(inspection_folder, tmp_path):
    """The CLI links them; from Python a data module for another size or backbone is refused
    at fit time instead of training on pixels the checkpoint then describes wrongly."""
    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=40, num_workers=0, batch_size=8)
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, mode="full")
    with pytest.raises(ValueError, match=r"build both with the same backbone and image_size"):
        _trainer(tmp_path).fit(model, datamodule=dm)
    other = ImageClassifier(dm.classes[:2], backbone=TINY, pretrained=False, image_size=40, mode="full")
    with pytest.raises(ValueError, match=r"ImageClassifier\(datamodule.classes"):
        _trainer(tmp_path).fit(other, datamodule=dm)


def test_good_class_given_to_the_data_module_reaches_the_checkpoint(inspection_folder, tmp_path):
    from vision_tl.tasks import load_classifier

    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, num_workers=0,
                               batch_size=16, good_class="good")
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                            feature_cache=str(tmp_path / "cache"))
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert load_classifier(tmp_path / "m.ckpt")[1]["good_class"] == "good"


def test_frozen_fit_without_progress_bar_draws_no_feature_bars(inspection_folder, tmp_path, capfd):
    dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, num_workers=0, batch_size=16)
    model = ImageClassifier(dm.classes, backbone=TINY, pretrained=False, image_size=32, mode="frozen",
                            feature_cache=str(tmp_path / "cache"))
    _trainer(tmp_path).fit(model, datamodule=dm)
    assert "features train" not in capfd.readouterr().err


def test_device_pipeline_with_a_custom_augment_list_is_refused_up_front(inspection_folder):
    with pytest.raises(ValueError, match="not a custom list"):
        ImageFolderDataModule(str(inspection_folder), backbone=TINY, pipeline="device",
                              augment=[{"name": "HorizontalFlip", "p": 0.5}])


def test_device_augmentation_depends_on_epoch_batch_and_rank_alone(inspection_folder):
    """The device pipeline draws each training batch's augmentation from (seed, epoch, rank,
    batch): two ranks (whose global random states are seeded alike) augment differently, and
    the same epoch and batch augment alike whatever ran before (a resumed run)."""
    from types import SimpleNamespace

    dm = _dm(inspection_folder, pipeline="device", augment="inspection")
    batch = next(iter(dm.train_dataloader()))

    def augmented(rank: int, epoch: int, skip: int = 0, global_seed: int = 123) -> torch.Tensor:
        dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, global_rank=rank)
        dm._augment_batches = (-1, 0)  # a new process, or a new epoch
        for _ in range(skip):
            dm.on_after_batch_transfer(batch, 0)
        torch.manual_seed(global_seed)  # DDP seeds every rank's global state alike
        return dm.on_after_batch_transfer(batch, 0)[0]

    first = augmented(0, 0)
    assert torch.equal(first, augmented(0, 0, global_seed=7))  # the global random state does not decide
    assert not torch.equal(first, augmented(1, 0))  # another rank
    assert not torch.equal(first, augmented(0, 1))  # another epoch
    assert not torch.equal(first, augmented(0, 0, skip=1))  # the epoch's second batch


def test_default_loader_processes_are_shared_between_the_gpus_of_a_machine(inspection_folder, monkeypatch):
    """One process per GPU, each with train and val loaders: the machine's default worker count
    is split between them (8 ranks on 16 cores had 240 loader processes). A count the user
    gave is kept."""
    from types import SimpleNamespace

    from vision_tl.data import datamodule

    monkeypatch.setattr(datamodule, "default_num_workers", lambda: 15)
    trainer = SimpleNamespace(num_devices=4, world_size=4, global_rank=0, current_epoch=0, training=True,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    for given, expected in ((None, 3), (6, 6)):
        dm = ImageFolderDataModule(str(inspection_folder), backbone=TINY, image_size=32, batch_size=8,
                                   num_workers=given)
        dm.setup("fit")
        dm.trainer = trainer
        assert dm.train_dataloader().num_workers == expected


def test_both_caches_key_on_the_version_of_the_decoded_pixels(monkeypatch):
    """A kit upgrade that decodes some files otherwise (16-bit scaling, TIFF alpha) served the old
    pixels and features from caches built before it."""
    from vision_tl import imaging

    before = dc._key(["a"], (8, 8), "bilinear")
    monkeypatch.setattr(dc, "PIXELS_VERSION", imaging.PIXELS_VERSION + 1)
    assert dc._key(["a"], (8, 8), "bilinear") != before


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_into_a_log_writes_lines_not_carriage_returns():
    """The kit's own bars (feature extraction, the decoded cache, reports) write to a file or a
    pipe as lines, at most every LOG_INTERVAL seconds; to a terminal they redraw as before."""
    from vision_tl.utils import LOG_INTERVAL, progress_bar

    log = io.StringIO()
    with progress_bar(total=50, desc="decoding", unit="img", file=log) as bar:
        for _ in range(50):
            bar.update(1)
    assert log.getvalue() == ""  # done within the interval: no lines (test_log_line_progress has the longer job)
    assert bar.mininterval == bar.delay == LOG_INTERVAL

    terminal = _Terminal()
    with progress_bar(total=3, desc="decoding", file=terminal, mininterval=0) as bar:
        bar.update(3)
    assert terminal.getvalue().startswith("\r") and bar.mininterval == 0


def test_log_lines_are_whole_lines_without_padding_or_repeats():
    """Each redraw (tqdm writes one in a single call) is a line of its own, padding dropped, a
    blank redraw or one repeating the line before left out."""
    from vision_tl.utils import LineStream

    log = io.StringIO()
    stream = LineStream(log)
    for text in ["\r 10%|#   ", "", "\r 20%|##  2/10", "\r   \r", "\r 20%|##  2/10", "\r100%|", "\n"]:
        stream.write(text)
    assert log.getvalue() == " 10%|#\n 20%|##  2/10\n100%|\n"
