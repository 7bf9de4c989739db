"""End to end: `vision-tl fit` (tiny model) -> `vision-tl export` -> onnxruntime / `predict-onnx`."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vision_tl import __version__
from vision_tl.cli import main as vision_tl
from vision_tl.deploy import Predictor, read_metadata
from vision_tl.export import ExportOptions, export_onnx
from vision_tl.export import parity as parity_module
from vision_tl.export.cli import main as export_main
from vision_tl.export.parity import split_images
from vision_tl.imaging import load_rgb, resize
from vision_tl.tasks.checkpoint import load_classifier

pytestmark = pytest.mark.slow
TINY = "test_efficientnet"


@pytest.fixture(scope="session")
def trained_run(inspection_folder, tmp_path_factory) -> Path:
    """A one-epoch tiny-model run directory (checkpoints/best.ckpt, split.json)."""
    runs = tmp_path_factory.mktemp("runs")
    rc = vision_tl([
        "fit", "--config", str(Path(__file__).parents[2] / "configs" / "frozen.yaml"),
        "--data.root", str(inspection_folder), "--data.num_workers", "0",
        "--data.batch_size", "16", "--model.backbone", TINY, "--model.pretrained", "false",
        "--model.image_size", "32", "--model.lr", "0.05", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs),
    ])
    assert rc in (0, None)
    (ckpt,) = runs.glob("frozen/version_*/checkpoints/best.ckpt")
    return ckpt.parents[1]


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out)]) == 0
    return out


def test_export_writes_a_checked_model_with_metadata(exported, trained_run):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    _, meta = load_classifier(trained_run / "checkpoints" / "best.ckpt")
    m = read_metadata(exported)
    assert m.classes == meta["classes"] == ["crack", "good", "scratch", "spot"]
    assert m.input_size == (32, 32) and m.layout == "NHWC" and m.input_dtype == "uint8"
    assert m.normalize_in_graph and m.interpolation == meta["preprocessing"]["interpolation"]
    assert list(m.mean) == pytest.approx(meta["preprocessing"]["mean"])
    assert m.backbone == TINY and m.kit_version == __version__
    assert m.metrics == meta["metrics"]
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (inp,), (out, scores) = session.get_inputs(), session.get_outputs()  # (the second: unfamiliarity)
    assert scores.name == "unfamiliarity" and scores.shape == [out.shape[0]]
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(uint8)", [32, 32, 3])
    assert isinstance(inp.shape[0], str) and out.name == "probabilities"
    for batch in (1, 5):  # dynamic batch axis
        x = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        probs = session.run(["probabilities"], {"image": x})[0]
        assert probs.shape == (batch, 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_parity_report_beside_the_model(exported):
    report = json.loads(exported.with_name("model.parity.json").read_text())
    assert report["passed"] is True and report["max_abs_diff"] <= 1e-4
    assert report["top1_agreement"] == 1.0 and report["n_images"] == 8
    assert "val split" in report["images"]
    # the model's threshold at the top, as a copy's report has its own
    assert report["unfamiliar_threshold"] == read_metadata(exported).unfamiliar_threshold is not None


def test_calibration_dir_gives_the_unfamiliarity_bank_without_int8(trained_run, inspection_folder, tmp_path, capsys):
    """The note of a run whose training images are gone said to pass --int8 --calibration-dir, and
    --calibration-dir alone was refused: the output could not be had without an INT8 copy."""
    ckpt = str(trained_run / "checkpoints" / "best.ckpt")
    train = tmp_path / "train"
    for image in sorted(inspection_folder.glob("*/*.png"))[::3]:
        (train / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, train / image.parent.name / image.name)
    assert export_main([ckpt, "--out", str(tmp_path / "m.onnx"), "--calibration-dir", str(train)]) == 0
    assert read_metadata(tmp_path / "m.onnx").unfamiliar_bank_images == len(list(train.glob("*/*.png")))
    capsys.readouterr()
    assert export_main([ckpt, "--out", str(tmp_path / "n.onnx"), "--calibration-dir", str(train),
                        "--no-unfamiliar"]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_predict_onnx_round_trip_matches_pytorch(exported, trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    model, meta = load_classifier(ckpt)
    val = split_images(ckpt, "val", meta["classes"])
    out = tmp_path / "p.csv"
    assert vision_tl(["predict-onnx", str(exported), *map(str, val.paths), "--out", str(out)]) == 0
    rows = {r["path"]: r["predicted"] for r in csv.DictReader(out.open())}
    pre = read_metadata(exported)
    x = torch.stack([
        torch.from_numpy(
            ((resize(load_rgb(p), pre.input_size, pre.interpolation) / 255.0 - pre.mean) / pre.std)
            .astype(np.float32).transpose(2, 0, 1))
        for p in val.paths
    ])
    with torch.no_grad():
        torch_pred = model(x).argmax(dim=1).tolist()
    assert [rows[str(p)] for p in val.paths] == [meta["classes"][i] for i in torch_pred]


def test_float_input_variant(trained_run, tmp_path):
    out = tmp_path / "f.onnx"
    rc = export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out),
                      "--no-normalize-in-graph", "--opset", "17"])
    assert rc == 0
    m = read_metadata(out)
    assert (m.layout, m.input_dtype, m.normalize_in_graph) == ("NCHW", "float32", False)
    assert Predictor(out).predict_arrays([np.zeros((40, 50, 3), np.uint8)]).shape == (1, 4)


def test_int8_and_fp16_variants_report_accuracy_and_speed(trained_run, tmp_path, capsys, monkeypatch):
    from vision_tl.export import pipeline

    listed = []  # the training images (each file's sha256 checked) serve calibration and the bank: read once
    real = pipeline.split_images
    monkeypatch.setattr(pipeline, "split_images", lambda *a, **k: listed.append(a[1]) or real(*a, **k))
    out = tmp_path / "m.onnx"
    rc = export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out),
                      "--int8", "--fp16", "--calibration-images", "16", "--threads", "1",
                      "--max-accuracy-drop", "100"])
    assert rc == 0, capsys.readouterr().err
    for variant in ("int8", "fp16"):
        report = json.loads((tmp_path / f"m.{variant}.parity.json").read_text())
        assert report["accuracy_change_points"] is not None
        assert set(report["speed"]["variant"]) == {"latency_b1_ms", "throughput_b32_ips"}
        assert read_metadata(tmp_path / f"m.{variant}.onnx").classes == read_metadata(out).classes
    int8 = onnx.load(str(tmp_path / "m.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    details = json.loads((tmp_path / "m.int8.parity.json").read_text())["details"]
    err = capsys.readouterr().err
    assert details["calibration_images_used"] == 16 and "train split" in err
    assert listed.count("train") == 1
    assert "are among its" not in err  # train and val share no image


def test_calibrating_on_the_images_the_copy_is_checked_on_is_warned_about(trained_run, inspection_folder, tmp_path,
                                                                         capsys):
    """--calibration-dir given the whole labelled folder (val images too): the INT8 check then
    measures the copy on images it was calibrated on, which flatters it."""
    rc = export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "m.onnx"), "--int8",
                      "--calibration-dir", str(inspection_folder), "--threads", "1", "--max-accuracy-drop", "100"])
    assert rc == 0
    err = capsys.readouterr().err
    shared = re.search(r"WARNING: (\d+) of the (\d+) images the INT8 copy is checked on are among its", err)
    assert shared and shared[1] == shared[2]  # (every val image: the folder holds them all)
    assert "calibrate on training images only" in err


def test_parity_failure_fails_loudly_and_writes_nothing(trained_run, tmp_path, monkeypatch, capsys):
    real = parity_module.onnx_outputs

    def skewed(path, pixels, batch_size=32):
        probs, scores = real(path, pixels, batch_size)
        return probs[:, ::-1].copy(), scores  # what a channel-order or class-order bug would look like

    monkeypatch.setattr(parity_module, "onnx_outputs", skewed)
    out = tmp_path / "bad.onnx"
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "parity check failed" in err and "top-1 agreement" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parity-failed.json"]
    # Over an earlier export (--overwrite), a failed one leaves that model and its report alone.
    (tmp_path / "bad.onnx").write_bytes(b"the model on the line")
    (tmp_path / "bad.parity.json").write_text('{"passed": true}')
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out), "--overwrite"]) == 1
    assert out.read_bytes() == b"the model on the line"
    assert (tmp_path / "bad.parity.json").read_text() == '{"passed": true}'


def test_interrupted_export_leaves_no_file(trained_run, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vision_tl.export.pipeline.check_parity", killed)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(trained_run / "checkpoints" / "best.ckpt", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_from_another_kit_version(trained_run, tmp_path, capsys):
    ckpt = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["vision_tl"]["kit_version"] = "0.0.1"
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    rc = export_main([str(old), "--out", str(tmp_path / "m.onnx"), "--parity-images",
                      str(split_images(trained_run / "checkpoints" / "best.ckpt", "val",
                                       ckpt["vision_tl"]["classes"]).paths[0].parent)])
    assert rc == 0
    assert f"{old} was written by vision_tl 0.0.1, this is vision_tl {__version__}" in (
        capsys.readouterr().err)
    assert read_metadata(tmp_path / "m.onnx").kit_version == "0.0.1"


@pytest.mark.parametrize("case, expected", [
    ("not_a_checkpoint", "is not a PyTorch checkpoint"),
    ("onnx_as_checkpoint", "is not a PyTorch checkpoint (an ONNX model"),
    ("missing", "does not exist"),
    ("no_split", "--parity-images DIR"),
    ("empty_folder", "no images found"),
    ("exists", "pass --overwrite"),
    ("opset", "expected an integer from 13 to 20"),
    ("stale_report", "already exists (the check report of an earlier export)"),
    ("fp16_float_input", "--fp16 needs the default uint8 input"),
    ("parity_file", "is a file; give a folder of images"),
    ("drop_without_variant", "--max-accuracy-drop applies only with --int8 or --fp16"),
    ("changes_without_variant", "--max-decision-changes applies only with --int8 or --fp16"),
    ("default_changes_without_variant", "--max-decision-changes applies only with --int8 or --fp16"),
    ("changes_not_a_percentage", "--max-decision-changes must be a percentage of the check images (0 to 100)"),
])
def test_bad_input_exits_2_with_a_message_naming_it(case, expected, trained_run, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    out, extra = tmp_path / "m.onnx", []
    if case == "not_a_checkpoint":
        ckpt = tmp_path / "notes.ckpt"
        ckpt.write_text("hello")
    elif case == "onnx_as_checkpoint":  # a model exported earlier, handed back by mistake
        ckpt = tmp_path / "model.onnx"
        ckpt.write_bytes(b"\x08\x08\x12\x07pytorch")  # a protobuf start, as ONNX files have
    elif case == "missing":
        ckpt = tmp_path / "nope.ckpt"
    elif case == "no_split":
        ckpt = Path(shutil.copy(ckpt, tmp_path / "lonely.ckpt"))
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        extra = ["--parity-images", str(tmp_path / "empty")]
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "stale_report":  # a report left by an earlier export must not end up beside a new model
        (tmp_path / "m.parity.json").write_text("{}")
    elif case == "fp16_float_input":
        extra = ["--fp16", "--no-normalize-in-graph"]
    elif case == "parity_file":
        (tmp_path / "fit.log").write_text("epoch 1")
        extra = ["--parity-images", str(tmp_path / "fit.log")]
    elif case == "drop_without_variant":
        extra = ["--max-accuracy-drop", "2"]
    elif case == "changes_without_variant":
        extra = ["--max-decision-changes", "2"]
    elif case == "default_changes_without_variant":  # the default value, given: still refused without a variant
        extra = ["--max-decision-changes", "0.5"]
    elif case == "changes_not_a_percentage":
        extra = ["--fp16", "--max-decision-changes", "nan"]
    else:
        extra = ["--opset", "9"]
    assert export_main([str(ckpt), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    if case in ("not_a_checkpoint", "onnx_as_checkpoint", "missing", "no_split"):
        assert str(ckpt) in err
    assert not out.exists() or out.read_bytes() == b"keep me"


def test_overwrite_replaces_the_old_reports_and_the_report_names_its_model(trained_run, tmp_path, capsys):
    from vision_tl.utils.files import file_sha256

    out = tmp_path / "m.onnx"
    out.write_bytes(b"an older model")
    (tmp_path / "m.parity-failed.json").write_text('{"passed": false}')
    (tmp_path / "m.parity.json").write_text('{"passed": true, "model": "the older model"}')
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out), "--overwrite"]) == 0
    assert not (tmp_path / "m.parity-failed.json").exists()
    report = json.loads((tmp_path / "m.parity.json").read_text())
    assert report["model_sha256"] == file_sha256(out)
    said = capsys.readouterr()
    assert f"removed {tmp_path / 'm.parity-failed.json'} (the check report of an earlier export)" in said.out + said.err
    # Replaced again without a check: no report at all rather than one about another model.
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out), "--overwrite",
                        "--parity-images", "none"]) == 0
    assert not (tmp_path / "m.parity.json").exists()
    said = capsys.readouterr()
    assert f"removed {tmp_path / 'm.parity.json'} (the check report of an earlier export)" in said.out + said.err


def test_an_earlier_exports_variant_is_not_left_beside_a_new_model(trained_run, tmp_path, capsys):
    """m.int8.onnx and its report from an earlier export (maybe of another model) would pass for
    the new m.onnx's INT8 twin: refused, then removed with --overwrite."""
    out = tmp_path / "m.onnx"
    (tmp_path / "m.int8.onnx").write_bytes(b"an older model's INT8 variant")
    (tmp_path / "m.int8.parity.json").write_text('{"passed": true}')
    ckpt = str(trained_run / "checkpoints" / "best.ckpt")
    assert export_main([ckpt, "--out", str(out)]) == 2
    assert "m.int8.onnx" in capsys.readouterr().err and not out.exists()
    assert export_main([ckpt, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.parity.json"]


def test_a_failed_variant_exits_3_and_keeps_the_passed_model(trained_run, tmp_path, monkeypatch, capsys):
    from vision_tl.export import pipeline

    real = pipeline.compare

    def half_as_accurate(*args, **kwargs):  # only the variant's check goes through pipeline.compare
        report = real(*args, **kwargs)
        report.accuracy_model = report.accuracy_reference - 0.5
        return report

    monkeypatch.setattr(pipeline, "compare", half_as_accurate)
    out = tmp_path / "m.onnx"
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out), "--fp16"]) == 3
    err = capsys.readouterr().err
    assert "variant rejected" in err and f"The fp32 model {out} passed its check and was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.parity-failed.json", "m.onnx", "m.parity.json"]


