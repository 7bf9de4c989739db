"""Fast tests of vision_tl.export pieces that need no trained checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from vision_tl.backbones import Preprocessing
from vision_tl.data import eval_transform
from vision_tl.deploy.metadata import sibling
from vision_tl.export.onnx_export import (
    DeployableClassifier,
    ExportError,
    check_opset,
    check_output_path,
)
from vision_tl.export.parity import (
    DecodedImages,
    ImageSet,
    compare,
    decode,
    resolve_parity_images,
    split_images,
)
from vision_tl.export.pipeline import ExportOptions
from vision_tl.export.quantize import Int8Config, float_nodes
from vision_tl.models.classifier import ClassifierOutput

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class MeanPoolNet(torch.nn.Module):
    """Logits = a linear map of the per-channel means: sensitive to every pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def test_the_graphs_normalised_input_is_trainings_to_the_last_bit():
    """The graph's constants were products taken in float64 and then rounded: ImageNet's std 0.224
    gave another float32 than training's, and the normalised input differed in the last bit."""
    seen = []

    class Capture(MeanPoolNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return super().forward(x)

    pixels = np.arange(256, dtype=np.uint8).reshape(1, 8, 32, 1).repeat(3, axis=3)  # every value, each channel
    transform = eval_transform(Preprocessing((8, 32), MEAN, STD, "bicubic"))
    DeployableClassifier(Capture().eval(), MEAN, STD)(torch.from_numpy(pixels))
    assert torch.equal(seen[0], transform(pixels[0])[None])


def test_the_exported_graph_normalises_whole_rows_to_trainings_last_bit(tmp_path):
    """onnxruntime broadcasts a [1, 1, 1, 3] constant over an NHWC image three numbers at a time: the
    normalisation's Sub and Mul took a fifth of the INT8 model's time. With constants a whole image
    row wide they are cheap, and the graph's normalised input is still training's to the last bit."""
    import onnxruntime as ort

    from vision_tl.deploy import ModelMetadata
    from vision_tl.export.onnx_export import LoadedCheckpoint, write_onnx
    from vision_tl.export.padding import _Constants

    size = (8, 32)
    ckpt = LoadedCheckpoint(tmp_path / "x.ckpt", MeanPoolNet().eval(), list("abcd"), size, MEAN, STD, "bicubic")
    write_onnx(ckpt, tmp_path / "m.onnx", ModelMetadata(classes=ckpt.classes, input_size=size, mean=MEAN, std=STD))
    model = onnx.load(str(tmp_path / "m.onnx"))
    constant = _Constants(model.graph)
    ops = {n.op_type: n for n in model.graph.node}
    assert [constant(ops[op].input[1]).shape for op in ("Sub", "Mul")] == [(1, 1, 32, 3)] * 2
    model.graph.output.append(helper.make_tensor_value_info(ops["Transpose"].output[0], TensorProto.FLOAT, None))
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 8, 32, 1).repeat(3, axis=3)  # every value, each channel
    normalised = ort.InferenceSession(model.SerializeToString()).run(None, {"image": pixels})[-1]
    transform = eval_transform(Preprocessing(size, MEAN, STD, "bicubic"))
    np.testing.assert_array_equal(normalised, transform(pixels[0])[None].numpy())


def test_wrapper_matches_training_eval_transform():
    torch.manual_seed(0)
    net = MeanPoolNet().eval()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    transform = eval_transform(Preprocessing((16, 20), MEAN, STD, "bicubic"))
    reference = torch.softmax(net(torch.stack([transform(p) for p in pixels])), dim=1)
    out = DeployableClassifier(net, MEAN, STD)(torch.from_numpy(pixels))
    assert isinstance(out, ClassifierOutput)
    assert torch.allclose(out.probabilities, reference, atol=1e-6)
    assert torch.allclose(out.probabilities.sum(dim=1), torch.ones(3))


def test_wrapper_without_normalisation_takes_float_nchw():
    net = MeanPoolNet().eval()
    x = torch.randn(2, 3, 8, 8)
    out = DeployableClassifier(net, MEAN, STD, normalize_in_graph=False)(x)
    assert torch.allclose(out.probabilities, torch.softmax(net(x), dim=1))


@pytest.mark.parametrize("opset", [12, 21, "17", True])
def test_bad_opset_lists_the_valid_range(opset):
    with pytest.raises(ExportError, match="expected an integer from 13 to 20"):
        check_opset(opset)


def test_output_path_checks(tmp_path):
    with pytest.raises(ExportError, match="must end in .onnx"):
        check_output_path(tmp_path / "model.pt", overwrite=False)
    with pytest.raises(ExportError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "m.onnx", overwrite=False)
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ExportError, match="--overwrite"):
        check_output_path(tmp_path / "m.onnx", overwrite=False)
    assert check_output_path(tmp_path / "m.onnx", overwrite=True) == tmp_path / "m.onnx"
    assert sibling(tmp_path / "m.onnx", "int8") == tmp_path / "m.int8.onnx"
    assert sibling(tmp_path / "m.onnx", "parity", ".json") == tmp_path / "m.parity.json"


def _decoded(labels):
    return DecodedImages(np.zeros((len(labels), 1, 1, 3), np.uint8),
                         [Path(f"{i}.png") for i in range(len(labels))], list(labels))


