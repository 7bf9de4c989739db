"""`vision-tl report | compare | explain` and the test-time report, on a tiny trained run."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vision_tl.cli import main
from vision_tl.tasks import load_classifier
from vision_tl.tasks.checkpoint import read_checkpoint

TINY_ARGS = ["--model.backbone", "test_efficientnet", "--model.pretrained", "false", "--model.image_size", "32",
             "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_epochs", "2",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FIGURES = ("confusion_matrix_val.png", "per_class_val.png", "roc_pr_val.png", "reliability_val.png",
           "threshold_val.png", "operating_curve_val.png", "error_gallery_val.png")


@pytest.fixture(scope="module")
def run(inspection_folder, tmp_path_factory) -> Path:
    """A fitted run whose threshold is chosen during fit (false_reject:0.5), then reported."""
    root = tmp_path_factory.mktemp("report_runs")
    assert main(["fit", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(inspection_folder),
                 *TINY_ARGS, "--trainer.logger.init_args.save_dir", str(root), "--data.good_class", "good",
                 "--model.threshold_target", "false_reject:0.5"]) == 0
    run = root / "partial" / "version_0"
    assert main(["report", str(run), "--target-escape", "0.2"]) == 0
    return run


def test_fit_stores_the_threshold_it_chose_on_validation(run):
    meta = read_checkpoint(run / "checkpoints" / "best.ckpt")["vision_tl"]
    assert meta["threshold_target"] == "false_reject:0.5" and 0.0 <= meta["threshold"] <= 1.0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["threshold"] == pytest.approx(meta["threshold"])  # the best epoch's own threshold
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]


def test_report_writes_everything_and_keeps_metrics_json(run):
    for name in ("report.html", "predictions.csv", *FIGURES):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert "history" in metrics and "val" in metrics  # fit's keys survive the read-modify-write
    report = metrics["report"]["val"]
    assert set(metrics["figures"].values()) >= {*FIGURES, "report.html"}
    assert report["summary"]["images"] == len(json.loads((run / "split.json").read_text())["val"])
    assert report["good_vs_defect"]["escape_rate"] <= 0.2
    json.dumps(metrics, allow_nan=False)
    header = (run / "predictions.csv").read_text().splitlines()[0]
    assert header == "path,true,predicted,probability,p_crack,p_good,p_scratch,p_spot,is_defect"
    rows = list(csv.DictReader(io.StringIO((run / "predictions.csv").read_text())))
    threshold = metrics["report"]["val"]["good_vs_defect"]["threshold"]
    assert rows
    for row in rows:  # the threshold on P(good) that the report chose decides each image
        if abs(float(row["p_good"]) - threshold) > 1e-5:  # (the CSV rounds to 6 decimals)
            assert row["is_defect"] == str(float(row["p_good"]) < threshold).lower()


def test_report_saves_the_threshold_into_a_copy_that_loads_weights_only(run):
    original = read_checkpoint(run / "checkpoints" / "best.ckpt")["vision_tl"]["threshold"]
    model, meta = load_classifier(run / "checkpoints" / "best.thresholded.ckpt")  # weights_only=True inside
    report = json.loads((run / "metrics.json").read_text())["report"]["val"]
    assert meta["threshold"] == pytest.approx(report["good_vs_defect"]["threshold"])
    assert meta["threshold_choice"]["target"] == "escape:0.2" and model.threshold == meta["threshold"]
    assert read_checkpoint(run / "checkpoints" / "best.ckpt")["vision_tl"]["threshold"] == original
    # the copy's validation figures (exported into the ONNX metadata) describe its own threshold,
    # not the one fit chose for false_reject:0.5
    assert meta["threshold_target"] == "escape:0.2"
    chosen = report["good_vs_defect"]
    assert meta["metrics"]["val"]["threshold"] == pytest.approx(chosen["threshold"])
    assert meta["metrics"]["val"]["escape_rate"] == pytest.approx(chosen["escape_rate"])
    assert meta["metrics"]["val"]["false_reject_rate"] == pytest.approx(chosen["false_reject_rate"])


def test_a_report_into_a_run_it_cannot_write_stops_before_predicting(run, monkeypatch):
    import tempfile

    from vision_tl.reports.report import ReportError, report_run

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr("vision_tl.reports.report.predict_probabilities", lambda *a, **k: pytest.fail("predicted"))
    with pytest.raises(ReportError, match=rf"cannot write the report into {run} \(Permission denied\)"):
        report_run(run, overwrite=True)


def test_reports_of_one_run_take_turns_and_keep_each_others_metrics(run, tmp_path, monkeypatch):
    """Two reports at once wrote files of different thresholds; one started while another (or fit)
    wrote metrics.json lost that write, as it wrote back what it had read at its start."""
    from vision_tl.reports import report as report_module
    from vision_tl.reports.report import ReportError, report_run
    from vision_tl.utils.files import path_lock

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    from vision_tl.utils import files

    if files.fcntl is not None:  # (no flock, as on Windows: no lock to take)
        with path_lock(copy / "report"):  # another report of the run, under way
            with pytest.raises(ReportError, match="another vision-tl report is writing into"):
                report_run(copy, overwrite=True)
    real = report_module._figures

    def meanwhile(*args, **kwargs):  # a fit's epoch (or the other split's report) writes metrics.json
        metrics = json.loads((copy / "metrics.json").read_text())
        (copy / "metrics.json").write_text(json.dumps({**metrics, "written_meanwhile": True}))
        return real(*args, **kwargs)

    monkeypatch.setattr(report_module, "_figures", meanwhile)
    report_run(copy, overwrite=True)
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["written_meanwhile"] is True and "val" in metrics["report"]


def test_test_command_writes_a_report_from_its_own_predictions(run, tmp_path, capsys):
    args = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert main(["test", *args]) == 0
    # no test/ folder: the val images are evaluated, and both the console and the report say so
    assert "has no test/ folder, so `test` evaluates the val split" in capsys.readouterr().err
    test_dir = tmp_path / "partial" / "version_0"
    assert (test_dir / "report_test.html").is_file() and (test_dir / "threshold_test.png").is_file()
    page = (test_dir / "report_test.html").read_text()
    assert "the val split (the folder has no test/ split) chose the best checkpoint" in page
    # its heading named them "held-out test images", the very claim the note takes back
    assert "held-out" not in page and "Evaluation report: val split" in page and "validation images:" in page
    from vision_tl.reports.compare import compare_runs

    notes = compare_runs([test_dir], split="test").notes
    assert any("the test metrics are of the val images (no test/ split)" in note for note in notes), notes
    metrics = json.loads((test_dir / "metrics.json").read_text())
    threshold = read_checkpoint(run / "checkpoints" / "best.ckpt")["vision_tl"]["threshold"]
    assert metrics["report"]["test"]["good_vs_defect"]["threshold"] == pytest.approx(threshold)
    # `report` on that output directory points at the training run instead of "no checkpoint yet"
    assert main(["report", str(test_dir)]) == 2
    err = capsys.readouterr().err
    assert "output of `vision-tl validate`, `test` or `predict`" in err and f"vision-tl report {run}" in err


def test_compare_prints_and_writes(run, tmp_path, capsys):
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "macro AUC" in out and out.count("partial/version_0") == 2
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"compare.html", "compare.json", "compare.png"}
    before = (tmp_path / "cmp" / "compare.html").read_bytes()
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2  # never replaced silently
    refused = capsys.readouterr()
    assert "compare.json, compare.png, compare.html exist from an earlier comparison" in refused.err
    assert "--overwrite" in refused.err and "macro AUC" not in refused.out  # refused before the work
    assert (tmp_path / "cmp" / "compare.html").read_bytes() == before
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp"), "--overwrite"]) == 0
    assert (tmp_path / "cmp" / "compare.html").read_bytes() != before


def test_explain_writes_a_gradcam_png(run, inspection_folder, tmp_path, capsys):
    image = min((inspection_folder / "scratch").iterdir())
    assert main(["explain", str(run / "checkpoints/best.ckpt"), str(image), "--class", "scratch",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{image.stem}.gradcam.png").stat().st_size > 0
    assert "Grad-CAM of scratch" in capsys.readouterr().out
    again = ["explain", str(run / "checkpoints/best.ckpt"), str(image), "--out", str(tmp_path)]
    assert main(again) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced silently
    assert main([*again, "--overwrite"]) == 0
    import shutil  # three images called x.png in folders called good/: three heat maps, none replaced

    inputs = []
    for folder in ("a", "b", "c"):
        (tmp_path / folder / "good").mkdir(parents=True)
        inputs.append(shutil.copy(image, tmp_path / folder / "good" / "x.png"))
    assert main(["explain", str(run / "checkpoints/best.ckpt"), *map(str, inputs), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.gradcam.png"))) == 3
    # from Python, one call writes them all (not a generator left unread) and names the files
    from vision_tl.reports.explain import explain_checkpoint

    written = explain_checkpoint(run / "checkpoints/best.ckpt", inputs, tmp_path / "py")
    assert isinstance(written, list) and sorted(written) == sorted((tmp_path / "py").glob("*.gradcam.png"))
    assert len(written) == 3


def test_explain_of_a_folder_with_a_corrupt_image_explains_the_others(run, inspection_folder, tmp_path, capsys):
    """One damaged file in a folder stopped explain half-way: heat maps for the images before it,
    none for those after, and a second run then refused without --overwrite. It is named and
    skipped instead, with exit status 3 (as predict-onnx), so a script still notices."""
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((inspection_folder / "scratch").iterdir())[:2]
    shutil.copy(good[0], folder / "a.png")
    (folder / "b.png").write_bytes(good[1].read_bytes()[:60])  # truncated
    shutil.copy(good[1], folder / "c.png")
    code = main(["explain", str(run / "checkpoints/best.ckpt"), str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.gradcam.png", "c.gradcam.png"]
    assert f"skipped: {folder / 'b.png'}" in err and "1 image(s) could not be read" in err
    from vision_tl.imaging import ImageLoadError
    from vision_tl.reports.explain import explain_checkpoint

    with pytest.raises(ImageLoadError, match="b.png"):  # from Python, as before: the caller decides
        explain_checkpoint(run / "checkpoints/best.ckpt", [folder / "b.png"], tmp_path / "py")


def test_explain_reads_vit_tokens_and_explains_a_file_given_twice_once(tmp_path):
    """A ViT's last stage outputs patch tokens, not a map: Grad-CAM lays them on the patch grid
    (a heat map of the input's size, not grad-cam's 'Invalid grads shape')."""
    import numpy as np
    from PIL import Image

    from vision_tl.reports.explain import ExplainError, expand_images, explain_images
    from vision_tl.tasks import ImageClassifier

    image = tmp_path / "x.png"
    pixels = np.full((48, 64, 3), 60, np.uint8)
    pixels[10:20, 40:56] = 250
    Image.fromarray(pixels).save(image)
    assert expand_images([image, tmp_path, str(tmp_path / "." / "x.png")]) == [image]
    hidden = tmp_path / "h" / ".ipynb_checkpoints"
    hidden.mkdir(parents=True)
    Image.fromarray(pixels).save(hidden / "y.png")
    (tmp_path / "h" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"ignoring 1 non-image file\(s\) under .*notes\.txt"):
        with pytest.raises(ExplainError, match="holds no images"):  # as predict-onnx walks it: hidden folders skipped
            expand_images([tmp_path / "h"])
    model = ImageClassifier(["a", "b"], backbone="test_vit", pretrained=False, image_size=64, mode="full")
    (item,) = explain_images(model, [image])
    assert item.cam.shape == (64, 64) and np.isfinite(item.cam).all()
    assert item.cam.max() > item.cam.min()  # a map over the patches, not a constant
    assert item.cam_on_image().shape == (48, 64)  # laid back on the image, not the square input


def test_compare_sets_aside_a_report_older_than_its_checkpoint(run, tmp_path, monkeypatch, capsys):
    """A run trained on (resumed) after its report: fit's best epoch is another than the one the
    report evaluated, whose numbers then describe weights the run no longer has. A plain copy of
    the run (new file times) is not mistaken for that."""
    copy = tmp_path / "partial" / "version_0"
    shutil.copytree(run, copy, copy_function=shutil.copyfile)  # file times not kept
    monkeypatch.chdir(copy)
    assert main(["compare", ".", "--out", str(tmp_path / "plain")]) == 0
    assert "older than the checkpoint" not in capsys.readouterr().out
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["report"]["val"]["checkpoint_epoch"] == metrics["val"]["epoch"]
    metrics["val"].update(acc=0.123, epoch=metrics["val"]["epoch"] + 3)  # what fit wrote after a resume
    (copy / "metrics.json").write_text(json.dumps(metrics))
    # `compare .`: the run is named by its folders, not "/"
    assert main(["compare", ".", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "partial/version_0" in out and "0.123" in out
    assert "the report is older than the checkpoint it evaluated" in out and "no report yet" not in out


def test_compare_leaves_out_a_run_stopped_before_its_first_validation(run, tmp_path, capsys):
    killed, early = tmp_path / "k" / "version_0", tmp_path / "k" / "version_1"
    for stopped in (killed, early):
        stopped.mkdir(parents=True)
        for name in ("config.yaml", "labels.json", "split.json"):
            shutil.copy(run / name, stopped / name)
    (early / "checkpoints").mkdir()
    assert main(["compare", str(run), str(killed), str(early), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "left out k/version_0: no checkpoints/" in out and "a fit stopped before its first epoch ended" in out
    assert "left out k/version_1: no metrics.json" in out
    assert main(["compare", str(run), str(tmp_path / "k" / "version_9")]) == 2  # a mistyped run: not skipped
    assert "run directory" in (err := capsys.readouterr().err) and "version_9 does not exist (in " in err
    assert "version_0, version_1" in err  # the runs that are there
    (tmp_path / "file").write_text("")
    for argv in (["compare", str(run)], ["explain", str(run / "checkpoints" / "best.ckpt"), str(run / "report.html")]):
        assert main([*argv, "--out", str(tmp_path / "file")]) == 2
        assert f"--out {tmp_path / 'file'} is a file" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "{tmp}/nope"], "does not exist"),
    (["report", "{run}", "--in-place"], "--in-place only applies"),
    (["report", "{run}", "--split", "test", "--target-escape", "0.1"], "thresholds are chosen on validation images"),
    # a bare file name is looked for in the working folder: the message gives the path to pass
    (["report", "{run}", "--checkpoint", "last.ckpt"], "--checkpoint {run}/checkpoints/last.ckpt"),
    (["compare", "{tmp}"], "no metrics.json"),
    (["compare", "{tmp}/*/version_*"], "matches no run directory"),
    (["explain", "{run}/checkpoints/best.ckpt", "{tmp}/missing.png"], "does not exist"),
    (["explain", "{run}/checkpoints/best.ckpt", "{run}/report.html", "--class", "nope"], "crack, good"),
])
def test_bad_input_is_one_error_line_and_exit_2(run, tmp_path, capsys, argv, message):
    # In-process (a subprocess costs ~10 s of imports): an escaping exception would fail the test.
    assert main([a.format(run=run, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    message = message.format(run=run)
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _val_folders(dest: Path, source: Path, classes: list[str]) -> Path:
    """``dest/val/<class>/``: 3 images of each class copied from ``source``."""
    for name in classes:
        (dest / "val" / name).mkdir(parents=True)
        for src in sorted((source / name).iterdir())[:3]:
            shutil.copyfile(src, dest / "val" / name / src.name)
    return dest


def _folder_run(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` as if it had been trained on a train/ + val/ layout (no split.json)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "split.json").unlink()
    return copy


def test_report_refuses_a_class_folder_the_model_does_not_know(run, inspection_folder, tmp_path, capsys):
    copy = _folder_run(run, tmp_path)
    data = _val_folders(tmp_path / "extra", inspection_folder, ["crack", "good", "scratch", "spot"])
    (data / "val" / "dent").mkdir()
    for src in sorted((inspection_folder / "crack").iterdir())[:6]:
        shutil.copyfile(src, data / "val" / "dent" / f"dent_{src.name}")
    before = _snapshot(copy)
    assert main(["report", str(copy), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "class folder(s) dent" in err and "crack, good, scratch, spot" in err
    assert _snapshot(copy) == before
    shutil.rmtree(data / "val" / "dent")  # the model's classes only: reported
    assert main(["report", str(copy), "--data", str(data)]) == 2  # the run has a report already
    assert "report.html already exists (an earlier report of this run); pass --overwrite" in capsys.readouterr().err
    assert _snapshot(copy) == before
    assert main(["report", str(copy), "--data", str(data), "--overwrite"]) == 0
    assert "12 val images" in capsys.readouterr().out


def test_report_refuses_validation_images_that_changed_since_training(run, inspection_folder, tmp_path, capsys):
    """Another folder with the run's relative paths but other content: not the run's images."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = tmp_path / "data"
    shutil.copytree(inspection_folder, data)
    val = json.loads((copy / "split.json").read_text())["val"]
    changed = data / val[1]["path"]
    shutil.copyfile(data / val[0]["path"], changed)  # same relative path, other content
    before = _snapshot(copy)
    assert main(["report", str(copy), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert f"1 of {len(val)} validation image(s)" in err and str(changed) in err and "--data ROOT" in err
    assert _snapshot(copy) == before  # metrics.json, report.html ... untouched
    shutil.copyfile(inspection_folder / val[1]["path"], changed)  # the run's own images again
    assert main(["report", str(copy), "--data", str(data), "--overwrite"]) == 0


def test_report_reads_a_val_folder_that_lacks_a_class(run, inspection_folder, tmp_path, capsys):
    """What fit accepts, report accepts: val/ without a rare class (its recall is not measured)."""
    copy = _folder_run(run, tmp_path)
    data = _val_folders(tmp_path / "data", inspection_folder, ["crack", "good", "scratch"])  # no val/spot
    assert main(["report", str(copy), "--data", str(data), "--overwrite"]) == 0
    assert "9 val images" in capsys.readouterr().out
    recall = {r["class"]: r["recall"] for r in json.loads((copy / "metrics.json").read_text())["report"]["val"]
              ["per_class"]}
    assert recall["spot"] is None and recall["crack"] is not None


def test_report_without_the_split_folder_lists_what_the_data_folder_holds(run, inspection_folder, tmp_path,
                                                                           capsys):
    copy = _folder_run(run, tmp_path)
    assert main(["report", str(copy), "--data", str(inspection_folder)]) == 2
    err = capsys.readouterr().err
    assert f"{inspection_folder} has no val/ folder (it holds crack/, good/, scratch/, spot/)" in err
    assert "available splits" not in err and len(err.strip().splitlines()) == 1
    data = _val_folders(tmp_path / "d", inspection_folder, ["crack", "good", "scratch", "spot"])
    assert main(["report", str(copy), "--data", str(data), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "has no test/ folder (it holds val/)" in err and "--split test" in err


def test_compare_without_a_test_report_says_how_to_make_one(run, capsys):
    assert main(["compare", str(run), "--split", "test"]) == 2
    assert f"run `vision-tl report {run} --split test` first" in capsys.readouterr().err


def test_report_on_a_run_stopped_before_its_first_checkpoint(run, tmp_path, capsys):
    stopped = tmp_path / "partial" / "version_1"
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copyfile(run / "config.yaml", stopped / "config.yaml")
    assert main(["report", str(stopped)]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint yet" in err and "is this a run directory" not in err
    assert f"vision-tl fit --config {stopped / 'config.yaml'}` (a new run directory)" in err
    assert main(["report", str(tmp_path)]) == 2  # no config.yaml: not a run directory at all
    assert "is this a run directory written by vision-tl fit?" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHECK_IMAGES = ("<script>window.addEventListener('load',()=>{const w=[...document.images].map(i=>i.naturalWidth);"
                "document.body.insertAdjacentHTML('beforeend','<pre id=\"imgcheck\">'+w.join(',')+'</pre>')});"
                "</script></body>")


def _dump_dom(page: Path, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                          check=False, timeout=90)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory) -> None:
    """Skip (with Chromium's own words) where it is missing or installed but cannot start,
    e.g. a snap wrapper inside a container; a page it can render is then checked for real."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("chromium")
    probe = tmp / "probe.html"
    probe.write_text("<html><body><p id='alive'>alive</p></body></html>")
    try:
        proc = _dump_dom(probe, tmp / "profile")
    except subprocess.TimeoutExpired:
        pytest.skip(f"{CHROMIUM} is installed but did not render a one-line page in 90 s")
    if "id=\"alive\"" not in proc.stdout:
        tail = " ".join((proc.stderr or "").strip().splitlines()[-2:])[:300]
        pytest.skip(f"{CHROMIUM} is installed but cannot start (exit {proc.returncode}): {tail}")


def test_report_renders_in_headless_chromium(chromium, run, tmp_path):
    html = (run / "report.html").read_text()
    assert "<script" not in html  # the report itself is static; the check script is added to a copy
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", CHECK_IMAGES))
    dom = _dump_dom(page, tmp_path / "profile").stdout
    widths = re.search(r'<pre id="imgcheck">([\d,]*)</pre>', dom)
    assert widths, f"the check script did not run; DOM starts: {dom[:300]!r}"
    sizes = [int(w) for w in widths.group(1).split(",") if w]
    assert len(sizes) == html.count("<img") >= len(FIGURES) and min(sizes) > 0
    for name in ("crack", "good", "scratch", "spot"):
        assert f'<td class="l">{name}</td>' in dom


def test_compare_over_a_glob_leaves_out_test_and_predict_outputs(run, tmp_path, capsys):
    """`compare runs/partial/version_*` also matches the folders `test`/`predict` wrote."""
    output = tmp_path / "version_9"
    output.mkdir()
    shutil.copyfile(run / "config.yaml", output / "config.yaml")
    (output / "predictions.csv").write_text("path,true,predicted\n")
    assert main(["compare", str(run), str(output)]) == 0
    out = capsys.readouterr().out
    assert f"left out {tmp_path.name}/version_9: no checkpoints/" in out and "partial/version_0" in out


def test_compare_expands_a_pattern_no_shell_expanded(run, tmp_path, capsys):
    """Windows' shells pass `runs/*/version_*` (the README's example) on as it is written, as does a
    quoted pattern: compare took it for one run directory and found no metrics.json in it."""
    for n in (2, 10):
        shutil.copytree(run, tmp_path / "partial" / f"version_{n}")
    assert main(["compare", str(tmp_path / "*" / "version_*")]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if not line.startswith("note")]
    assert rows == ["partial/version_2", "partial/version_10"]


def test_compare_of_test_results_keeps_the_test_outputs_and_names_twins_apart(run, tmp_path, capsys):
    """`vision-tl test` writes its metrics into its own folder: `compare ... --split test` over a
    glob keeps those and leaves out training runs without test metrics. Two runs both called
    partial/version_0 (in other folders) get their paths as names."""
    tested = tmp_path / "version_5"
    tested.mkdir()
    shutil.copyfile(run / "config.yaml", tested / "config.yaml")
    metrics = json.loads((run / "metrics.json").read_text())
    (tested / "metrics.json").write_text(json.dumps({"classes": metrics["classes"], "test": metrics["val"]}))
    assert main(["compare", str(run), str(tested), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "left out partial/version_0: no test metrics" in out and out.splitlines()[2].split()[0].endswith("version_5")
    twin = tmp_path / "elsewhere" / "partial" / "version_0"
    shutil.copytree(run, twin)
    assert main(["compare", str(run), str(twin)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert rows[0].split()[0] == str(run) and rows[1].split()[0] == str(twin)


def test_choosing_a_threshold_says_what_to_export(run, tmp_path, capsys):
    copy = tmp_path / "partial" / "version_0"
    shutil.copytree(run, copy)
    chosen = (copy / "checkpoints" / "best.thresholded.ckpt").read_bytes()  # the fixture's report chose one
    assert main(["report", str(copy), "--target-false-reject", "0.5"]) == 2  # not replaced without a word
    assert "best.thresholded.ckpt already exists" in capsys.readouterr().err
    assert (copy / "checkpoints" / "best.thresholded.ckpt").read_bytes() == chosen
    assert main(["report", str(copy), "--target-false-reject", "0.5", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"next: vision-tl export {copy / 'checkpoints' / 'best.thresholded.ckpt'} --out model.onnx" in out


def test_report_images_of_a_class_folder_spelled_with_other_accents(tmp_path):
    """val/été copied from macOS (decomposed accents) is the model's class été."""
    from PIL import Image

    from vision_tl.reports.report import split_images

    nfc, nfd = "\u00e9t\u00e9", "e\u0301te\u0301"
    for name in (nfd, "ok"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(name) * 20, 0, 0)).save(tmp_path / "data" / "val" / name / "a.png")
    (tmp_path / "run").mkdir()
    paths, labels, notes = split_images(tmp_path / "run", [nfc, "ok"], "val", tmp_path / "data")
    assert sorted(zip([p.parent.name for p in paths], labels)) == [(nfd, 0), ("ok", 1)] and notes == []


def test_predict_with_another_runs_config_says_so(run, inspection_folder, tmp_path, capsys):
    """The checkpoint chose its threshold on a good class; a config without one (another run's)
    must say that the two do not belong together, not ask for an option the user never gave."""
    info = main(["predict", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(inspection_folder),
          *TINY_ARGS, "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    err = capsys.readouterr().err
    assert info == 2, err
    assert "threshold_target 'false_reject:0.5' on a good class ('good')" in err
    assert f"Use --config {run / 'config.yaml'}" in err


def test_a_report_of_the_best_checkpoint_points_to_the_thresholded_copy(run, tmp_path, capsys):
    """After ``report --target-...``, best.ckpt itself still has no threshold: a later report of
    it (e.g. --split test) must say where the chosen threshold is, not only how to choose one."""
    import torch

    copy = tmp_path / "partial" / "version_0"
    shutil.copytree(run, copy)
    best = copy / "checkpoints" / "best.ckpt"
    state = read_checkpoint(best)
    state["vision_tl"].update(threshold=None, threshold_target=None)
    state["hyper_parameters"]["threshold_target"] = None
    torch.save(state, best)
    assert main(["report", str(copy), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "no threshold set" in out
    assert f"--checkpoint {copy / 'checkpoints' / 'best.thresholded.ckpt'}" in out


def test_compare_says_what_it_cannot_check_and_which_checkpoint_a_report_evaluated(run, inspection_folder, tmp_path,
                                                                                    capsys):
    folders = _folder_run(run, tmp_path)  # as if trained on train/ + val/: no split.json
    data = _val_folders(tmp_path / "data", inspection_folder, ["crack", "good", "scratch", "spot"])
    assert main(["report", str(folders), "--data", str(data), "--checkpoint",
                 str(folders / "checkpoints" / "last.ckpt"), "--overwrite"]) == 0
    assert json.loads((folders / "metrics.json").read_text())["report"]["val"]["checkpoint"].endswith("last.ckpt")
    capsys.readouterr()
    assert main(["compare", str(run), str(folders)]) == 0
    out = capsys.readouterr().out
    assert "brought its own val/ folder (no split.json)" in out
    assert "not the best checkpoint: " in out and "(last.ckpt)" in out


def _without_report(run: Path) -> None:
    """Remove the fixture's report of ``run`` (a copy), as if none had been made."""
    for name in ("report.html", "predictions.csv", *(f for f in FIGURES if not f.startswith("confusion"))):
        (run / name).unlink(missing_ok=True)


def test_report_refuses_a_checkpoint_of_another_run_and_writes_nothing_there(run, tmp_path, capsys):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for copy in (mine, theirs):
        shutil.copytree(run, copy)
        (copy / "report.html").unlink()
    before = _snapshot(theirs / "checkpoints")
    foreign = ["report", str(mine), "--checkpoint", str(theirs / "checkpoints" / "best.ckpt"), "--target-escape", "0.2"]
    assert main(foreign) == 2
    assert f"is not in run {mine}" in capsys.readouterr().err
    assert _snapshot(theirs / "checkpoints") == before
    (mine / "labels.json").write_text(json.dumps(["crack", "good", "scratch"]))  # a run of other classes
    assert main(["report", str(mine)]) == 2
    assert "was trained on the classes ['crack', 'good', 'scratch', 'spot']" in capsys.readouterr().err


def test_a_report_stopped_by_a_damaged_metrics_json_leaves_nothing_that_blocks_its_rerun(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _without_report(copy)
    (copy / "checkpoints" / "best.thresholded.ckpt").unlink()
    good = (copy / "metrics.json").read_text()
    (copy / "metrics.json").write_text('{"classes": [')  # a disk that filled up, a bad hand edit
    before = _snapshot(copy)
    assert main(["report", str(copy), "--target-escape", "0.2"]) == 2
    assert "metrics.json is not valid JSON" in capsys.readouterr().err
    assert _snapshot(copy) == before and not (copy / "checkpoints" / "best.thresholded.ckpt").exists()
    (copy / "metrics.json").write_text(good)
    assert main(["report", str(copy), "--target-escape", "0.2"]) == 0
    assert (copy / "checkpoints" / "best.thresholded.ckpt").is_file()


def test_a_run_whose_checkpoints_folder_links_elsewhere_is_reported(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _without_report(copy)
    shutil.move(str(copy / "checkpoints"), str(tmp_path / "bulk_storage"))
    (copy / "checkpoints").symlink_to(tmp_path / "bulk_storage")
    assert main(["report", str(copy)]) == 0
    assert main(["report", str(copy), "--checkpoint", str(copy / "checkpoints" / "best.ckpt"), "--overwrite"]) == 0


def test_a_report_whose_threshold_cannot_be_saved_says_nothing_was_saved(run, tmp_path, monkeypatch, capsys):
    import torch

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _without_report(copy)
    (copy / "checkpoints" / "best.thresholded.ckpt").unlink()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["report", str(copy), "--target-escape", "0.2"]) != 0
    assert not (copy / "report.html").exists() and not (copy / "checkpoints" / "best.thresholded.ckpt").exists()


def test_a_report_whose_html_was_moved_away_keeps_its_predictions(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    before = (copy / "predictions.csv").read_bytes()
    assert main(["report", str(copy)]) == 2
    assert "predictions.csv already exists" in capsys.readouterr().err
    assert (copy / "predictions.csv").read_bytes() == before


def test_predict_with_ckpt_path_best_keeps_the_checkpoints_settings(run, inspection_folder, tmp_path, capsys):
    image = next((inspection_folder / "good").iterdir())
    info = main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", "best", "--model.image_size", "64",
          "--data.predict_root", str(image), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert info == 2
    assert "--model.image_size 64 (the checkpoint has 32)" in capsys.readouterr().err


def test_predict_into_a_folder_of_the_users_files_is_refused(run, inspection_folder, tmp_path, capsys):
    mine = tmp_path / "partial" / "mine"
    mine.mkdir(parents=True)
    (mine / "predictions.csv").write_text("the user's own\n")
    image = next((inspection_folder / "good").iterdir())
    info = main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", "best", "--data.predict_root", str(image),
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.version", "mine"])
    assert info == 2
    assert "already holds a run or other files" in capsys.readouterr().err
    assert (mine / "predictions.csv").read_text() == "the user's own\n"


def test_a_val_report_says_the_val_images_chose_the_epoch_and_the_threshold(run, tmp_path, capsys):
    """`vision-tl test` on a folder without test/ says the val split chose the checkpoint; a
    `report` of that same split, the kit's default, must say so too (with one val image of a
    rare class, its balanced accuracy is the best of many tries on that image)."""
    copy = tmp_path / "partial" / "version_0"
    shutil.copytree(run, copy)
    assert main(["report", str(copy), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "note: these val images chose the best epoch and the good/defect threshold" in out
    assert "--split test" in out and "not an independent estimate" in (copy / "report.html").read_text()
    assert main(["report", str(copy), "--overwrite", "--checkpoint", str(copy / "checkpoints" / "last.ckpt")]) == 0
    out = capsys.readouterr().out  # the last epoch was not chosen; its threshold (fit's) was
    assert "note: these val images chose the good/defect threshold," in out


def test_report_draws_the_training_curves_from_the_runs_history(run, tmp_path):
    """The report draws the curves from metrics.json / metrics.csv as they are now (not fit's PNG, gone
    here) and shows them in their own section after the mistakes."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _without_report(copy)
    (copy / "training_curves.png").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    page = (copy / "report.html").read_text()
    assert page.index("Most confident mistakes") < page.index('alt="training_curves" src="data:image/png;base64,')
    assert json.loads((copy / "metrics.json").read_text())["figures"]["training_curves_val"] == "training_curves.png"


def test_compare_does_not_ask_for_a_report_for_escape_rates_it_shows(tmp_path, capsys):
    """A run fitted with --model.threshold_target has its threshold and escape rates in metrics.json,
    and compare shows them; its note still said that escape rates needed `vision-tl report`."""
    from vision_tl.reports.compare import compare_runs, format_table

    run = tmp_path / "partial" / "version_0"
    run.mkdir(parents=True)
    val = {"epoch": 3, "acc": 0.97, "balanced_acc": 0.9, "f1_macro": 0.8, "recall_per_class": {"ok": 1.0, "pit": 0.5},
           "threshold": 0.65, "escape_rate": 0.5, "false_reject_rate": 0.0}
    (run / "metrics.json").write_text(json.dumps({"classes": ["ok", "pit"], "val": val}))
    table = format_table(compare_runs([run]))
    assert "0.650" in table and "0.500" in table
    assert "AUC and ECE need `vision-tl report RUN`" in table and "escape rates need" not in table
    del val["threshold"], val["escape_rate"], val["false_reject_rate"]
    (run / "metrics.json").write_text(json.dumps({"classes": ["ok", "pit"], "val": val}))
    assert "AUC, ECE and escape rates need" in format_table(compare_runs([run]))