def test_a_rejected_variant_over_an_earlier_export_leaves_no_old_variant(trained_run, tmp_path, monkeypatch, capsys):
    """--overwrite over an export that has m.fp16.onnx: once the new m.onnx is in place, the
    earlier m.fp16.onnx and its report describe another model. Should the new variant fail its
    check (or be interrupted), they must not remain beside the new model as its twin."""
    from vision_tl.export import pipeline

    out, ckpt = tmp_path / "m.onnx", str(trained_run / "checkpoints" / "best.ckpt")
    (tmp_path / "m.onnx").write_bytes(b"an older model")
    (tmp_path / "m.fp16.onnx").write_bytes(b"the older model's FP16 variant")
    (tmp_path / "m.fp16.parity.json").write_text('{"passed": true}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "convert_fp16", interrupted)
    assert export_main([ckpt, "--out", str(out), "--fp16", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.parity.json"]
    assert out.read_bytes() != b"an older model"
    assert f"interrupted after it wrote {out}; removed {tmp_path / 'm.fp16.onnx'}" in err


def test_split_root_holding_other_images_is_refused(trained_run, tmp_path, capsys):
    """A data root that has the split's file names but not its files (sha256) is not used."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record = json.loads((run / "split.json").read_text())
    record["val"][0]["sha256"] = "0" * 64
    (run / "split.json").write_text(json.dumps(record))
    assert export_main([str(run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and record["val"][0]["path"] in err and "--parity-images DIR" in err
    assert not (tmp_path / "m.onnx").exists()


def test_run_on_a_train_val_layout_checks_against_root_val(trained_run, inspection_folder, tmp_path):
    """Without split.json (the folder had its own val/), parity uses ROOT/val/ from config.yaml."""
    data = tmp_path / "data"
    for path in sorted(inspection_folder.glob("*/*.png"))[::4]:
        (data / "val" / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, data / "val" / path.parent.name / path.name)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "split.json").unlink()
    (run / "config.yaml").write_text(f"data:\n  root: {data}\n")
    out = tmp_path / "m.onnx"
    assert export_main([str(run / "checkpoints" / "best.ckpt"), "--out", str(out)]) == 0
    report = json.loads((tmp_path / "m.parity.json").read_text())
    assert str(data / "val") in report["images"] and report["n_images"] == len(list(data.glob("val/*/*.png")))


def test_parity_none_skips_loudly(trained_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out),
                        "--parity-images", "none"]) == 0
    assert "NOT checked" in capsys.readouterr().err
    assert out.exists() and not (tmp_path / "m.parity.json").exists()


def test_help_has_an_example(capsys):
    assert export_main(["--help"]) == 0
    assert "vision-tl export runs/" in capsys.readouterr().out


def test_non_square_input_from_the_command_line_reaches_the_onnx_model(inspection_folder, tmp_path):
    """`--model.image_size [H, W]` trains, checkpoints, exports and predicts at H x W (not W x H)."""
    rc = vision_tl([
        "fit", "--config", str(Path(__file__).parents[2] / "configs" / "frozen.yaml"),
        "--data.root", str(inspection_folder), "--data.num_workers", "0", "--data.batch_size", "16",
        "--model.backbone", TINY, "--model.pretrained", "false", "--model.image_size", "[32, 48]",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ])
    assert rc in (0, None)
    ckpt = tmp_path / "runs" / "frozen" / "version_0" / "checkpoints" / "best.ckpt"
    _, meta = load_classifier(ckpt)
    assert meta["preprocessing"]["input_size"] == [32, 48]
    out = tmp_path / "wide.onnx"
    assert export_main([str(ckpt), "--out", str(out)]) == 0
    predictor = Predictor(out)
    assert read_metadata(out).input_size == (32, 48)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [32, 48, 3]
    image = next(inspection_folder.glob("good/*.png"))
    (pred,) = predictor.predict_paths([image])
    assert pred.error is None and pred.predicted in meta["classes"]


def test_variant_report_counts_changed_good_defect_decisions(trained_run, tmp_path, monkeypatch, capsys):
    """With a threshold, a variant's report says on how many images pass/reject flipped."""
    from vision_tl.export import pipeline

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["vision_tl"].update(good_class="good", threshold=0.25)
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    args = [str(run / "checkpoints" / "best.ckpt"), "--fp16", "--max-accuracy-drop", "100"]
    assert export_main([*args, "--out", str(tmp_path / "a.onnx")]) == 0
    assert json.loads((tmp_path / "a.fp16.parity.json").read_text())["decision_changes"] == 0
    real = pipeline.onnx_outputs

    def shifted(path, pixels, batch_size=32):  # P(good) moved across the threshold
        probs, scores = real(path, pixels, batch_size)
        probs[:, 1] = np.where(probs[:, 1] >= 0.25, 0.0, 1.0)
        return probs, scores

    monkeypatch.setattr(pipeline, "onnx_outputs", shifted)
    capsys.readouterr()
    # by default a copy that flips more than 0.5 % of the decisions is refused (exit 3, the fp32 model stays)
    assert export_main([*args, "--out", str(tmp_path / "b.onnx")]) == 3
    assert (tmp_path / "b.onnx").exists() and not (tmp_path / "b.fp16.onnx").exists()
    failed = json.loads((tmp_path / "b.fp16.parity-failed.json").read_text())
    assert failed["decision_changes"] == failed["n_images"] > 0
    assert failed["criteria"]["max_decision_changes_percent"] == 0.5
    err = capsys.readouterr().err
    assert "(--max-decision-changes)" in err and "so it was not written" in err
    assert "predict-onnx b.fp16.onnx" not in err  # no advice to check a file that does not exist
    # knowingly allowed: written, with the warning and advice a user can run on an ONNX copy
    assert export_main([*args, "--max-decision-changes", "100", "--out", str(tmp_path / "c.onnx")]) == 0
    report = json.loads((tmp_path / "c.fp16.parity.json").read_text())
    assert report["decision_changes"] == report["n_images"] > 0 and report["passed"]
    err = capsys.readouterr().err
    assert "WARNING: good/defect decision (P(good) >= 0.25) changed on" in err
    assert "vision-tl predict-onnx c.fp16.onnx <folder>" in err


def test_an_int8_copy_onnxruntime_cannot_run_exits_3_named_by_its_final_name_and_fp16_is_still_made(
        trained_run, tmp_path, monkeypatch, capsys):
    """The quantizer can make a graph onnxruntime then refuses (timm's dynamic padding at small
    inputs): that is a failed variant (exit 3: the fp32 model was written), named by the file
    the user asked for, and the FP16 copy is still made and checked."""
    from vision_tl.deploy import DeployError
    from vision_tl.export import pipeline

    real = pipeline.onnx_outputs

    def refuses_int8(model, pixels):
        if ".int8." in Path(model).name:
            raise DeployError(f"{model}: inference failed (QLinearConv: Invalid input shape)")
        return real(model, pixels)

    monkeypatch.setattr(pipeline, "onnx_outputs", refuses_int8)
    out = tmp_path / "m.onnx"
    rc = export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out), "--int8", "--fp16",
                      "--calibration-images", "8", "--max-accuracy-drop", "100"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"{tmp_path / 'm.int8.onnx'}: the INT8 copy could not be made or run" in err and ".tmp" not in err
    assert f"The fp32 model {out} passed its check and was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.fp16.onnx", "m.fp16.parity.json", "m.onnx", "m.parity.json"]


@pytest.mark.parametrize("argv, message", [
    (["--int8", "--calibration-percentile", "0"], "percentile must be in (90, 100], got 0"),
    (["--int8", "--calibration-method", "minmax", "--calibration-percentile", "99.9"],
     "--calibration-percentile applies only with --calibration-method percentile"),
])
def test_calibration_percentile_is_never_silently_replaced(argv, message, trained_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_copy_whose_record_cannot_be_written_is_not_left_under_its_name(trained_run, tmp_path, monkeypatch, capsys):
    """The FP16 copy was moved to its final name before its .parity.json was written: a failure
    there (a full disk) left a copy that Predictor would run with no check on record."""
    from vision_tl.export import pipeline

    real = pipeline.write_json_atomic

    def disk_full_for_the_copy(path, *args, **kwargs):
        if Path(path).name.startswith("m.fp16."):
            raise OSError(28, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_json_atomic", disk_full_for_the_copy)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(trained_run / "checkpoints" / "best.ckpt", tmp_path / "m.onnx", ExportOptions(fp16=True),
                    log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.parity.json"]


# ------------------------------------------------------------------ unfamiliar images


def test_the_export_scores_unfamiliarity_with_a_threshold_from_the_validation_images(exported, trained_run,
                                                                                      tmp_path, capsys):
    """The threshold is the highest score of the check's validation images (none of them in the
    bank of training images), so none of them is flagged; the report compares the score with
    PyTorch's."""
    from vision_tl.export.parity import decode

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    meta = read_metadata(exported)
    train, val = (split_images(ckpt, split, meta.classes) for split in ("train", "val"))
    assert (meta.unfamiliar_bank_images, meta.unfamiliar_val_images) == (len(train.paths), len(val.paths)) == (40, 8)
    predictor = Predictor(exported)
    scores = predictor.unfamiliarity_arrays(decode(val, meta).pixels)
    assert meta.unfamiliar_threshold == float(scores.max()) > 0
    assert predictor.unfamiliarity_arrays(decode(train, meta).pixels).max() < 1e-4  # the bank's own images
    report = json.loads(exported.with_name("model.parity.json").read_text())
    assert report["unfamiliarity_max_abs_diff"] <= 1e-4 and report["criteria"]["max_unfamiliarity_diff"] == 1e-4
    assert report["details"]["unfamiliar"]["threshold"] == meta.unfamiliar_threshold
    out = tmp_path / "p.csv"
    assert vision_tl(["predict-onnx", str(exported), *map(str, val.paths), "--out", str(out)]) == 0
    assert "unfamiliar (unlike every training image: check camera, lighting, product): 0 of 8" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [r["unfamiliar"] for r in rows] == ["false"] * 8 and all(float(r["unfamiliarity"]) >= 0 for r in rows)


def test_an_onnx_unfamiliarity_unlike_pytorchs_fails_the_check(trained_run, tmp_path, monkeypatch, capsys):
    real = parity_module.onnx_outputs

    def shifted(path, pixels, batch_size=32):
        probs, scores = real(path, pixels, batch_size)
        return probs, scores + np.float32(1e-3)

    monkeypatch.setattr(parity_module, "onnx_outputs", shifted)
    assert export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "max |Δunfamiliarity| 1.00e-03 > 0.0001" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parity-failed.json"]


def test_no_unfamiliar_and_exports_without_the_images_for_it_leave_it_out(trained_run, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    assert export_main([str(ckpt), "--out", str(tmp_path / "off.onnx"), "--no-unfamiliar"]) == 0
    assert "unfamiliarity" not in capsys.readouterr().err
    assert export_main([str(ckpt), "--out", str(tmp_path / "none.onnx"), "--parity-images", "none"]) == 0
    assert "note: no 'unfamiliarity' output" in capsys.readouterr().err
    run = tmp_path / "run"  # a run whose split.json lists no training images
    shutil.copytree(trained_run, run)
    split = json.loads((run / "split.json").read_text())
    split["train"] = []
    (run / "split.json").write_text(json.dumps(split))
    assert export_main([str(run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "untrained.onnx")]) == 0
    err = capsys.readouterr().err
    assert "note: no 'unfamiliarity' output" in err and "datamodule.save_split(" in err
    for name in ("off", "none", "untrained"):
        model = tmp_path / f"{name}.onnx"
        assert [o.name for o in onnx.load(str(model)).graph.output] == ["probabilities"]
        assert read_metadata(model).unfamiliar_threshold is None
    out = tmp_path / "p.csv"
    val = split_images(ckpt, "val", read_metadata(tmp_path / "off.onnx").classes)
    assert vision_tl(["predict-onnx", str(tmp_path / "off.onnx"), *map(str, val.paths), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "path,predicted,probability,p_crack,p_good,p_scratch,p_spot,is_defect,error"
    assert "unfamiliar (" not in capsys.readouterr().out


def test_an_int8_copy_gets_its_own_threshold_and_reports_how_far_its_scores_moved(trained_run, tmp_path, capsys,
                                                                                   monkeypatch):
    from vision_tl.export import pipeline

    monkeypatch.setattr(pipeline, "VARIANT_WARN_THRESHOLD_RATIO", 0.0)  # any copy's threshold is "far" above
    out = tmp_path / "m.onnx"
    rc = export_main([str(trained_run / "checkpoints" / "best.ckpt"), "--out", str(out), "--int8",
                      "--calibration-images", "16", "--threads", "1", "--max-accuracy-drop", "100"])
    assert rc == 0, capsys.readouterr().err
    fp32, int8 = read_metadata(out), read_metadata(tmp_path / "m.int8.onnx")
    report = json.loads((tmp_path / "m.int8.parity.json").read_text())
    assert report["reference_unfamiliar_threshold"] == fp32.unfamiliar_threshold
    assert report["unfamiliar_threshold"] == int8.unfamiliar_threshold
    assert "max_unfamiliar_threshold_ratio" not in report["criteria"]  # (a warning, never a refusal)
    assert 0 < report["unfamiliarity_max_abs_diff"] < 0.1 * fp32.unfamiliar_threshold + 0.05
    assert int8.unfamiliar_val_images == fp32.unfamiliar_val_images == 8
    err = capsys.readouterr().err
    assert "its own threshold" in err
    assert "WARNING: m.int8.onnx: its unfamiliarity threshold" in err and "deploy the fp32 model" in err


def test_check_images_all_in_the_bank_but_an_unreadable_one_give_no_output_rather_than_a_crash(
        trained_run, tmp_path, capsys):
    """Each readable check image is a training image (its sha256 is a bank image's) and the one
    that is not cannot be read: no image can set the threshold. The model is written without
    the output, with a line saying why, as when every check image is a bank image."""
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    train = split_images(ckpt, "train", json.loads((trained_run / "labels.json").read_text()))
    check = tmp_path / "check" / "good"
    check.mkdir(parents=True)
    for path in train.paths[:3]:
        shutil.copy(path, check / path.name)
    (check / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "m.onnx"
    assert export_main([str(ckpt), "--out", str(out), "--parity-images", str(tmp_path / "check")]) == 0
    err = capsys.readouterr().err
    assert "note: no 'unfamiliarity' output: the 3 check images that could be read are all training images" in err
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["probabilities"]
    assert read_metadata(out).unfamiliar_threshold is None
    report = json.loads((tmp_path / "m.parity.json").read_text())
    assert report["passed"] and report["unfamiliarity_max_abs_diff"] is None and "unfamiliar" not in report["details"]


def test_check_images_that_copy_training_pixels_in_other_bytes_do_not_set_the_threshold(trained_run, tmp_path,
                                                                                         capsys):
    """Training images saved again (other bytes, the same pixels) passed as validation images: their
    scores of 0 set a threshold of 0 and nearly every new image would have been flagged."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    classes = json.loads((trained_run / "labels.json").read_text())
    train = split_images(ckpt, "train", classes)
    val = split_images(ckpt, "val", classes)
    check = tmp_path / "check"
    for path in train.paths[:3]:  # pixel copies with a text chunk: another sha256
        (check / path.parent.name).mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        info.add_text("note", "saved again")
        Image.open(path).save(check / path.parent.name / f"copy_{path.name}", pnginfo=info)
    for path in val.paths[:2]:
        (check / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, check / path.parent.name / path.name)
    out = tmp_path / "m.onnx"
    assert export_main([str(ckpt), "--out", str(out), "--parity-images", str(check)]) == 0
    meta = read_metadata(out)
    assert meta.unfamiliar_val_images == 2 and meta.unfamiliar_threshold > 1e-3
    assert "3 check images that are training images or copies of their pixels were left out" in capsys.readouterr().err