def test_check_images_decode_to_a_memory_mapped_file_that_leaves_nothing_behind(tmp_path):
    """A large parity set must take disk space, not memory (14,400 images held as a list of
    arrays peaked at 1.8 GB), and no scratch file may be left beside the exported model."""
    from vision_tl.deploy import ModelMetadata

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(paths[-1])
    (folder / "broken.png").write_bytes(b"not an image")
    images = ImageSet(paths[:2] + [folder / "broken.png"] + paths[2:], [0, 1, None, 1, 0, 1], "test")
    meta = ModelMetadata(classes=["a", "b"], input_size=(16, 12), mean=MEAN, std=STD)
    scratch = tmp_path / "out"
    scratch.mkdir()
    mapped, in_memory = decode(images, meta, scratch=scratch), decode(images, meta)
    assert _mapped(mapped.pixels) and not _mapped(in_memory.pixels)
    assert mapped.pixels.shape == (5, 16, 12, 3) and np.array_equal(mapped.pixels, in_memory.pixels)
    assert mapped.labels == [0, 1, 1, 0, 1] and len(mapped.unreadable) == 1
    if os.name == "posix":  # unlinked at creation; elsewhere removed when the array is released
        assert list(scratch.iterdir()) == []
    # no room for the file (a read-only or missing folder, a full disk): the pixels stay in memory
    missing = decode(images, meta, scratch=tmp_path / "gone")
    assert not _mapped(missing.pixels) and np.array_equal(missing.pixels, in_memory.pixels)
    if hasattr(os, "posix_fallocate"):
        def disk_full(*_):
            raise OSError(28, "No space left on device")
        with mock.patch.object(os, "posix_fallocate", disk_full):
            full = decode(images, meta, scratch=scratch)
        assert not _mapped(full.pixels) and np.array_equal(full.pixels, in_memory.pixels)


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a file mapping (the scratch file), not the heap."""
    import mmap

    base = array
    while base is not None:
        if isinstance(base, (mmap.mmap, np.memmap)):
            return True
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return False


def test_compare_and_judge():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    same = compare(ref, ref.copy(), _decoded([0, 1, 1]), model="m", reference_name="r", source="s")
    assert same.judge(max_abs_diff=1e-4, min_agreement=1.0)
    assert same.accuracy_reference == pytest.approx(2 / 3)
    flipped = ref.copy()
    flipped[2] = [0.4, 0.6]
    report = compare(ref, flipped, _decoded([0, 1, 1]), model="m", reference_name="r", source="s")
    assert not report.judge(max_abs_diff=1e-4, min_agreement=1.0)
    assert len(report.failures) == 2 and report.disagreements[0]["path"] == "2.png"
    assert report.accuracy_change_points == pytest.approx(100 / 3)
    assert report.judge(max_accuracy_drop=0.5)  # it got better, not worse
    worse = compare(flipped, ref, _decoded([0, 1, 1]), model="m", reference_name="r", source="s")
    assert not worse.judge(max_accuracy_drop=float("nan"))  # a nan limit fails: it used to pass any drop
    json.dumps(report.to_dict())
    assert "FAILED" not in report.summary()
    # a copy of a thresholded model: judged on how many pass/reject decisions it flipped
    report.decision_changes, report.decision_rule = 1, "P(good) >= 0.5"
    assert not report.judge(max_decision_changes=20.0) and "changed on 1 of 3 images (33.33%)" in report.failures[0]
    assert "one image is 33.33% of these 3: check on more with --parity-images" in report.failures[0]
    assert "was not written" in report.summary() and "predict-onnx" not in report.summary()
    assert report.judge(max_decision_changes=34.0)
    assert not report.judge(max_decision_changes=float("nan"))
    report.decision_changes = None  # a model without a threshold: the limit does not apply
    assert report.judge(max_decision_changes=0.0) and "max_decision_changes_percent" not in report.criteria


def test_unlabelled_drop_counts_disagreements():
    ref = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    report = compare(ref, ref[:, ::-1].copy(), _decoded([None, None]), model="m",
                     reference_name="r", source="s")
    assert report.accuracy_model is None
    assert not report.judge(max_accuracy_drop=0.5)


@pytest.mark.parametrize(("calibration_dir", "parity_images", "advice"), [
    ("train_and_val", "auto", "calibrate on training images only (--calibration-dir with no validation"),
    (None, "val_and_train", "check on images the model was neither trained nor calibrated on (--parity-images with"),
    ("train_and_val", "val_and_train", "keep the two folders apart"),
    (None, None, "the run's train and val splits hold the same images"),
])
def test_calibration_images_among_the_check_images_are_blamed_on_the_set_that_holds_them(
        tmp_path, calibration_dir, parity_images, advice):
    """The warning told to give --calibration-dir no validation images even where the calibration
    images were the run's own training split and the folder given to --parity-images held
    training images: the advice names the set that was given (or the data, where neither was)."""
    from vision_tl.export.pipeline import _warn_shared_images

    for name in ("train.png", "val.png", "copy.png"):
        (tmp_path / name).write_bytes(name.encode() if name != "copy.png" else b"train.png")
    calibration = ImageSet([tmp_path / "train.png"], [0], "train")
    checked = ImageSet([tmp_path / "val.png", tmp_path / "copy.png"], [0, 0], "val")
    said = []
    options = ExportOptions(int8=True, calibration_dir=calibration_dir, parity_images=parity_images)
    _warn_shared_images(calibration, checked, options, said.append)
    (warning,) = said
    assert warning.startswith("WARNING: 1 of the 2 images the INT8 copy is checked on are among its 1 calibration")
    assert advice in warning
    assert ("--calibration-dir with no validation" in warning) == (advice.startswith("calibrate"))
    said.clear()
    _warn_shared_images(calibration, ImageSet([tmp_path / "val.png"], [0], "val"), options, said.append)
    assert said == []  # no image in common: no warning


def test_subsample_is_even_and_deterministic():
    images = ImageSet([Path(str(i)) for i in range(100)], list(range(100)), "x")
    picked = images.subsample(10)
    assert len(picked.paths) == 10 and picked.paths[0] == Path("0") and picked.paths[-1] == Path("99")
    assert images.subsample(1000) is images


def _write_split(run: Path, root: str, files: list[str]) -> Path:
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    empty = hashlib.sha256(b"").hexdigest()  # the tests' image files are empty
    entries = [{"path": f, "label": f.split("/")[0], "sha256": empty} for f in files]
    (run / "split.json").write_text(json.dumps({"root": root, "classes": ["a", "b"],
                                                "train": entries, "val": entries}))
    return ckpt


def test_split_root_relative_to_the_run_directory(tmp_path, monkeypatch):
    for name in ("a/1.png", "b/2.png"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")
    ckpt = _write_split(tmp_path / "runs" / "x" / "version_0", "data", ["a/1.png", "b/2.png"])
    monkeypatch.chdir(tmp_path / "runs")  # not where training ran
    found = split_images(ckpt, "val", ["a", "b"])
    assert found.paths == [tmp_path / "data" / "a/1.png", tmp_path / "data" / "b/2.png"]
    assert found.labels == [0, 1]


def test_split_images_name_their_folders_relative_to_the_working_directory(tmp_path, monkeypatch):
    """The parity lines printed by export name the split and its images the short way (a
    notebook's stored output must not show where the repository lives); from outside, in full."""
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "1.png").write_bytes(b"")
    ckpt = _write_split(tmp_path / "runs" / "x", str(tmp_path / "data"), ["a/1.png"])
    monkeypatch.chdir(tmp_path)
    shown = Path("runs", "x", "split.json")
    assert split_images(ckpt, "val", ["a", "b"]).source == f"val split of {shown} (files under data)"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert str(tmp_path / "runs" / "x" / "split.json") in split_images(ckpt, "val", ["a", "b"]).source


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_split_with_one_changed_or_missing_image_is_refused(tmp_path, damage):
    """Not only the first, middle and last files: any val image that changed since training
    (here the 2nd of 4) would be scored against a label it no longer has."""
    files = ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]
    for name in files:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")
    ckpt = _write_split(tmp_path / "run", str(tmp_path / "data"), files)
    if damage == "changed":
        (tmp_path / "data" / "a/2.png").write_bytes(b"another image")
    else:
        (tmp_path / "data" / "a/2.png").unlink()
    with pytest.raises(ExportError, match=r"1 (differ|of its 4 val images are missing).*a/2.png.*--parity-images"):
        split_images(ckpt, "val", ["a", "b"])


def test_split_with_a_vanished_root_says_how_to_give_images(tmp_path):
    ckpt = _write_split(tmp_path / "run", "/nonexistent/data", ["a/1.png"])
    with pytest.raises(ExportError, match="--parity-images DIR"):
        split_images(ckpt, "val", ["a", "b"])


def test_a_moved_data_folder_is_given_with_data_root(tmp_path):
    """The run records its data root as an absolute path: after the folder moved (another disk,
    another machine), --data ROOT reads the split's own images there, as `report --data` does,
    instead of a folder of all its images for --parity-images (training images among them)."""
    files = ["a/1.png", "b/2.png"]
    for name in files:
        (tmp_path / "moved" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "moved" / name).write_bytes(b"")
    ckpt = _write_split(tmp_path / "run", str(tmp_path / "data"), files)  # trained on data/, now moved/
    with pytest.raises(ExportError, match=r"if the folder moved, pass where it is now with --data ROOT"):
        split_images(ckpt, "val", ["a", "b"])
    for split in ("val", "train"):
        found = split_images(ckpt, split, ["a", "b"], data_root=tmp_path / "moved")
        assert found.paths == [tmp_path / "moved" / name for name in files] and found.labels == [0, 1]
    assert resolve_parity_images(ckpt, "auto", ["a", "b"], tmp_path / "moved").paths[0].parent.name == "a"
    with pytest.raises(ExportError, match=r"--data .*elsewhere: no such folder"):
        split_images(ckpt, "val", ["a", "b"], data_root=tmp_path / "elsewhere")
    (tmp_path / "other").mkdir()
    with pytest.raises(ExportError, match=r"--data .*other does not hold the run's val images \(e.g. a/1.png\)"):
        split_images(ckpt, "val", ["a", "b"], data_root=tmp_path / "other")


