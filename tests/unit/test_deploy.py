"""Tests for vision_tl.deploy: metadata contract, torch-free Predictor and predict-onnx CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from vision_tl.deploy import (
    KEYS,
    PREFIX,
    REQUIRED_KEYS,
    DeployError,
    MetadataError,
    ModelMetadata,
    Prediction,
    Predictor,
    list_images,
    read_metadata,
    scan_images,
)
from vision_tl.deploy.cli import main
from vision_tl.imaging import load_rgb, resize

CLASSES = ["good", "scratch", "dent"]
SIZE = (8, 8)
MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.2, 0.3)
# Feature (per-channel mean of the normalised image) -> logits; large enough to spread the
# probabilities, so a wrong pixel shows up in the comparison.
WEIGHTS = np.array([[3.0, -1.0, 0.5], [-2.0, 2.5, 0.0], [0.5, -0.5, 2.0]], np.float32)
BIAS = np.array([0.1, -0.2, 0.05], np.float32)


# ---------------------------------------------------------------- fixtures


def make_metadata(**changes) -> ModelMetadata:
    fields = {"classes": CLASSES, "input_size": SIZE, "mean": MEAN, "std": STD,
              "interpolation": "bicubic", "backbone": "tiny", "kit_version": "0.1.0",
              "metrics": {"val_acc": 0.97}}
    fields.update(changes)
    return ModelMetadata(**fields)


def build_model(path: Path, *, uint8: bool = True, size: tuple | None = SIZE,
                meta: ModelMetadata | None = None, softmax: bool = True,
                n_classes: int = 3, batch: int | str = "N") -> Path:
    """uint8 NHWC -> Cast -> /255 -> -mean -> /std -> NCHW, or float NCHW input; then
    ReduceMean(H, W) -> MatMul -> Add -> Softmax."""
    h, w = size if size is not None else ("H", "W")
    weights, bias = WEIGHTS[:, :n_classes], BIAS[:n_classes]
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")]
    nodes = []
    if uint8:
        inp = helper.make_tensor_value_info("image", TensorProto.UINT8, [batch, h, w, 3])
        inits += [
            numpy_helper.from_array(np.array(255.0, np.float32), "s255"),
            numpy_helper.from_array(np.array(MEAN, np.float32).reshape(1, 1, 1, 3), "mean"),
            numpy_helper.from_array(np.array(STD, np.float32).reshape(1, 1, 1, 3), "std"),
        ]
        nodes += [
            helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["xf", "s255"], ["x01"]),
            helper.make_node("Sub", ["x01", "mean"], ["xc"]),
            helper.make_node("Div", ["xc", "std"], ["xn"]),
            helper.make_node("Transpose", ["xn"], ["nchw"], perm=[0, 3, 1, 2]),
        ]
    else:
        inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, h, w])
        nodes.append(helper.make_node("Identity", ["image"], ["nchw"]))
    last = "probabilities" if softmax else "logits"
    nodes += [
        helper.make_node("ReduceMean", ["nchw"], ["feat"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["feat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["z" if softmax else last]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], [last], axis=-1))
    out = helper.make_tensor_value_info(last, TensorProto.FLOAT, [batch, n_classes])
    graph = helper.make_graph(nodes, "tiny", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference(image: np.ndarray, normalize: bool = True, softmax: bool = True) -> np.ndarray:
    """The tiny graph reimplemented in numpy, on the same resize as the predictor."""
    x = resize(image, SIZE, "bicubic").astype(np.float32)
    x = (x / np.float32(255.0) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    z = x.mean(axis=(0, 1)) @ WEIGHTS + BIAS
    e = np.exp(z - z.max())
    return e / e.sum()


BANK = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], np.float32)  # unit rows


def build_scored_model(path: Path, meta: ModelMetadata | None, *, bank: np.ndarray = BANK) -> Path:
    """:func:`build_model` with the second output ``unfamiliarity`` on its features (the per-channel
    means of the normalised image): 1 - the best cosine similarity to a row of ``bank``."""
    build_model(path, meta=meta)
    model = onnx.load(str(path))
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(bank.T), "bank_t"),
                              numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    graph.node.extend([
        helper.make_node("ReduceL2", ["feat"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["feat", "norm"], ["unit"]),
        helper.make_node("MatMul", ["unit", "bank_t"], ["sim"]),
        helper.make_node("ReduceMax", ["sim"], ["best"], axes=[1], keepdims=0),
        helper.make_node("Sub", ["one", "best"], ["unfamiliarity"]),
    ])
    graph.output.append(helper.make_tensor_value_info("unfamiliarity", TensorProto.FLOAT, ["N"]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference_unfamiliarity(image: np.ndarray) -> float:
    x = resize(image, SIZE, "bicubic").astype(np.float32)
    feat = ((x / np.float32(255.0) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).mean(axis=(0, 1))
    return float(1.0 - np.max(BANK @ (feat / np.linalg.norm(feat))))


def scored_metadata(unfamiliar_threshold: float, **changes) -> ModelMetadata:
    return make_metadata(unfamiliar_threshold=unfamiliar_threshold, unfamiliar_bank_images=3, unfamiliar_val_images=19, **changes)


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_model(tmp_path / "model.onnx", meta=make_metadata())


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(13, 17), (8, 8), (20, 11), (5, 9)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[..., i % 3] = np.clip(arr[..., i % 3].astype(int) + 120, 0, 255).astype(np.uint8)
        paths.append(write_png(tmp_path / "imgs" / f"img_{i}.png", arr))
    return paths


# ----------------------------------------------------------------- metadata


def test_metadata_round_trip():
    meta = make_metadata(good_class="good", threshold=0.7, unfamiliar_threshold=0.25, unfamiliar_bank_images=40,
                         unfamiliar_val_images=12)
    props = meta.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert all(k.startswith(PREFIX) for k in props)
    assert set(props) == {PREFIX + k for k in KEYS}
    assert json.loads(props["vision_tl.classes"]) == CLASSES
    assert json.loads(props["vision_tl.input_size"]) == list(SIZE)
    assert props["vision_tl.layout"] == "NHWC" and props["vision_tl.input_dtype"] == "uint8"
    assert props["vision_tl.normalize_in_graph"] == "true"
    assert props["vision_tl.resize"] == "direct" and props["vision_tl.format_version"] == "1"
    assert ModelMetadata.from_props(props, "x.onnx") == meta
    # Optional keys are omitted when unset and default back.
    plain = make_metadata().to_props()
    assert "vision_tl.good_class" not in plain and "vision_tl.threshold" not in plain
    assert ModelMetadata.from_props(plain, "x.onnx").threshold is None
    assert not any("unfamiliar" in key for key in plain) and not make_metadata().flags_unfamiliar


def test_read_metadata_from_onnx(model: Path):
    meta = read_metadata(model)
    assert meta == make_metadata()


def test_missing_and_malformed_keys_are_listed():
    props = make_metadata().to_props()
    del props["vision_tl.classes"], props["vision_tl.mean"]
    props["vision_tl.input_size"] = "[224]"
    props["vision_tl.interpolation"] = "area"
    props["other.tool"] = "ignored"
    with pytest.raises(MetadataError) as info:
        ModelMetadata.from_props(props, "line3/model.onnx")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["classes", "mean"]
    assert set(err.malformed) == {"input_size", "interpolation"}
    msg = str(err)
    assert "line3/model.onnx" in msg
    for key in ("vision_tl.classes", "vision_tl.mean", "input_size", "interpolation"):
        assert key in msg
    assert "vision_tl.std" not in msg and "layout" not in msg


def test_no_metadata_lists_every_required_key():
    with pytest.raises(MetadataError) as info:
        ModelMetadata.from_props({}, "foreign.onnx")
    assert info.value.missing == list(REQUIRED_KEYS)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("format_version", "2", "upgrade"),
    ("mean", "[123.7, 116.3, 103.5]", "0..1"),
    ("std", "[0.2, 0.0, 0.2]", "std"),
    ("classes", '["a", "a"]', "duplicate"),
    ("good_class", "missing_class", "not one of"),
    ("threshold", "1.5", "between 0 and 1"),
    ("normalize_in_graph", "false", "uint8"),
    ("resize", "center_crop", "direct"),
])
def test_malformed_values(key: str, value: str, needle: str):
    props = make_metadata().to_props()
    props[PREFIX + key] = value
    with pytest.raises(MetadataError, match=needle) as info:
        ModelMetadata.from_props(props, "m.onnx")
    assert key in info.value.malformed


def test_to_props_refuses_invalid_metadata():
    with pytest.raises(MetadataError, match="layout"):
        make_metadata(layout="CHW").to_props()


# ---------------------------------------------------------------- predictor


def test_predictions_match_numpy_reference(model: Path, images: list[Path]):
    predictor = Predictor(model, threads=1)
    assert predictor.classes == CLASSES
    results = predictor.predict_paths(images, batch_size=3)
    assert [r.path for r in results] == [str(p) for p in images]
    for path, result in zip(images, results):
        expected = reference(load_rgb(path))
        got = np.array([result.probabilities[c] for c in CLASSES])
        assert np.max(np.abs(got - expected)) < 1e-5
        assert result.error is None and result.is_defect is None
        assert result.predicted == CLASSES[int(np.argmax(expected))]
        assert result.probability == pytest.approx(float(expected.max()), abs=1e-5)
    assert len({r.predicted for r in results}) > 1  # the fixture spreads the classes
    arrays = predictor.predict_arrays([load_rgb(p) for p in images], batch_size=2)
    assert arrays.shape == (len(images), 3) and arrays.dtype == np.float32
    assert np.max(np.abs(arrays - np.stack([reference(load_rgb(p)) for p in images]))) < 1e-5
    assert predictor.predict_arrays([]).shape == (0, 3)


def test_float_nchw_model_is_normalised_outside_the_graph(tmp_path: Path, images: list[Path]):
    meta = make_metadata(layout="NCHW", input_dtype="float32", normalize_in_graph=False)
    predictor = Predictor(build_model(tmp_path / "f.onnx", uint8=False, meta=meta))
    x = predictor.preprocess(load_rgb(images[0]))
    assert x.shape == (3, *SIZE) and x.dtype == np.float32
    probs = predictor.predict_arrays([load_rgb(p) for p in images])
    expected = np.stack([reference(load_rgb(p)) for p in images])
    assert np.max(np.abs(probs - expected)) < 1e-5


def test_grayscale_and_rgba_images(tmp_path: Path, model: Path):
    rng = np.random.default_rng(1)
    gray = write_png(tmp_path / "g.png", rng.integers(0, 256, (10, 12), dtype=np.uint8))
    rgba = write_png(tmp_path / "a.png", rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    predictor = Predictor(model)
    for result, path in zip(predictor.predict_paths([gray, rgba]), [gray, rgba]):
        assert result.error is None
        got = np.array([result.probabilities[c] for c in CLASSES])
        assert np.max(np.abs(got - reference(load_rgb(path)))) < 1e-5
    arr = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    rgb = np.repeat(arr[:, :, None], 3, axis=2)
    assert np.array_equal(predictor.preprocess(arr), predictor.preprocess(rgb))
    assert np.array_equal(predictor.preprocess(arr[:, :, None]), predictor.preprocess(rgb))
    with pytest.raises(DeployError, match=r"\(6, 5, 4\)"):
        predictor.preprocess(np.zeros((6, 5, 4), np.uint8))
    with pytest.raises(DeployError, match="uint8"):
        predictor.preprocess(np.zeros((6, 5, 3), np.float32))


def test_corrupt_image_becomes_error_row(tmp_path: Path, model: Path, images: list[Path]):
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_bytes(b"not a png at all")
    truncated = tmp_path / "imgs" / "truncated.png"
    truncated.write_bytes(images[0].read_bytes()[:60])
    paths = [images[0], bad, images[1], truncated, images[2]]
    results = Predictor(model).predict_paths(paths, batch_size=2)
    assert [r.path for r in results] == [str(p) for p in paths]
    for result in (results[1], results[3]):
        assert result.error is not None and Path(result.path).name in result.error
        assert result.predicted is None and result.probabilities == {}
    for result, path in ((results[0], images[0]), (results[2], images[1]),
                         (results[4], images[2])):
        assert result.error is None
        got = np.array([result.probabilities[c] for c in CLASSES])
        assert np.max(np.abs(got - reference(load_rgb(path)))) < 1e-5


def test_is_defect_uses_good_class_threshold(tmp_path: Path):
    red = write_png(tmp_path / "red.png", np.full((8, 8, 3), (255, 0, 0), np.uint8))
    green = write_png(tmp_path / "green.png", np.full((8, 8, 3), (0, 255, 0), np.uint8))
    mixed = write_png(tmp_path / "mixed.png", np.full((8, 8, 3), (170, 140, 110), np.uint8))
    paths = [red, green, mixed]
    p_good = [float(reference(load_rgb(p))[0]) for p in paths]
    assert p_good[0] > 0.9 > p_good[2] > 0.5 > p_good[1]
    for threshold, expected in ((0.5, [False, True, False]), (0.9, [False, True, True])):
        meta = make_metadata(good_class="good", threshold=threshold)
        model = build_model(tmp_path / f"m{threshold}.onnx", meta=meta)
        results = Predictor(model).predict_paths(paths)
        assert [r.is_defect for r in results] == expected
        assert all(r.is_defect == (r.probabilities["good"] < threshold) for r in results)


def test_a_pytorch_checkpoint_given_as_the_model_says_to_export_it(tmp_path: Path):
    torch = pytest.importorskip("torch")
    for name, kwargs in (("best.ckpt", {}), ("old.ckpt", {"_use_new_zipfile_serialization": False})):
        ckpt = tmp_path / name
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt, **kwargs)
        with pytest.raises(DeployError, match=r"a PyTorch checkpoint, not an ONNX model; export it first: "
                                              r"vision-tl export .*--out model\.onnx") as info:
            Predictor(ckpt)
        assert str(ckpt) in str(info.value)


def test_missing_and_invalid_model_files(tmp_path: Path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(DeployError, match="not found") as info:
        Predictor(missing)
    assert str(missing) in str(info.value)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    with pytest.raises(DeployError, match="not a loadable ONNX model") as info:
        Predictor(text)
    assert str(text) in str(info.value)
    with pytest.raises(DeployError, match="not a loadable ONNX model"):
        read_metadata(text)
    with pytest.raises(DeployError, match="directory"):
        Predictor(tmp_path)


def test_model_without_metadata_needs_explicit_preprocessing(tmp_path: Path,
                                                             images: list[Path]):
    foreign = build_model(tmp_path / "foreign.onnx", size=None)  # dynamic H, W; no metadata
    with pytest.raises(DeployError) as info:
        Predictor(foreign)
    msg = str(info.value)
    assert str(foreign) in msg and "no vision_tl metadata" in msg
    assert "missing classes" in msg and "missing input_size" in msg
    assert "--classes" in msg and "input_size=(H, W)" in msg
    assert "mean" not in msg  # a uint8 graph normalises itself
    for bad, says in ((dict(classes="good,scratch,dent", input_size=float(SIZE[0])), "input_size must be one int"),
                      (dict(classes=123, input_size=SIZE), "classes must be a list")):
        with pytest.raises(DeployError, match=says):
            Predictor(foreign, **bad)
    assert Predictor(foreign, classes=CLASSES, input_size=np.int64(SIZE[0])).metadata.input_size == SIZE
    predictor = Predictor(foreign, classes="good,scratch,dent", input_size=SIZE)
    assert predictor.has_vision_tl_metadata is False
    results = predictor.predict_paths(images)
    for result, path in zip(results, images):
        got = np.array([result.probabilities[c] for c in CLASSES])
        assert np.max(np.abs(got - reference(load_rgb(path)))) < 1e-5


def test_float_model_without_metadata_needs_mean_and_std(tmp_path: Path, images: list[Path]):
    foreign = build_model(tmp_path / "foreign_f.onnx", uint8=False)  # static 8x8
    with pytest.raises(DeployError) as info:
        Predictor(foreign, classes=CLASSES)
    msg = str(info.value)
    assert "missing mean" in msg and "missing std" in msg and "input_size" not in msg
    predictor = Predictor(foreign, classes=CLASSES, mean=MEAN, std=STD)
    assert predictor.metadata.input_size == SIZE  # read from the graph
    probs = predictor.predict_arrays([load_rgb(p) for p in images])
    assert np.max(np.abs(probs - np.stack([reference(load_rgb(p)) for p in images]))) < 1e-5


def test_foreign_logits_are_softmaxed_with_a_warning(tmp_path: Path, images: list[Path]):
    logits = build_model(tmp_path / "logits.onnx", softmax=False)
    predictor = Predictor(logits, classes=CLASSES)
    with pytest.warns(UserWarning, match="softmax"):
        probs = predictor.predict_arrays([load_rgb(p) for p in images])
    assert np.max(np.abs(probs - np.stack([reference(load_rgb(p)) for p in images]))) < 1e-5


def test_class_count_and_shape_mismatches(tmp_path: Path, model: Path):
    foreign = build_model(tmp_path / "foreign.onnx", meta=None)
    with pytest.raises(DeployError, match="outputs 3 classes but 2 class names"):
        Predictor(foreign, classes=["a", "b"], input_size=SIZE)
    with pytest.raises(DeployError, match="does not match"):
        Predictor(model, input_size=(16, 16))  # the graph is fixed to 8 x 8
    with pytest.raises(DeployError, match="invalid mean .*argument"):
        Predictor(model, mean=(120.0, 110.0, 100.0))
    bad_meta = build_model(tmp_path / "two.onnx", n_classes=2,
                           meta=make_metadata(classes=["good", "bad", "ugly"]))
    with pytest.raises(DeployError, match="outputs 2 classes"):
        Predictor(bad_meta)


def test_a_vision_tl_model_refuses_other_class_names(model: Path, images: list[Path]):
    """Its metadata names the output columns: a reordering would relabel predictions and move
    the good/defect decision onto another column."""
    assert Predictor(model, classes=list(CLASSES)).classes == list(CLASSES)  # the same names: fine
    for names in (list(reversed(CLASSES)), ["a", "b", "c"], ["a", "b"]):
        with pytest.raises(DeployError, match=r"names its output columns .*leave out classes=.*--classes") as info:
            Predictor(model, classes=names)
        assert str(model) in str(info.value)


def test_fixed_batch_model_runs_in_pieces(tmp_path: Path, images: list[Path]):
    fixed = build_model(tmp_path / "b1.onnx", meta=make_metadata(), batch=1)
    probs = Predictor(fixed).predict_arrays([load_rgb(p) for p in images])
    assert np.max(np.abs(probs - np.stack([reference(load_rgb(p)) for p in images]))) < 1e-5


def test_list_images(tmp_path: Path):
    root = tmp_path / "data"
    img = np.zeros((4, 4, 3), np.uint8)
    for rel in ("b.png", "a/z.jpg", "a/c.PNG", ".hidden/x.png", "a/.x.png"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, format="PNG")
    (root / "notes.txt").write_text("x")
    found = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert found == ["a/c.PNG", "a/z.jpg", "b.png"]
    assert list_images(root / "b.png") == [root / "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeployError, match=r"no images found .*\.png") as info:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(DeployError, match="no such file or folder"):
        list_images(tmp_path / "missing")


def test_predict_paths_accepts_a_folder(model: Path, images: list[Path]):
    results = Predictor(model).predict_paths(images[0].parent)
    assert [r.path for r in results] == [str(p) for p in sorted(images)]
    assert all(isinstance(r, Prediction) and r.error is None for r in results)


# ---------------------------------------------------------------------- CLI


def test_cli_csv(tmp_path: Path, model: Path, images: list[Path], capsys):
    (images[0].parent / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "predictions.csv"
    # Exit status 3: the CSV is written, but one image could not be read.
    assert main([str(model), str(images[0].parent), "--out", str(out), "--batch-size", "2"]) == 3
    printed = capsys.readouterr()
    assert "5 images: 4 predicted, 1 could not be read," in printed.out
    assert "images/s" in printed.out
    assert "broken.png" in printed.err and "exit status 3" in printed.err
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "predicted", "probability", "p_good", "p_scratch", "p_dent",
                             "is_defect", "error"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.png"]["error"] and by_name["broken.png"]["predicted"] == ""
    for path in images:
        row = by_name[path.name]
        got = np.array([float(row[f"p_{c}"]) for c in CLASSES])
        assert np.max(np.abs(got - reference(load_rgb(path)))) < 1e-5
        assert row["error"] == "" and row["is_defect"] == ""
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_json_with_defects(tmp_path: Path, images: list[Path]):
    model = build_model(tmp_path / "m.onnx", meta=make_metadata(good_class="good", threshold=0.5))
    out = tmp_path / "p.json"
    assert main([str(model), *map(str, images), str(images[0]), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [Path(d["path"]).name for d in data] == [p.name for p in images]  # repeat dropped
    for item in data:
        assert set(item) == {"path", "predicted", "probability", "probabilities", "is_defect",
                             "error"}
        assert item["is_defect"] == (item["probabilities"]["good"] < 0.5)


def test_cli_refuses_overwrite_and_missing_folder(tmp_path: Path, model: Path,
                                                  images: list[Path], capsys):
    out = tmp_path / "p.csv"
    out.write_text("keep me")
    args = [str(model), str(images[0]), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err
    assert "Traceback" not in err and out.read_text() == "keep me"
    assert main([*args, "--overwrite"]) == 0
    assert out.read_text().startswith("path,predicted")
    missing = tmp_path / "no_such_dir"
    assert main([str(model), str(images[0]), "--out", str(missing / "p.csv")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main([str(model), str(images[0]), "--out", str(tmp_path / "p.xlsx")]) == 2
    assert ".csv" in capsys.readouterr().err


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_decoding_on_threads_gives_the_same_rows_in_the_same_order(tmp_path: Path, model: Path,
                                                                   images: list[Path], threads: int):
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_bytes(b"not a png at all")
    paths = [images[0], bad, *images[1:], images[0]]
    expected = [r.to_dict() for r in Predictor(model).predict_paths(paths, batch_size=2, decode_threads=0)]
    assert [r.to_dict() for r in Predictor(model).predict_paths(paths, batch_size=2, decode_threads=threads)] == expected
    assert expected[1]["error"] and [e["path"] for e in expected] == [str(p) for p in paths]


def test_the_next_batch_is_decoded_while_the_model_runs(model: Path, images: list[Path], monkeypatch):
    """On the line the images are often megapixels and decoding them takes as long as the model:
    the next batch decodes on the threads meanwhile, not after it."""
    import threading

    import vision_tl.deploy.predictor as predictor_module

    decoded, next_batch_ready, seen = [], threading.Event(), []

    def load(path):
        decoded.append(path)
        if len(decoded) >= 4:  # the first batch of 2 and the next one
            next_batch_ready.set()
        return load_rgb(path)

    monkeypatch.setattr(predictor_module, "load_rgb", load)
    predictor = Predictor(model)
    run = predictor._run

    def slow_run(batch):
        seen.append(next_batch_ready.wait(timeout=5 if not seen else 0))
        return run(batch)

    monkeypatch.setattr(predictor, "_run", slow_run)
    results = predictor.predict_paths(images, batch_size=2, decode_threads=2)
    assert seen[0] and all(r.error is None for r in results)
    with pytest.raises(DeployError, match="decode_threads must be a whole number"):
        predictor.predict_paths(images, decode_threads=-1)


@pytest.mark.parametrize("extra", [["--batch-size", "0"], ["--input-size", "a,b"],
                                   ["--mean", "1,2"], ["--interpolation", "area"],
                                   ["--decode-threads", "-1"]])
def test_cli_bad_arguments_exit_2(tmp_path: Path, model: Path, images: list[Path],
                                  extra: list[str], capsys):
    args = [str(model), str(images[0]), "--out", str(tmp_path / "p.csv"), *extra]
    assert main(args) == 2
    assert "error" in capsys.readouterr().err


def test_cli_bad_inputs_exit_2(tmp_path: Path, model: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(model), str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "no images found" in err and ".png" in err
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_text("nope")
    img = write_png(tmp_path / "i.png", np.zeros((4, 4, 3), np.uint8))
    assert main([str(not_onnx), str(img), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert str(not_onnx) in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


def test_cli_progress_falls_back_without_tqdm(tmp_path: Path, model: Path,
                                              images: list[Path], monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes ``import tqdm`` fail
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert main([str(model), str(images[0]), "--out", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").exists()


def test_cli_progress_in_a_log_is_whole_lines(tmp_path: Path, model: Path, images: list[Path],
                                               monkeypatch, capsys):
    """A scheduled predict-onnx whose stderr goes to a log gets progress lines (here at every
    image: the interval is set to 0), not a bar's carriage-return redraws, nor nothing."""
    import vision_tl.utils

    monkeypatch.setattr(vision_tl.utils, "LOG_INTERVAL", 0.0)
    assert main([str(model), str(images[0].parent), "--out", str(tmp_path / "p.csv"), "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and f"{len(images)}/{len(images)}" in err.splitlines()[-1]


def test_cli_help_has_an_example(capsys):
    assert main(["--help"]) == 0
    assert "vision-tl predict-onnx model.onnx" in capsys.readouterr().out


def test_cli_overrides_run_a_foreign_model(tmp_path: Path, images: list[Path]):
    foreign = build_model(tmp_path / "foreign.onnx", uint8=False, size=None)
    out = tmp_path / "p.csv"
    args = [str(foreign), str(images[0]), "--out", str(out), "--classes", "good,scratch,dent",
            "--input-size", "8,8", "--mean", ",".join(map(str, MEAN)),
            "--std", ",".join(map(str, STD))]
    assert main(args) == 0
    with out.open(newline="") as fh:
        row = next(csv.DictReader(fh))
    got = np.array([float(row[f"p_{c}"]) for c in CLASSES])
    assert np.max(np.abs(got - reference(load_rgb(images[0])))) < 1e-5


# ---------------------------------------------------------------- torch-free


def test_deploy_never_imports_torch(tmp_path: Path, model: Path, images: list[Path]):
    code = textwrap.dedent(f"""
        import sys
        from vision_tl.deploy import Predictor
        from vision_tl.deploy.cli import main
        from vision_tl.deploy import read_metadata
        from vision_tl.deploy.speed import onnx_speed
        result = Predictor({str(model)!r}).predict_paths([{str(images[0])!r}])[0]
        assert result.error is None and result.predicted, result
        assert main([{str(model)!r}, {str(images[1])!r}, "--out", {str(tmp_path / "s.csv")!r}]) == 0
        assert onnx_speed({str(model)!r}, read_metadata({str(model)!r}), threads=1, batch=2, repeats=1)
        # the command as a user starts it (`vision-tl predict-onnx ...`: the dispatcher, its signal handling)
        from vision_tl.cli import console_main
        sys.argv = ["vision-tl", "predict-onnx", {str(model)!r}, {str(images[1])!r}, "--out", {str(tmp_path / "c.csv")!r}]
        assert console_main() == 0
        heavy = [m for m in ("torch", "torchvision", "lightning", "pytorch_lightning", "timm",
                             "onnx") if m in sys.modules]
        assert not heavy, heavy
        print("torch-free ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "torch-free ok" in proc.stdout


# ---------------------------------------------------------------- deploy wheel


def test_deploy_wheel_installs_and_predicts_on_its_own(tmp_path: Path, model: Path, images: list[Path]):
    """pip accepts the small wheel; from it alone (the kit's own modules out of reach) the
    predictor and ``vision-tl predict-onnx`` run, torch is never imported, and training
    commands say the full kit is needed."""
    from vision_tl.deploy.package import REQUIRES, build_deploy_wheel

    wheel = build_deploy_wheel(tmp_path / "dist")
    assert wheel.stat().st_size < 100_000  # the size the README and --help give
    with pytest.raises(FileExistsError, match="overwrite"):
        build_deploy_wheel(tmp_path / "dist")
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--target", str(target), str(wheel)], capture_output=True, text=True, check=False)
    assert pip.returncode == 0, pip.stderr
    metadata = next(target.glob("vision_tl_deploy-*.dist-info")) / "METADATA"
    assert sorted(line.split(": ", 1)[1] for line in metadata.read_text().splitlines()
                  if line.startswith("Requires-Dist")) == sorted(REQUIRES)
    code = textwrap.dedent(f"""
        import sys
        import vision_tl
        assert vision_tl.__file__.startswith({str(target)!r}), vision_tl.__file__
        from vision_tl.cli import main
        from vision_tl.deploy import Predictor
        assert Predictor({str(model)!r}).predict_paths([{str(images[0])!r}])[0].error is None
        assert main(["predict-onnx", {str(model)!r}, {str(images[1])!r}, "--out", {str(tmp_path / "p.csv")!r}]) == 0
        assert main(["fit", "--config", "x.yaml"]) == 2
        assert "torch" not in sys.modules
        print("wheel ok")
    """)
    # -S: no site processing, so the kit's editable install (a .pth hook) is out of reach;
    # numpy, Pillow and onnxruntime still come from site-packages. Run outside the checkout,
    # which would otherwise be first on sys.path.
    paths = [str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                          check=False, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wheel ok" in proc.stdout
    assert "needs the full kit" in proc.stderr and "not on PyPI" in proc.stderr


# ------------------------------------------------------- robustness (A-G)


def test_cli_unreadable_images_exit_3_and_are_not_counted_as_good(tmp_path: Path, capsys):
    model = build_model(tmp_path / "m.onnx", meta=make_metadata(good_class="good", threshold=0.5))
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"b{i}.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    assert main([str(model), str(folder), "--out", str(out)]) == 3
    printed = capsys.readouterr()
    assert "3 images: 0 predicted, 3 could not be read," in printed.out
    assert "defects (P(good) < 0.5): 0 of 0 predicted (3 unreadable, not judged)" in printed.out
    assert "3 images of 3 could not be read" in printed.err and "exit status 3" in printed.err
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["error"] and r["is_defect"] == "" for r in rows)
    # Mixed: the defect count is out of the predicted images only.
    write_png(folder / "ok.png", np.full((8, 8, 3), (0, 255, 0), np.uint8))
    assert main([str(model), str(folder), "--out", str(out), "--overwrite"]) == 3
    assert "defects (P(good) < 0.5): 1 of 1 predicted (3 unreadable" in capsys.readouterr().out


def test_cli_help_documents_exit_statuses(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "exit status:" in text
    for line in ("0    every image was predicted", "2    bad arguments",
                 "3    the output was written, but some images could not be read"):
        assert line in text
    assert "an --out that could not\n       be replaced" in text  # predictions.unsaved.csv, also exit 2


def test_predict_arrays_refuses_a_single_image(model: Path):
    predictor = Predictor(model)
    with pytest.raises(DeployError, match=r"\(200, 200, 3\).*list of images.*N x H x W x 3"):
        predictor.predict_arrays(np.zeros((200, 200, 3), np.uint8))
    with pytest.raises(DeployError, match="ambiguous"):
        predictor.predict_arrays(np.zeros((5, 7, 4), np.uint8))  # 1 RGBA or 5 gray 4 wide?
    with pytest.raises(DeployError, match=r"channels-first .*transpose\(1, 2, 0\)"):
        predictor.predict_arrays(np.zeros((3, 20, 30), np.uint8))  # torch's layout: was read as 3 gray images
    with pytest.raises(DeployError, match=r"\[image\]"):
        predictor.predict_arrays(np.zeros((20, 30), np.uint8))
    with pytest.raises(DeployError, match="predict_paths"):
        predictor.predict_arrays("img.png")
    with pytest.raises(DeployError, match=r"images\[1\]: .*uint8"):
        predictor.predict_arrays([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3))])
    # Genuine batches still work: N x H x W x 3, N x H x W (grayscale), a generator.
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (5, 9, 11, 3), dtype=np.uint8)
    expected = np.stack([reference(img) for img in batch])
    assert np.max(np.abs(predictor.predict_arrays(batch, batch_size=2) - expected)) < 1e-5
    gen = predictor.predict_arrays((img for img in batch), batch_size=np.int64(3))
    assert np.max(np.abs(gen - expected)) < 1e-5
    gray = rng.integers(0, 256, (4, 9, 11), dtype=np.uint8)
    probs = predictor.predict_arrays(gray)
    rgb = np.repeat(gray[..., None], 3, axis=3)
    assert probs.shape == (4, 3)
    assert np.max(np.abs(probs - np.stack([reference(img) for img in rgb]))) < 1e-5
    assert predictor.predict_arrays(batch[:1]).shape == (1, 3)


def test_mean_std_refused_when_normalised_in_graph(tmp_path: Path, model: Path,
                                                   images: list[Path], capsys):
    with pytest.raises(DeployError, match="mean cannot be applied.*inside the graph"):
        Predictor(model, mean=MEAN)
    with pytest.raises(DeployError, match="mean and std .*--mean / --std"):
        Predictor(model, mean=MEAN, std=STD)
    out = tmp_path / "p.csv"
    assert main([str(model), str(images[0]), "--out", str(out), "--std", "0.2,0.2,0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(model) in err and "--std" in err
    assert not out.exists()


def test_interpolation_override_warns(tmp_path: Path, model: Path, images: list[Path], capsys):
    with pytest.warns(UserWarning, match="'nearest' differs from 'bicubic'.*validated"):
        predictor = Predictor(model, interpolation="nearest")
    assert predictor.metadata.interpolation == "nearest"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictor(model, interpolation="bicubic")  # the model's own: no warning
    out = tmp_path / "p.csv"
    assert main([str(model), str(images[0]), "--out", str(out), "--interpolation", "bilinear"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "'bilinear' differs from 'bicubic'" in err
    assert out.exists()


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_cli_bad_max_image_pixels_env(tmp_path: Path, model: Path, images: list[Path],
                                      monkeypatch, capsys, value: str):
    monkeypatch.setenv("VISION_TL_MAX_IMAGE_PIXELS", value)
    out = tmp_path / "p.csv"
    assert main([str(model), str(images[0].parent), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: VISION_TL_MAX_IMAGE_PIXELS=")
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()
    with pytest.raises(DeployError, match="VISION_TL_MAX_IMAGE_PIXELS"):
        Predictor(model).predict_paths(images)


def test_predict_paths_accepts_iterables_and_numpy_ints(model: Path, images: list[Path]):
    predictor = Predictor(model)
    expected = np.stack([reference(load_rgb(p)) for p in images])
    got = predictor.predict_paths((p for p in images), batch_size=np.int64(3))
    probs = np.array([[r.probabilities[c] for c in CLASSES] for r in got])
    assert np.max(np.abs(probs - expected)) < 1e-5
    assert [r.path for r in got] == [str(p) for p in images]
    assert len(predictor.predict_paths(iter([str(images[0])]), np.int32(1))) == 1
    for bad in (True, np.bool_(True), 0, 2.0, np.float64(2), "4"):
        with pytest.raises(DeployError, match="batch_size must be a positive integer"):
            predictor.predict_paths(images, batch_size=bad)
    with pytest.raises(DeployError, match=r"bytes .*str or pathlib.Path.*iterable"):
        predictor.predict_paths(str(images[0].parent).encode())
    with pytest.raises(DeployError, match=r"int .*iterable"):
        predictor.predict_paths(5)
    with pytest.raises(DeployError, match=r"paths\[1\] is a bytes"):
        predictor.predict_paths([images[0], b"x.png"])


def test_threads_accepts_numpy_integers_as_the_export_does(model: Path, images: list[Path]):
    """ExportOptions(threads=np.int32(2)) is accepted, and its speed measurement opens sessions
    with that value: refused there, it rejected every INT8/FP16 copy."""
    from vision_tl.deploy.speed import onnx_speed

    assert len(Predictor(model, threads=np.int64(2)).predict_paths(images[:1])) == 1
    assert set(onnx_speed(model, read_metadata(model), threads=np.int32(1), batch=2, repeats=1)) == {
        "latency_b1_ms", "throughput_b2_ips"}
    for bad in (True, np.bool_(True), 0, 2.0, np.float64(2), "4"):
        with pytest.raises(DeployError, match="threads must be a positive integer"):
            Predictor(model, threads=bad)


def test_deploy_wheel_help_is_plain_text(capsys):
    from vision_tl.deploy.package import main as wheel_main

    with pytest.raises(SystemExit) as info:
        wheel_main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    assert "vision-tl deploy-wheel: the torch-free predictor" in text
    assert "pip download dist/vision_tl_deploy-*.whl -d wheelhouse/" in text
    assert "pip install --no-index --find-links wheelhouse vision-tl-deploy" in text


def test_readme_offline_install_matches_help():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Deploy to a line (ONNX)", 1)[1].split("\n## ", 1)[0]
    assert "pip download dist/vision_tl_deploy-*.whl -d wheelhouse/" in section
    assert "pip install --no-index --find-links wheelhouse vision-tl-deploy" in section
    assert "3 the CSV/JSON was written" in section


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32",
                    reason="needs symbolic links")
def test_broken_links_become_error_rows_and_other_files_are_counted(tmp_path: Path,
                                                                    model: Path, capsys):
    root = tmp_path / "data"
    good = write_png(root / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(root / "sub" / "b.jpg", np.full((8, 8, 3), 200, np.uint8))
    (root / "anim.gif").write_bytes(b"GIF89a")
    (root / "notes.txt").write_text("x")
    (root / ".hidden.txt").write_text("hidden files are not counted")
    os.symlink(root / "gone.png", root / "broken.png")
    os.symlink(root / "loop.png", root / "loop.png")
    os.symlink(root / "camera_42.png", root / "latest")  # no extension, image target
    os.symlink(root / "nowhere", root / "stale_link")  # neither: ignored, counted
    scan = scan_images(root)
    assert [p.relative_to(root).as_posix() for p in scan.images] == [
        "a.png", "broken.png", "latest", "loop.png", "sub/b.jpg"]
    assert sorted(p.name for p in scan.ignored) == ["anim.gif", "notes.txt", "stale_link"]
    assert list_images(root) == scan.images
    results = {Path(r.path).name: r for r in Predictor(model).predict_paths(root)}
    assert "broken symbolic link" in results["broken.png"].error
    assert "broken symbolic link" in results["latest"].error
    assert "loop" in results["loop.png"].error
    assert results["a.png"].error is None and results["b.jpg"].error is None
    out = tmp_path / "p.csv"
    assert main([str(model), str(root), str(good), "--out", str(out)]) == 3
    printed = capsys.readouterr()
    assert "5 images: 2 predicted, 3 could not be read," in printed.out
    assert "ignored 3 non-image files in the input folders" in printed.out
    assert "anim.gif" in printed.out and ".hidden" not in printed.out
    with out.open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5
    # A folder holding only non-images says what it skipped.
    only = tmp_path / "only"
    only.mkdir()
    (only / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(DeployError, match=r"no images found .*ignored 1 other file\(s\), e\.g\. a\.gif"):
        list_images(only)


def test_mean_std_of_a_float_input_vision_tl_model_are_not_replaced(tmp_path: Path):
    """A vision_tl export with float input records its normalisation: other values would shift
    every prediction, so they are refused; the recorded values themselves are accepted."""
    meta = make_metadata(layout="NCHW", input_dtype="float32", normalize_in_graph=False)
    model = build_model(tmp_path / "f.onnx", uint8=False, meta=meta)
    with pytest.raises(DeployError, match=r"records the normalisation .*mean \[.*--mean / --std"):
        Predictor(model, mean=(0.1, 0.1, 0.1), std=(0.9, 0.9, 0.9))
    with pytest.raises(DeployError, match=r"leave out mean= \(on the command line --mean\)$"):
        Predictor(model, mean=(0.1, 0.1, 0.1), std=STD)  # the std given is the recorded one: only mean is wrong
    assert Predictor(model, mean=MEAN, std=STD).metadata.mean == tuple(MEAN)


def test_predictions_never_replace_a_file_another_process_wrote_meanwhile(tmp_path):
    """predict-onnx checks --out at the start; a job that wrote the same file since (two jobs
    on one output) is kept unless --overwrite was given."""
    from vision_tl.deploy import cli as deploy_cli

    out = tmp_path / "pred.csv"

    def other_job_then_ours(fh):
        out.write_text("the other job's rows\n")
        fh.write("our rows\n")

    with pytest.raises(DeployError, match="written meanwhile by another process"):
        deploy_cli._write_atomic(out, other_job_then_ours, overwrite=False)
    assert out.read_text() == "the other job's rows\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pred.csv"]  # no temporary file left
    deploy_cli._write_atomic(out, other_job_then_ours, overwrite=True)
    assert out.read_text() == "our rows\n"


def test_a_vision_tl_model_with_damaged_metadata_says_to_export_it_again(tmp_path: Path, model: Path):
    """Arguments cannot stand in for what the model was trained and checked with: the message
    says to export again, and giving the value it names does not get past it."""
    damaged = onnx.load(str(model))
    for prop in damaged.metadata_props:
        if prop.key == "vision_tl.mean":
            prop.value = "[0.485, 0.456"  # cut short
    onnx.save(damaged, str(tmp_path / "damaged.onnx"))
    for kwargs in ({}, {"mean": MEAN}):
        with pytest.raises(DeployError, match=r"metadata is damaged \(invalid mean.*export the model again"):
            Predictor(tmp_path / "damaged.onnx", **kwargs)


def test_file_system_errors_are_error_rows_and_exit_2(tmp_path: Path, model: Path, images: list[Path], capsys):
    long_name = tmp_path / ("a" * 300 + ".png")  # longer than any file system allows
    rows = Predictor(model).predict_paths([images[0], long_name])
    assert rows[0].error is None and "too long" in rows[1].error
    assert main([str(model), str(images[0]), "--out", str(tmp_path / ("b" * 300 + ".csv"))]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_a_model_that_outputs_nan_is_refused_not_read_as_the_first_class(tmp_path: Path, images: list[Path], capsys):
    """A damaged model file gave NaN for every image; argmax read each as class 0 ('good'), exit 0."""
    damaged = onnx.load(str(build_model(tmp_path / "m.onnx", meta=make_metadata())))
    (weights,) = [init for init in damaged.graph.initializer if init.name == "W"]
    weights.CopyFrom(numpy_helper.from_array(np.full(WEIGHTS.shape, np.nan, np.float32), "W"))
    onnx.save(damaged, str(tmp_path / "m.onnx"))
    with pytest.raises(DeployError, match=r"m\.onnx: the model gave NaN or infinite outputs for 4 of 4 images"):
        Predictor(tmp_path / "m.onnx").predict_paths(images)
    assert main([str(tmp_path / "m.onnx"), *map(str, images), "--out", str(tmp_path / "p.csv")]) == 2
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


def test_a_model_that_differs_from_its_parity_record_is_refused(tmp_path: Path, model: Path, images: list[Path]):
    """model.parity.json records the sha256 of the model its export checked against PyTorch: a
    copy damaged on its way to the line is named instead of run."""
    import hashlib

    record = tmp_path / "model.parity.json"
    record.write_text(json.dumps({"passed": True, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}))
    Predictor(model).predict_paths(images)  # the model as checked
    record.write_text(json.dumps({"passed": True, "model_sha256": "0" * 64}))
    with pytest.raises(DeployError, match=r"model\.onnx: its content differs from the model model\.parity\.json"):
        Predictor(model)
    record.write_text("{not json")
    with pytest.warns(UserWarning, match=r"model\.parity\.json: unreadable .* not checked"):
        Predictor(model)
    # damaged in place at the same size, its times put back (cp -p, rsync -t --inplace): the
    # hash this process took of the good file no longer vouches for it
    import os

    record.write_text(json.dumps({"passed": True, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}))
    Predictor(model)
    times, data = model.stat(), bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    with open(model, "r+b") as fh:
        fh.write(bytes(data))
    os.utime(model, ns=(times.st_atime_ns, times.st_mtime_ns))
    with pytest.raises(DeployError, match="its content differs"):
        Predictor(model)


def test_a_model_opened_while_an_export_replaces_it_waits_for_the_new_record(tmp_path: Path, model: Path,
                                                                              images: list[Path], monkeypatch):
    """export renames the new model into place, then writes its record: a line PC that opened the
    model in between read a new model beside the old record and refused it as damaged."""
    import hashlib

    from vision_tl.deploy import predictor as predictor_module

    record = tmp_path / "model.parity.json"
    record.write_text(json.dumps({"passed": True, "model_sha256": "0" * 64}))  # the replaced model's
    pauses = []

    def export_finishes(seconds):  # the export writes the new model's record meanwhile
        pauses.append(seconds)
        record.write_text(json.dumps({"passed": True, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}))

    monkeypatch.setattr(predictor_module.time, "sleep", export_finishes)
    assert Predictor(model).predict_paths(images[:1])[0].error is None
    assert len(pauses) == 1


def test_a_float_input_graph_gets_trainings_normalised_pixels_to_the_last_bit(tmp_path: Path, images: list[Path]):
    """The predictor normalised as (x / 255 - mean) / std, training as (x - 255 mean) / (255 std)
    in float32: 1 ulp apart for most values (up to 5e-7), another input than the one validated."""
    pytest.importorskip("torch")
    from vision_tl.backbones import Preprocessing
    from vision_tl.data import eval_transform

    meta = make_metadata(layout="NCHW", input_dtype="float32", normalize_in_graph=False)
    predictor = Predictor(build_model(tmp_path / "f.onnx", uint8=False, meta=meta))
    transform = eval_transform(Preprocessing(SIZE, MEAN, STD, "bicubic"))
    for path in images:
        image = load_rgb(path)
        assert np.array_equal(predictor.preprocess(image), transform(image).numpy()), path.name


# ------------------------------------------------------- unfamiliar images


@pytest.mark.parametrize(("changes", "needle"), [
    ({"vision_tl.unfamiliar_threshold": "nan"}, "unfamiliar_threshold: expected a number from 0 to 2"),
    ({"vision_tl.unfamiliar_threshold": "-0.1"}, "unfamiliar_threshold: expected a number from 0 to 2"),
    ({"vision_tl.unfamiliar_threshold": "2.5"}, "unfamiliar_threshold: expected a number from 0 to 2"),
    ({"vision_tl.unfamiliar_threshold": "high"}, "unfamiliar_threshold: expected a number"),
    ({"vision_tl.unfamiliar_bank_images": "0"}, "unfamiliar_bank_images: expected a positive whole number"),
    ({"vision_tl.unfamiliar_val_images": "12.5"}, "unfamiliar_val_images: expected a positive whole number"),
    ({"vision_tl.unfamiliar_val_images": None}, "comes only with vision_tl.unfamiliar_val_images"),
])
def test_unfamiliar_metadata_is_validated_and_names_the_file(changes, needle):
    props = scored_metadata(0.3).to_props()
    assert ModelMetadata.from_props(props, "m.onnx") == scored_metadata(0.3)  # round trip
    for key, value in changes.items():
        if value is None:
            del props[key]
        else:
            props[key] = value
    with pytest.raises(MetadataError, match=needle) as info:
        ModelMetadata.from_props(props, "line3/m.onnx")
    assert "line3/m.onnx" in str(info.value)
    with pytest.raises(MetadataError):  # nor can an exporter write it
        scored_metadata(float("nan")).to_props()


def test_predictions_of_a_model_with_the_unfamiliarity_output(tmp_path: Path, images: list[Path], capsys):
    scores = [reference_unfamiliarity(load_rgb(p)) for p in images]
    threshold = float(np.median(scores))  # half the images above it
    model = build_scored_model(tmp_path / "s.onnx", scored_metadata(threshold, good_class="good", threshold=0.5))
    predictor = Predictor(model)
    assert predictor.scores_unfamiliarity
    results = predictor.predict_paths(images, batch_size=3)
    assert [r.unfamiliarity for r in results] == pytest.approx(scores, abs=1e-5)
    assert [r.unfamiliar for r in results] == [s > threshold for s in scores]
    assert sum(r.unfamiliar for r in results) == 2
    arrays = [load_rgb(p) for p in images]
    assert predictor.predict_arrays(arrays).shape == (4, 3)  # probabilities only, as before
    assert predictor.unfamiliarity_arrays(arrays, batch_size=3) == pytest.approx(scores, abs=1e-5)
    # predict-onnx: two more columns before error; JSON keys; the summary counts the flagged images
    (images[0].parent / "broken.png").write_bytes(b"garbage")
    assert main([str(model), str(images[0].parent), "--out", str(tmp_path / "p.csv")]) == 3
    out = capsys.readouterr().out
    assert "  unfamiliar (unlike every training image: check camera, lighting, product): 2 of 4" in out
    with (tmp_path / "p.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "predicted", "probability", "p_good", "p_scratch", "p_dent", "is_defect",
                             "unfamiliarity", "unfamiliar", "error"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.png"]["unfamiliarity"] == by_name["broken.png"]["unfamiliar"] == ""
    for path, score in zip(images, scores):
        row = by_name[path.name]
        assert float(row["unfamiliarity"]) == pytest.approx(score, abs=1e-5)
        assert row["unfamiliar"] == str(score > threshold).lower()
    assert main([str(model), *map(str, images), "--out", str(tmp_path / "p.json")]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert [d["unfamiliar"] for d in data] == [s > threshold for s in scores]
    assert set(data[0]) == {"path", "predicted", "probability", "probabilities", "is_defect", "error",
                            "unfamiliarity", "unfamiliar"}


def test_a_model_without_the_output_predicts_as_before(model: Path, images: list[Path], tmp_path: Path, capsys):
    predictor = Predictor(model)
    assert not predictor.scores_unfamiliarity
    result = predictor.predict_paths(images[:1])[0]
    assert result.unfamiliarity is None and result.unfamiliar is None
    assert "unfamiliar" not in result.to_dict(unfamiliar=False)
    with pytest.raises(DeployError, match="has no 'unfamiliarity' output"):
        predictor.unfamiliarity_arrays([load_rgb(images[0])])
    assert main([str(model), *map(str, images), "--out", str(tmp_path / "p.csv")]) == 0
    assert "unfamiliar" not in capsys.readouterr().out
    assert "unfamiliar" not in (tmp_path / "p.csv").read_text().splitlines()[0]


def test_a_threshold_without_the_output_is_refused(tmp_path: Path, images: list[Path]):
    """Metadata that promises the flag on a graph that cannot give it: every image would pass
    unflagged, silently."""
    damaged = build_model(tmp_path / "m.onnx", meta=scored_metadata(0.2))
    with pytest.raises(DeployError, match=r"m\.onnx: its metadata gives an unfamiliar_threshold, but the graph has "
                                          r"no 'unfamiliarity' output .*export the model again"):
        Predictor(damaged)
    # a graph that has it but whose metadata gives no threshold: scores, no flag
    unjudged = Predictor(build_scored_model(tmp_path / "u.onnx", make_metadata())).predict_paths(images[:1])[0]
    assert unjudged.unfamiliarity is not None and unjudged.unfamiliar is None


def test_nan_unfamiliarity_is_refused_not_passed_as_familiar(tmp_path: Path, images: list[Path]):
    model = build_scored_model(tmp_path / "m.onnx", scored_metadata(0.2), bank=np.full((3, 3), np.nan, np.float32))
    with pytest.raises(DeployError, match="NaN or infinite unfamiliarity scores for 4 of 4 images"):
        Predictor(model).predict_paths(images)


def test_another_models_output_named_unfamiliarity_of_another_shape_is_not_read(tmp_path: Path, images: list[Path]):
    """A model not exported with the score (no unfamiliar_threshold) whose second output happens
    to be called 'unfamiliarity' but is not [N] predicts as it did before that output existed;
    one whose metadata gives the threshold is still refused."""
    path = build_model(tmp_path / "m.onnx", meta=make_metadata())
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("Identity", ["feat"], ["unfamiliarity"]))
    model.graph.output.append(helper.make_tensor_value_info("unfamiliarity", TensorProto.FLOAT, ["N", 3]))
    onnx.save(model, str(path))
    predictor = Predictor(path)
    assert not predictor.scores_unfamiliarity
    result = predictor.predict_paths(images[:1])[0]
    assert result.probabilities == pytest.approx(dict(zip(CLASSES, reference(load_rgb(images[0])))), abs=1e-5)
    helper.set_model_props(model, make_metadata(unfamiliar_threshold=0.5, unfamiliar_bank_images=3,
                                                unfamiliar_val_images=9).to_props())
    onnx.save(model, str(path))
    with pytest.raises(DeployError, match=r"output 'unfamiliarity' has shape \['N', 3\]; expected \[N\]"):
        Predictor(path)