def test_no_bank_note_says_once_how_to_give_the_training_images():
    """Where listing the training images failed, its error already says what to pass; the note
    adds no second, contrary piece of advice (save a split.json the run already has)."""
    from vision_tl.export import unfamiliar

    notes: list[str] = []
    reason = "split.json: its data root '/d' is not found; pass the images with --calibration-dir DIR"
    assert unfamiliar.plan_bank(None, ImageSet([Path("x.png")], [0], "check"), reason, notes.append) is None
    assert notes[0].count("--calibration-dir") == 1 and "save_split" not in notes[0]
    notes.clear()
    unfamiliar.plan_bank(None, ImageSet([Path("x.png")], [0], "check"), None, notes.append)
    assert "save_split" in notes[0] and "--calibration-dir" in notes[0]


def test_threshold_note_names_the_option_in_both_apis():
    """export_onnx prints the same notes from Python, where a command-line flag alone is no help."""
    from vision_tl.deploy import ModelMetadata
    from vision_tl.export.unfamiliar import threshold_note

    meta = ModelMetadata(classes=["a", "b"], input_size=(8, 8), mean=MEAN, std=STD, unfamiliar_threshold=0.3,
                         unfamiliar_bank_images=20, unfamiliar_val_images=10)
    note = threshold_note(meta, 10)
    assert "at most 1 time in 11" in note and "ExportOptions(parity_images=DIR)" in note


def test_auto_without_split_explains_the_options(tmp_path):
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ExportError, match="--parity-images none"):
        resolve_parity_images(ckpt, "auto", ["a", "b"])
    assert resolve_parity_images(ckpt, "none", ["a", "b"]) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images found"):
        resolve_parity_images(ckpt, tmp_path / "empty", ["a", "b"])


def test_float_nodes_keep_normalisation_stem_and_head():
    nodes = [
        helper.make_node("Cast", ["image"], ["c"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["c"], ["t"], name="transpose", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w1"], ["x1"], name="stem"),
        helper.make_node("Conv", ["x1", "w2"], ["x2"], name="body"),
        helper.make_node("Gemm", ["x2", "w3"], ["l"], name="fc"),
        helper.make_node("Softmax", ["l"], ["p"], name="softmax"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    assert float_nodes(model, "none") == ["cast", "transpose", "softmax"]
    assert set(float_nodes(model, "stem+head")) == {"cast", "transpose", "softmax", "stem", "fc"}
    # a ViT: its one Conv is the patch embedding; its blocks' Linear layers (MatMul + Add) are
    # quantised, only the classifier stays in float
    vit = [helper.make_node("Conv", ["image", "w0"], ["t0"], name="patch_embed")]
    for k in range(3):
        vit += [helper.make_node("MatMul", [f"t{k}", f"w{k + 1}"], [f"m{k}"], name=f"block{k}.fc"),
                helper.make_node("Add", [f"m{k}", f"b{k}"], [f"t{k + 1}"], name=f"block{k}.bias")]
    vit += [helper.make_node("MatMul", ["t3", "wh"], ["mh"], name="head.fc"),
            helper.make_node("Add", ["mh", "bh"], ["l"], name="head.bias"),
            helper.make_node("Softmax", ["l"], ["p"], name="softmax")]
    vit_model = helper.make_model(helper.make_graph(vit, "g", [], []))
    assert set(float_nodes(vit_model, "head")) == {"softmax", "head.fc", "head.bias"}
    # the kit's two-layer head (--model.head mlp) stays in float whole
    mlp = [helper.make_node("Conv", ["image", "w0"], ["x"], name="/net/backbone/conv"),
           helper.make_node("Gemm", ["x", "w1"], ["h"], name="/net/head/head.1/Gemm"),
           helper.make_node("Erf", ["h"], ["r"], name="/net/head/head.2/Erf"),
           helper.make_node("Gemm", ["r", "w2"], ["l"], name="/net/head/head.4/Gemm"),
           helper.make_node("Softmax", ["l"], ["p"], name="/Softmax")]
    mlp_model = helper.make_model(helper.make_graph(mlp, "g", [], []))
    assert set(float_nodes(mlp_model, "head")) == {"/Softmax", "/net/head/head.1/Gemm", "/net/head/head.2/Erf",
                                                   "/net/head/head.4/Gemm"}
    with pytest.raises(ExportError, match="expected one of"):
        Int8Config(keep_float="everything")
    with pytest.raises(ExportError, match="expected one of: percentile"):
        Int8Config(method="kl")
    for bad in ({"batch_size": 0}, {"calibration_images": 2.5}, {"calibration_images": True}):
        with pytest.raises(ExportError, match="must be a positive integer"):  # up front, not after the float model
            Int8Config(**bad)
    with pytest.raises(ExportError, match="threads must be a positive integer"):
        ExportOptions(threads=0)
    assert Int8Config(batch_size=np.int64(8)).batch_size == 8 and ExportOptions(threads=np.int32(2)).threads == 2
    assert isinstance(onnx.helper.printable_graph(model.graph), str)


class SamePaddedNet(torch.nn.Module):
    """Two stride-2 convolutions with TensorFlow-style "same" padding (as in timm's tf_* models,
    Lite0 included), whose pads the graph computes from the input's shape, and a linear layer
    on every position of their output (other pads give it another number of inputs)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        from timm.layers import create_conv2d

        self.convs = torch.nn.Sequential(create_conv2d(3, 4, 5, stride=2, padding="same"), torch.nn.ReLU(),
                                         create_conv2d(4, 4, 5, stride=2, padding="same"), torch.nn.ReLU())
        self.fc = torch.nn.Linear(4 * -(-size[0] // 4) * -(-size[1] // 4), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).flatten(1))


def test_int8_keeps_the_pads_a_graph_computes_from_its_input_shape(tmp_path, monkeypatch):
    """The pads of "same" convolutions are computed in float; quantised with the activations, 2
    came out as 1 (a 48x80 Lite0 copy stopped with 'Invalid input shape', a 64 px one ran on
    shifted feature maps and lost 19 points): they are left in float, exact. (The export now
    makes timm's same padding constant; a graph exported before that, or a layer it does not
    know, still computes its pads.)"""
    import vision_tl.export.onnx_export as onnx_export
    from vision_tl.deploy import ModelMetadata, Predictor
    from vision_tl.export.onnx_export import LoadedCheckpoint, write_onnx
    from vision_tl.export.quantize import quantize_int8, shape_nodes

    monkeypatch.setattr(onnx_export, "static_same_padding", lambda *_: contextlib.nullcontext())
    torch.manual_seed(0)
    size = (48, 80)
    ckpt = LoadedCheckpoint(tmp_path / "x.ckpt", SamePaddedNet(size).eval(), ["a", "b", "c"], size, MEAN, STD, "bicubic")
    meta = ModelMetadata(classes=ckpt.classes, input_size=size, mean=MEAN, std=STD)
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    write_onnx(ckpt, fp32, meta)
    assert {"Shape", "Div", "Ceil", "Concat"} <= {n.op_type for n in onnx.load(str(fp32)).graph.node
                                                 if n.name in shape_nodes(onnx.load(str(fp32)))}
    rng = np.random.default_rng(0)
    images = []
    for i in range(8):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images[-1])
    quantize_int8(fp32, int8, images, meta, Int8Config(calibration_images=8, batch_size=4, keep_float="none"))
    pixels = rng.integers(0, 256, (4, *size, 3), dtype=np.uint8)
    reference = Predictor(fp32).predict_arrays(pixels)
    assert np.abs(Predictor(int8).predict_arrays(pixels) - reference).max() < 0.05


def _exported_graph(net: torch.nn.Module, size: tuple[int, int], path: Path) -> onnx.GraphProto:
    """``net`` (3 classes) exported by ``write_onnx`` to ``path`` at ``size``; the written graph."""
    from vision_tl.deploy import ModelMetadata
    from vision_tl.export.onnx_export import LoadedCheckpoint, write_onnx

    ckpt = LoadedCheckpoint(path.with_suffix(".ckpt"), net, ["a", "b", "c"], size, MEAN, STD, "bicubic")
    write_onnx(ckpt, path, ModelMetadata(classes=ckpt.classes, input_size=size, mean=MEAN, std=STD))
    return onnx.load(str(path)).graph


def test_same_padding_is_exported_as_constant_pads_of_the_convolutions(tmp_path):
    """timm's TF-style "same" padding worked its pads out from the input size in the graph: a
    Pad and size arithmetic before each strided conv, which cost 12 % of the fp32 model's time
    on a CPU and about half of the INT8 one's. At the export's one input size they are
    constants, folded into the Conv (begin and end pads differ), and the outputs stay the same."""
    from vision_tl.deploy import Predictor

    torch.manual_seed(0)
    size = (48, 80)
    net = SamePaddedNet(size).eval()
    graph = _exported_graph(net, size, tmp_path / "m.onnx")
    assert not {"Shape", "Pad", "Ceil"} & {n.op_type for n in graph.node}
    pads = [list(helper.get_attribute_value(a)) for n in graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "pads"]
    assert pads == [[1, 1, 2, 2], [1, 1, 2, 2]]  # 48x80 -> 24x40 -> 12x20, k5 s2: 3 each way, 1 before
    pixels = np.random.default_rng(1).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    x = (torch.from_numpy(pixels).float() - torch.tensor(MEAN) * 255) / (torch.tensor(STD) * 255)
    with torch.no_grad():
        expected = torch.softmax(net(x.permute(0, 3, 1, 2)), 1).numpy()
    np.testing.assert_allclose(Predictor(tmp_path / "m.onnx").predict_arrays(pixels), expected, atol=1e-5)
    assert type(net.convs[0]).forward is not None and "forward" not in vars(net.convs[0])  # as trained again


class SamePaddedLayersNet(torch.nn.Module):
    """timm's other layers that work their "same" pads out from the input size at run time (ViT
    hybrids, NFNets, NesT, NASNet, TF MaxViT): a max pool first, on the normalised image (negative
    at the border, where a zero pad instead of -inf would win), then each kind once, all strided,
    and a linear layer on every position (other pads give it another number of inputs)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        from timm.layers import AvgPool2dSame, ScaledStdConv2dSame, StdConv2dSame
        from timm.layers.pool2d_same import MaxPool2dSame

        self.layers = torch.nn.Sequential(
            MaxPool2dSame(3, stride=2), StdConv2dSame(3, 4, 4, stride=2), torch.nn.ReLU(),
            ScaledStdConv2dSame(4, 4, 3, stride=2), AvgPool2dSame(3, stride=2, count_include_pad=False))
        self.fc = torch.nn.Linear(4 * -(-size[0] // 16) * -(-size[1] // 16), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(x).flatten(1))


def test_same_padding_of_std_convs_and_pools_is_exported_as_their_own_constant_pads(tmp_path):
    """As for Conv2dSame: each of these layers left Shape / Gather / arithmetic / Pad nodes in the
    graph. Now their constant pads are part of the Conv's, the MaxPool's (ONNX leaves its pads out
    of the max: a -inf pad) and the AveragePool's (counting them, as timm's zeros are counted)."""
    from vision_tl.deploy import Predictor

    torch.manual_seed(0)
    size = (37, 50)
    net = SamePaddedLayersNet(size).eval()
    graph = _exported_graph(net, size, tmp_path / "m.onnx")
    assert not {"Shape", "Gather", "Pad", "Ceil"} & {n.op_type for n in graph.node}
    pads = [(n.op_type, list(helper.get_attribute_value(a))) for n in graph.node
            if n.op_type in ("MaxPool", "Conv", "AveragePool") for a in n.attribute if a.name == "pads"]
    # ONNX pads: [top, left, bottom, right]; 37x50 -> 19x25 -> 10x13 -> 5x7 -> 3x4, each pad total
    # (out - 1) * stride + kernel - in, its smaller half before
    assert pads == [("MaxPool", [1, 0, 1, 1]), ("Conv", [1, 1, 2, 2]), ("Conv", [0, 1, 1, 1]),
                    ("AveragePool", [1, 1, 1, 1])]
    counted = [helper.get_attribute_value(a) for n in graph.node if n.op_type == "AveragePool"
               for a in n.attribute if a.name == "count_include_pad"]
    assert counted == [1]
    pixels = np.random.default_rng(1).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    x = (torch.from_numpy(pixels).float() - torch.tensor(MEAN) * 255) / (torch.tensor(STD) * 255)
    with torch.no_grad():
        expected = torch.softmax(net(x.permute(0, 3, 1, 2)), 1).numpy()
    np.testing.assert_allclose(Predictor(tmp_path / "m.onnx").predict_arrays(pixels), expected, atol=1e-5)
    assert all("forward" not in vars(m) for m in net.modules())
    assert net.layers[1].same_pad and net.layers[3].same_pad  # as trained again


def _same_padded_layer(kind: str) -> torch.nn.Module:
    """One of timm's layers that work TF-style "same" pads out from the input size on each call,
    3 channels in."""
    from timm.layers import AvgPool2dSame, Conv2dSame, ScaledStdConv2dSame, StdConv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    return {"Conv2dSame": lambda: Conv2dSame(3, 4, 4, stride=2),
            "StdConv2dSame": lambda: StdConv2dSame(3, 4, 3, stride=2),
            "ScaledStdConv2dSame": lambda: ScaledStdConv2dSame(3, 4, 2, stride=1),  # (even kernel)
            "MaxPool2dSame": lambda: MaxPool2dSame(3, stride=2),
            "AvgPool2dSame": lambda: AvgPool2dSame(3, stride=2, count_include_pad=False)}[kind]()


SAME_PADDED_KINDS = ["Conv2dSame", "StdConv2dSame", "ScaledStdConv2dSame", "MaxPool2dSame", "AvgPool2dSame"]


@pytest.mark.parametrize("kind", SAME_PADDED_KINDS)
def test_each_layer_that_pads_same_at_run_time_is_traced_with_constant_pads(kind):
    """Within the block the trace has no size arithmetic and no Pad left once folded, onnxruntime
    gives PyTorch's numbers, and the layer's forward and padding flag are its own again after."""
    import io

    import onnxruntime as ort

    from vision_tl.export.padding import fold_pads, static_same_padding

    torch.manual_seed(0)
    net, x = _same_padded_layer(kind).eval(), torch.randn(2, 3, 11, 14)  # odd and even: pads differ
    with torch.no_grad():
        expected = net(x)
        with static_same_padding(net, x) as changed:
            torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=18, input_names=["x"])
    assert changed == 1
    model = onnx.load_from_string(buffer.getvalue())
    assert fold_pads(model) == 1
    assert not {"Pad", "Ceil", "Div", "Clip"} & {n.op_type for n in model.graph.node}
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(out[0], expected.numpy(), rtol=0, atol=1e-5)
    layer = next(m for m in net.modules() if type(m).__name__ == kind)
    assert "forward" not in vars(layer) and getattr(layer, "same_pad", True)


class SharedSamePaddedLayer(torch.nn.Module):
    """One "same" layer called at two sizes: its pads differ per call, so no constant is right."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(x)).mean((2, 3))


@pytest.mark.parametrize("kind", ["Conv2dSame", "StdConv2dSame", "MaxPool2dSame"])
def test_a_same_padded_layer_called_at_two_sizes_keeps_computing_its_pads(kind):
    from timm.layers import Conv2dSame, StdConv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    from vision_tl.export.padding import static_same_padding

    torch.manual_seed(0)
    layer = {"Conv2dSame": lambda: Conv2dSame(3, 3, 3, stride=2), "StdConv2dSame": lambda: StdConv2dSame(3, 3, 3, stride=2),
             "MaxPool2dSame": lambda: MaxPool2dSame(3, stride=2)}[kind]()
    net, x = SharedSamePaddedLayer(layer).eval(), torch.randn(2, 3, 22, 22)  # pads 1, then 2 at 11x11
    with torch.no_grad():
        expected = net(x)
        with static_same_padding(net, x) as changed:
            torch.testing.assert_close(net(x), expected)
    assert changed == 0


def test_finding_the_pads_leaves_a_model_in_training_mode_as_it_was():
    """The run that finds each layer's input size ran the model in whatever mode it was in: in
    training mode it updated the batch-norm statistics with that one image."""
    from timm.layers import create_conv2d

    from vision_tl.export.padding import static_same_padding

    torch.manual_seed(0)
    net = torch.nn.Sequential(create_conv2d(3, 4, 3, stride=2, padding="same"), torch.nn.BatchNorm2d(4),
                              torch.nn.Dropout()).train()
    net[2].eval()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    with static_same_padding(net, torch.randn(2, 3, 9, 9)) as changed:
        pass
    assert changed == 1 and [m.training for m in net.modules()] == [True, True, True, False]
    assert all(torch.equal(value, before[name]) for name, value in net.state_dict().items())


def _pad_then_conv(value: float = 0.0, second_user: bool = False) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    inits = [helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 0, 1, 0, 0, 2, 1]),
             helper.make_tensor("value", TensorProto.FLOAT, [], [value]),
             helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], [1.0] * 9)]
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"], name="pad"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    if second_user:
        nodes.append(helper.make_node("Relu", ["p"], ["z"], name="relu"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    return helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_only_zero_pads_with_one_conv_after_them_are_folded():
    import onnxruntime as ort

    from vision_tl.export.padding import fold_pads

    x = np.random.default_rng(0).normal(size=(1, 1, 4, 4)).astype(np.float32)
    model = _pad_then_conv()
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert fold_pads(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv"] and {t.name for t in model.graph.initializer} == {"w"}
    assert list(helper.get_attribute_value(model.graph.node[0].attribute[0])) == [1, 2, 3, 2]
    np.testing.assert_allclose(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], before)
    padded_weight = _pad_then_conv()
    conv = padded_weight.graph.node[1]
    conv.input[0], conv.input[1] = "x", "p"  # the Pad feeds the weight, not the image
    for kept in (_pad_then_conv(value=1.0), _pad_then_conv(second_user=True), padded_weight):
        assert fold_pads(kept) == 0 and "Pad" in [n.op_type for n in kept.graph.node]


def _pad_then_pool(op: str, value: float, padded: tuple[int, ...] = (0, 1, 2, 1), **attrs) -> onnx.ModelProto:
    """A Pad of ``value`` (``padded``: top, left, bottom, right) before a 3x3 stride-2 ``op``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 8])
    top, left, bottom, right = padded
    inits = [helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, top, left, 0, 0, bottom, right]),
             helper.make_tensor("value", TensorProto.FLOAT, [], [value])]
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"]),
             helper.make_node(op, ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2], **attrs)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                               inits), opset_imports=[helper.make_opsetid("", 18)])


def test_pads_fold_into_a_pool_only_where_its_own_padding_gives_the_same_numbers():
    """ONNX's MaxPool leaves its pads out of the max, as a -inf pad does while every window holds
    an input element; its AveragePool counts them as zeros with count_include_pad. Anything else
    (a zero pad before a max, windows all padding, ceil_mode's extra windows, pads of its own
    it does not count) keeps its Pad."""
    import onnxruntime as ort

    from vision_tl.export.padding import fold_pads

    x = -np.abs(np.random.default_rng(0).normal(size=(1, 2, 7, 8))).astype(np.float32)  # (a 0 pad would win)
    for model in (_pad_then_pool("MaxPool", -np.inf), _pad_then_pool("AveragePool", 0.0, count_include_pad=0)):
        before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        assert fold_pads(model) == 1 and len(model.graph.node) == 1
        attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
        assert list(attrs["pads"]) == [0, 1, 2, 1] and attrs.get("count_include_pad", 1) == 1
        np.testing.assert_array_equal(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], before)
    for kept in (_pad_then_pool("MaxPool", 0.0), _pad_then_pool("MaxPool", -np.inf, (0, 3, 0, 0)),
                 _pad_then_pool("MaxPool", -np.inf, ceil_mode=1), _pad_then_pool("AveragePool", -np.inf),
                 _pad_then_pool("AveragePool", 0.0, ceil_mode=1),
                 _pad_then_pool("AveragePool", 0.0, pads=[1, 1, 1, 1], count_include_pad=0)):
        assert fold_pads(kept) == 0 and "Pad" in [n.op_type for n in kept.graph.node]


def _pad_conv_and_if(read_in_branch: str) -> onnx.ModelProto:
    """A foldable Pad before a Conv, and an If whose then-branch multiplies ``read_in_branch`` (a
    tensor of the outer graph) by ``k``, an initializer only the branch reads."""
    shape = [1, 1, 4, 4]
    inits = [helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 0, 1, 0, 0, 2, 1]),
             helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], [1.0] * 9),
             helper.make_tensor("k", TensorProto.FLOAT, [], [2.0])]
    then_branch = helper.make_graph([helper.make_node("Mul", [read_in_branch, "k"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["r"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Conv", ["p", "w"], ["y"]),
             helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("If", ["c"], ["z"], then_branch=then_branch, else_branch=else_branch)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
        "z", TensorProto.FLOAT, None)], inits), opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("read_in_branch", ["r", "p"])
def test_tensors_only_a_subgraph_reads_are_kept(read_in_branch):
    """An If's branches read the outer graph's tensors by name, not through its inputs: the Conv
    and Relu computing the one they read and the initializer only they use were removed as unused
    (onnxruntime then refused the graph), and a Pad whose output a branch reads was folded away."""
    import onnxruntime as ort

    from vision_tl.export.padding import fold_pads

    model = _pad_conv_and_if(read_in_branch)
    for cond in (True, False):
        feed = {"x": np.random.default_rng(0).normal(size=(1, 1, 4, 4)).astype(np.float32), "c": np.array(cond)}
        before = ort.InferenceSession(_pad_conv_and_if(read_in_branch).SerializeToString()).run(None, feed)[0]
        fold_pads(model)
        np.testing.assert_allclose(ort.InferenceSession(model.SerializeToString()).run(None, feed)[0], before)
    assert ("Pad" in [n.op_type for n in model.graph.node]) == (read_in_branch == "p")


def test_pads_computed_from_a_shape_deep_in_a_network_are_left_in_place():
    """Asked whether such pads were constants, the fold followed the Shape's input up the whole
    network, one Python call per node: dm_nfnet_f1's export stopped with a RecursionError."""
    from vision_tl.export.padding import fold_pads

    depth = 1500  # nodes between the input and the Pad (beyond Python's default recursion limit)
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i - 1}"], [f"r{i}"]) for i in range(depth)]
    nodes += [helper.make_node("Shape", [f"r{depth - 1}"], ["shape"]),
              helper.make_node("Mul", ["shape", "zeros"], ["half"]),
              helper.make_node("Concat", ["half", "half"], ["pads"], axis=0),
              helper.make_node("Pad", [f"r{depth - 1}", "pads"], ["p"]),
              helper.make_node("Conv", ["p", "w"], ["y"])]
    inits = [helper.make_tensor("zeros", TensorProto.INT64, [4], [0] * 4),
             helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], [1.0] * 9)]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 18)])
    assert fold_pads(model) == 0 and "Pad" in [n.op_type for n in model.graph.node]


def test_numpy_numbers_in_the_options_reach_the_reports_as_json():
    """Options given as numpy scalars (accepted) went into the variant's parity report as they
    were: json.dumps failed after the copy was written under its final name, without its report."""
    options = ExportOptions(threads=np.int32(2), max_accuracy_drop=np.float32(1.5), max_decision_changes=np.int64(2),
                            int8_config=Int8Config(calibration_images=np.int64(32), batch_size=np.int64(8),
                                                   percentile=np.float32(99.99)))
    json.dumps({"threads": options.threads, "max_accuracy_drop": options.max_accuracy_drop,
                "max_decision_changes": options.max_decision_changes, **options.int8_config.to_dict()})
    assert (options.threads, options.max_accuracy_drop, options.max_decision_changes) == (2, 1.5, 2.0)
    with pytest.raises(ExportError, match="threads must be a positive integer"):
        ExportOptions(threads=np.float64(2))


def test_auto_without_split_explains_the_python_options_too(tmp_path):
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    with pytest.raises(ExportError) as info:
        resolve_parity_images(ckpt, "auto", ["a", "b"])
    message = str(info.value)
    for advice in ("--parity-images DIR", "ExportOptions(parity_images=DIR)", "datamodule.save_split(",
                   "--parity-images none", "parity_images='none'"):
        assert advice in message, advice
    assert "\n" not in message


def test_python_trained_run_exports_once_its_split_is_saved(tmp_path, monkeypatch):
    """Plain Lightning writes no split.json (nor config.yaml): the error says how, and save_split does it."""
    import lightning as L
    from PIL import Image

    from vision_tl.data import ImageFolderDataModule
    from vision_tl.export import ExportOptions, export_onnx
    from vision_tl.tasks import ImageClassifier

    rng = np.random.default_rng(0)
    for name in ("crack", "good"):
        for i in range(6):
            (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{name}_{i}.png")
    monkeypatch.chdir(tmp_path)
    data = ImageFolderDataModule("images", backbone="test_efficientnet", image_size=32, batch_size=4,
                                 num_workers=0, val_fraction=0.5)
    model = ImageClassifier(data.classes, backbone="test_efficientnet", pretrained=False, image_size=32)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    ckpt = next(Path(trainer.log_dir, "checkpoints").glob("*.ckpt"))
    with pytest.raises(ExportError, match=r"datamodule\.save_split\(RUN_DIR/'split\.json'\)"):
        export_onnx(ckpt, tmp_path / "model.onnx", log=lambda _: None)
    data.save_split(Path(trainer.log_dir) / "split.json")  # RUN_DIR: the folder that holds checkpoints/
    result = export_onnx(ckpt, tmp_path / "model.onnx", ExportOptions(), log=lambda _: None)
    assert result.report.passed and "images: 6 from val split of" in result.report.summary()


def test_parity_images_are_labelled_by_their_class_folder_at_any_depth(tmp_path):
    """Training labels ``val/<class>/day1/x.png`` by ``<class>``; the parity check must too, or it
    finds no labelled image and judges INT8 on agreement alone."""
    from vision_tl.export.parity import folder_images

    for rel in ("val/scratch/day1/a.png", "val/scratch/b.png", "val/ok/day2/cam1/c.png", "val/loose/d.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / rel)
    for given in (tmp_path / "val", tmp_path):  # the split folder, or the folder above it
        images = folder_images(given, ["ok", "scratch"])
        labels = {p.name: label for p, label in zip(images.paths, images.labels, strict=True)}
        assert labels == {"a.png": 1, "b.png": 1, "c.png": 0, "d.png": None}


def test_a_nan_accuracy_limit_is_refused_before_any_work(tmp_path):
    from vision_tl.export import ExportOptions, export_onnx
    from vision_tl.export.onnx_export import ExportError

    with pytest.raises(ExportError, match="max_accuracy_drop must be a number >= 0"):
        export_onnx(tmp_path / "missing.ckpt", tmp_path / "m.onnx", ExportOptions(int8=True, max_accuracy_drop=float("nan")))
    for bad in (float("nan"), -1.0, 101.0, "1"):
        with pytest.raises(ExportError, match="max_decision_changes must be a percentage"):
            export_onnx(tmp_path / "missing.ckpt", tmp_path / "m.onnx", ExportOptions(fp16=True, max_decision_changes=bad))
    with pytest.raises(ExportError, match="max_accuracy_drop must be a number"):
        export_onnx(tmp_path / "missing.ckpt", tmp_path / "m.onnx", ExportOptions(fp16=True, max_accuracy_drop=None))
    # None: the decisions are not checked; the export goes on (to the missing checkpoint here)
    with pytest.raises(Exception, match="missing.ckpt") as err:
        export_onnx(tmp_path / "missing.ckpt", tmp_path / "m.onnx", ExportOptions(fp16=True, max_decision_changes=None))
    assert not isinstance(err.value, TypeError)


def test_the_float_model_may_not_flip_a_good_defect_decision_even_by_rounding(monkeypatch):
    """A threshold between two scores 1e-7 apart is crossed by float rounding alone: the
    probabilities agree to 1e-4, yet the line would pass an image PyTorch rejects."""
    from types import SimpleNamespace

    from vision_tl.export import parity

    decoded = parity.DecodedImages(np.zeros((2, 4, 4, 3), np.uint8), [Path("a.png"), Path("b.png")], [None, None])
    reference = np.array([[0.1, 0.30000003, 0.59999997], [0.8, 0.1, 0.1]], np.float64)  # top-1 the same
    candidate = np.array([[0.1, 0.29999998, 0.60000002], [0.8, 0.1, 0.1]], np.float64)
    monkeypatch.setattr(parity, "decode", lambda images, metadata, scratch=None: decoded)
    monkeypatch.setattr(parity, "torch_outputs", lambda *a, **k: (reference, None))
    monkeypatch.setattr(parity, "onnx_outputs", lambda *a, **k: (candidate, None))
    images = SimpleNamespace(source="test")
    reports = {}
    for threshold in (0.3, None):
        metadata = SimpleNamespace(good_class="good", threshold=threshold, classes=["dent", "good", "scratch"])
        reports[threshold] = parity.check_parity(None, "m.onnx", metadata, images)[0]
    assert reports[None].passed and reports[0.3].max_abs_diff < 1e-4 and not reports[0.3].passed
    assert "decision (P(good) >= 0.3) changed on 1 of 2 images" in " ".join(reports[0.3].failures)


def test_a_decision_flipped_in_the_fp32_check_names_no_option_the_check_refuses():
    """The fp32 check allows no flipped good/defect decision and takes no --max-decision-changes:
    its failure points at the threshold instead."""
    from vision_tl.export.parity import ParityReport

    def report() -> ParityReport:
        return ParityReport(model="m.onnx", reference="PyTorch checkpoint", images="val", n_images=36,
                            max_abs_diff=1e-7, mean_abs_diff=1e-8, top1_agreement=1.0, accuracy_reference=None,
                            accuracy_model=None, n_labelled=0, decision_changes=1, decision_rule="P(good) >= 0.18")

    fp32 = report()
    assert not fp32.judge(max_abs_diff=1e-4, min_agreement=1.0, max_decision_changes=0.0, exact=True)
    assert "--max-decision-changes" not in fp32.failures[0] and "--target-false-reject" in fp32.failures[0]
    copy = report()
    assert not copy.judge(max_decision_changes=0.0)
    assert "raise --max-decision-changes" in copy.failures[0]


# ------------------------------------------------------------------ unfamiliar images


def _tiny_classifier(num_classes: int = 3):
    import timm

    from vision_tl.models.classifier import ClassifierNet

    torch.manual_seed(0)
    return ClassifierNet(timm.create_model("test_efficientnet", pretrained=False, num_classes=0), num_classes).eval()


def _tiny_model_and_bank(tmp_path, seed: int, images: int):
    """A tiny classifier, its metadata at 32 px, ``images`` random training images, their
    L2-normalised pooled features (the bank) and the checkpoint stand-in ``write_onnx`` takes."""
    from vision_tl.deploy import ModelMetadata
    from vision_tl.export.onnx_export import LoadedCheckpoint
    from vision_tl.export.parity import torch_features

    net = _tiny_classifier()
    size = (32, 32)
    meta = ModelMetadata(classes=["a", "b", "c"], input_size=size, mean=MEAN, std=STD)
    train = np.random.default_rng(seed).integers(0, 256, (images, *size, 3), dtype=np.uint8)
    bank = torch_features(net, meta, train)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    return net, meta, train, bank, LoadedCheckpoint(tmp_path / "x.ckpt", net, meta.classes, size, MEAN, STD, "bicubic")


def test_the_graph_scores_unfamiliarity_against_its_bank(tmp_path):
    """The second output is 1 - the best cosine similarity of the pooled features to the bank,
    computed in the ONNX graph (normalise, MatMul, ReduceMax, 1 - x) as PyTorch does."""
    from vision_tl.deploy import Predictor
    from vision_tl.export.onnx_export import write_onnx
    from vision_tl.export.parity import torch_outputs
    from vision_tl.models.unfamiliar import ClassifierWithUnfamiliarity

    net, meta, train, bank, ckpt = _tiny_model_and_bank(tmp_path, seed=0, images=6)
    wrapper = DeployableClassifier(net, MEAN, STD, bank=torch.from_numpy(bank))
    assert wrapper.output_names == ["probabilities", "unfamiliarity"]
    out = wrapper(torch.from_numpy(train[:2]))
    assert isinstance(out, ClassifierWithUnfamiliarity) and torch.allclose(out.unfamiliarity, torch.zeros(2), atol=1e-6)
    path = tmp_path / "m.onnx"
    write_onnx(ckpt, path, meta, bank=bank)
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["probabilities", "unfamiliarity"]
    ops = [n.op_type for n in model.graph.node if n.name.startswith("/unfamiliarity_score/")]
    assert {"MatMul", "ReduceMax", "Sub"} <= set(ops)
    new = np.random.default_rng(10).integers(0, 256, (5, *meta.input_size, 3), dtype=np.uint8)
    probs, scores = torch_outputs(net, meta, new, bank=bank)
    predictor = Predictor(path)
    assert np.abs(predictor.unfamiliarity_arrays(new) - scores).max() < 1e-5
    assert np.abs(predictor.predict_arrays(new) - probs).max() < 1e-5
    assert (scores > 1e-3).all() and predictor.unfamiliarity_arrays(train).max() < 1e-5  # its own images: 0
    # without a bank: one output, as before
    write_onnx(ckpt, tmp_path / "plain.onnx", meta)
    assert [o.name for o in onnx.load(str(tmp_path / "plain.onnx")).graph.output] == ["probabilities"]
    with pytest.raises(ExportError, match="no forward_features"):
        DeployableClassifier(MeanPoolNet(), MEAN, STD, bank=torch.ones(2, 3))


def test_parity_fails_on_an_unfamiliarity_that_differs_and_says_by_how_much():
    report = compare(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), _decoded([0, 1, 2]),
                     model="m.onnx", reference_name="ref", source="src")
    from vision_tl.export.parity import UNFAMILIARITY_TOLERANCE, compare_unfamiliarity

    compare_unfamiliarity(report, np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.31]), None)
    assert not report.judge(max_abs_diff=1e-4, max_unfamiliarity_diff=UNFAMILIARITY_TOLERANCE)
    assert report.failures == ["max |Δunfamiliarity| 1.00e-02 > 0.0001"]
    assert "unfamiliarity: max |Δ| 1.00e-02" in report.summary()
    compare_unfamiliarity(report, np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3 + 1e-7]), None)
    assert report.judge(max_abs_diff=1e-4, max_unfamiliarity_diff=UNFAMILIARITY_TOLERANCE)
    # a copy with its own threshold: how many check images the reference's would flag is counted
    compare_unfamiliarity(report, np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.5]), 0.3)
    assert report.unfamiliar_flag_changes == 1
    assert json.dumps(report.to_dict())  # (the report's fields stay JSON)


def test_copies_keep_the_unfamiliarity_score_in_float(tmp_path):
    """INT8: the score's nodes are left out of quantisation (the MatMul with the bank reads float
    features and a float bank, not dequantised ones); either copy's scores stay close to the fp32
    model's."""
    from vision_tl.deploy import Predictor
    from vision_tl.export.onnx_export import write_onnx
    from vision_tl.export.quantize import convert_fp16, quantize_int8, unfamiliarity_nodes

    net, meta, train, bank, ckpt = _tiny_model_and_bank(tmp_path, seed=1, images=16)
    fp32, int8, fp16 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx", tmp_path / "m.fp16.onnx"
    write_onnx(ckpt, fp32, meta, bank=bank)
    assert set(unfamiliarity_nodes(onnx.load(str(fp32)))) <= set(float_nodes(onnx.load(str(fp32)), "none"))
    images = []
    for i, image in enumerate(train):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(images[-1])
    quantize_int8(fp32, int8, images, meta, Int8Config(calibration_images=16, batch_size=8))
    convert_fp16(fp32, fp16, meta)
    graph = onnx.load(str(int8)).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    (matmul,) = [n for n in graph.node if n.name == "/unfamiliarity_score/MatMul"]
    assert [made_by.get(name) for name in matmul.input] == ["Div", None]  # float features, the bank itself
    (bank_t,) = [t for t in graph.initializer if t.name == matmul.input[1]]
    assert bank_t.data_type == TensorProto.FLOAT
    assert not any(n.op_type == "DequantizeLinear" and "unfamiliarity_score" in n.output[0] for n in graph.node)
    new = np.random.default_rng(11).integers(0, 256, (8, *meta.input_size, 3), dtype=np.uint8)
    reference = Predictor(fp32).unfamiliarity_arrays(new)
    assert np.abs(Predictor(fp16).unfamiliarity_arrays(new) - reference).max() < 1e-2
    assert np.abs(Predictor(int8).unfamiliarity_arrays(new) - reference).max() < 0.1
    assert ExportOptions().unfamiliar is True


def test_a_threshold_below_zero_from_float_rounding_is_stored_as_zero():
    """Copies of training images in other bytes (not left out by their sha256) score 0 give or
    take rounding, e.g. -3.6e-7: where they alone set the threshold, the export stores 0 rather
    than failing on metadata it wrote itself."""
    from vision_tl.deploy import ModelMetadata
    from vision_tl.export.unfamiliar import with_threshold

    meta = ModelMetadata(classes=["a", "b"], input_size=(8, 8), mean=MEAN, std=STD)
    scores = np.array([-3.6e-7, -5.9e-7, 0.9], np.float32)
    out = with_threshold(meta, scores, np.array([True, True, False]), bank_size=5)
    assert (out.unfamiliar_threshold, out.unfamiliar_val_images, out.unfamiliar_bank_images) == (0.0, 2, 5)
    assert ModelMetadata.from_props(out.to_props(), "test").unfamiliar_threshold == 0.0


def test_check_images_that_are_training_images_outside_the_bank_do_not_set_the_threshold(tmp_path, monkeypatch):
    """A training set over BANK_IMAGES is subsampled for the bank; a check image that is one of the
    training images left out of it was still trained on, no validation image: it is left out of
    the threshold too (by content), not only the bank's own images."""
    from vision_tl.export import unfamiliar

    monkeypatch.setattr(unfamiliar, "BANK_IMAGES", 2)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"train_{i}.png")
        paths[-1].write_bytes(b"image %d" % i)
    new = tmp_path / "new.png"
    new.write_bytes(b"image 9")  # the same size as the training files, another content
    training = ImageSet(paths, [0] * 6, "train")
    plan = unfamiliar.plan_bank(training, ImageSet(paths + [new], [0] * 7, "check"), None, lambda _: None)
    assert len(plan.images.paths) == 2
    assert plan.in_bank == set(paths)


def test_the_check_runs_the_model_once_for_both_outputs(tmp_path, monkeypatch):
    """The probabilities and the unfamiliarity come from the same pass of onnxruntime over the
    check images, not one pass each (a check set of thousands of images took twice as long)."""
    from vision_tl.deploy import ModelMetadata, Predictor
    from vision_tl.export.onnx_export import LoadedCheckpoint, write_onnx
    from vision_tl.export.parity import check_parity, torch_features

    net = _tiny_classifier()
    size = (32, 32)
    meta = ModelMetadata(classes=["a", "b", "c"], input_size=size, mean=MEAN, std=STD)
    rng = np.random.default_rng(0)
    bank = torch_features(net, meta, rng.integers(0, 256, (4, *size, 3), dtype=np.uint8))
    path = tmp_path / "m.onnx"
    write_onnx(LoadedCheckpoint(tmp_path / "x.ckpt", net, meta.classes, size, MEAN, STD, "bicubic"), path, meta,
               bank=bank)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    seen = []
    real = Predictor._run_once

    def counting(self, batch):
        seen.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(Predictor, "_run_once", counting)
    report, _, probabilities, scores = check_parity(net, path, meta, ImageSet(paths, [None] * 5, "test"), bank=bank)
    assert report.passed and probabilities.shape == (5, 3) and scores.shape == (5,)
    assert sum(seen) == 5


def test_the_training_images_sha256_recorded_in_the_split_are_not_computed_again(tmp_path, monkeypatch):
    """A split.json records each training image's sha256 (checked as its images are listed): the
    bank plan compares the check images with those, reading no training image again (a training
    set of uncompressed images, all of one size, would otherwise be read in full)."""
    import hashlib

    from vision_tl.export import unfamiliar

    check = []
    for i in range(3):
        check.append(tmp_path / f"check_{i}.bmp")
        check[-1].write_bytes(b"pixels %d" % i)
    recorded = [hashlib.sha256(b"pixels %d" % i).hexdigest() for i in (0, 1, 7)]
    training = ImageSet([tmp_path / "train" / f"{i}.bmp" for i in range(3)], [0] * 3, "train", recorded)
    read = []
    real = unfamiliar.file_hash
    monkeypatch.setattr(unfamiliar, "file_hash", lambda path: read.append(path) or real(path))
    plan = unfamiliar.plan_bank(training, ImageSet(check, [0] * 3, "check"), None, lambda _: None)
    assert plan.in_bank == set(check[:2])
    assert sorted(read) == sorted(check)  # the check images only


def test_a_copys_report_keeps_the_unfamiliarity_block_beside_the_quantisers_details(tmp_path, monkeypatch):
    """The INT8/FP16 reports' ``details`` were the quantiser's alone: the ``unfamiliar`` block the
    fp32 report has (bank, threshold, check images) was overwritten. Both are kept, with the copy's
    own threshold."""
    from vision_tl.deploy import read_metadata
    from vision_tl.export import pipeline

    net, meta, train, _, ckpt = _tiny_model_and_bank(tmp_path, seed=2, images=8)
    monkeypatch.setattr(pipeline, "load_checkpoint", lambda path: ckpt)
    rng = np.random.default_rng(3)
    for folder, images in (("train", train), ("val", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))):
        for i, image in enumerate(images):
            (tmp_path / folder / "a").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / folder / "a" / f"{i}.png")
    options = ExportOptions(int8=True, fp16=True, calibration_dir=tmp_path / "train", parity_images=tmp_path / "val",
                            int8_config=Int8Config(calibration_images=8, batch_size=4), threads=1,
                            max_accuracy_drop=100.0, max_decision_changes=None)
    pipeline.export_onnx(ckpt.path, tmp_path / "m.onnx", options, log=lambda _: None)
    fp32 = json.loads((tmp_path / "m.parity.json").read_text())["details"]["unfamiliar"]
    assert fp32["bank_images"] == 8 and fp32["val_images"] == 6
    for variant, own in (("int8", "calibration_images_used"), ("fp16", "keep_io_types")):
        details = json.loads((tmp_path / f"m.{variant}.parity.json").read_text())["details"]
        assert own in details  # the quantiser's
        unfamiliar = details["unfamiliar"]
        assert unfamiliar["threshold"] == read_metadata(tmp_path / f"m.{variant}.onnx").unfamiliar_threshold
        assert {k: v for k, v in unfamiliar.items() if k != "threshold"} == {
            k: v for k, v in fp32.items() if k != "threshold"}


def test_export_help_and_usage_errors_answer_without_torch():
    """``vision-tl export --help`` and a usage error are answered before torch, timm and onnx are
    imported: those cost seconds on a 2-core machine (benchmarks/startup.py)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        for name in ("torch", "timm", "onnx", "lightning", "albumentations"):
            sys.modules[name] = None  # unimportable: importing it raises ImportError
        from vision_tl.cli import main
        assert main(["export", "--help"]) == 0
        assert main(["export", "best.ckpt"]) == 2  # --out missing
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--calibration-method" in proc.stdout and "default: 18" in proc.stdout
    assert "the following arguments are required: --out" in proc.stderr and "full kit" not in proc.stderr


@pytest.mark.parametrize("package", ["vision_tl.export", "vision_tl.data"])
def test_every_public_name_of_a_lazy_package_is_listed_and_importable(package):
    """Names imported on first use are still in dir() (completion, help()) and all resolve."""
    import importlib

    module = importlib.import_module(package)
    assert sorted(set(module.__all__) - set(dir(module))) == []
    assert all(getattr(module, name) is not None for name in module.__all__)
