"""Report metrics on small fixed predictions, checked against values computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vision_tl.reports import metrics as M

CLASSES = ["good", "dent", "scratch"]
# true: good, good, good, dent, dent, scratch
LABELS = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array([
    [0.85, 0.10, 0.05],  # good    -> good     (conf .85)
    [0.65, 0.25, 0.10],  # good    -> good     (conf .65)
    [0.30, 0.65, 0.05],  # good    -> dent     (conf .65, wrong)
    [0.20, 0.75, 0.05],  # dent    -> dent     (conf .75)
    [0.55, 0.40, 0.05],  # dent    -> good     (conf .55, wrong)
    [0.10, 0.15, 0.75],  # scratch -> scratch  (conf .75)
])


def test_confusion_matrix_and_per_class_values():
    matrix = M.confusion_matrix(LABELS, PROBS.argmax(1), 3)
    assert matrix.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    good, dent, scratch = M.per_class_metrics(matrix, CLASSES)
    assert good["precision"] == pytest.approx(2 / 3) and good["recall"] == pytest.approx(2 / 3)
    assert good["f1"] == pytest.approx(2 / 3) and good["support"] == 3 and good["predicted"] == 3
    assert (dent["precision"], dent["recall"], dent["f1"]) == (0.5, 0.5, 0.5)
    assert (scratch["precision"], scratch["recall"], scratch["f1"]) == (1.0, 1.0, 1.0)
    summary = M.summary_metrics(matrix, [good, dent, scratch])
    assert summary["acc"] == pytest.approx(4 / 6)
    assert summary["balanced_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_one_vs_rest_auc_and_average_precision():
    good, dent, scratch = M.one_vs_rest_curves(PROBS, LABELS, CLASSES)
    assert good["roc_auc"] == pytest.approx(8 / 9)  # 8 of 9 (good, other) pairs ranked right
    assert dent["roc_auc"] == pytest.approx(7 / 8)
    assert scratch["roc_auc"] == pytest.approx(1.0)
    # good ranked: .85 P, .65 P, .55 N, .30 P -> precision at each hit 1, 1, 3/4
    assert good["average_precision"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert good["roc"]["fpr"][0] == 0.0 and good["roc"]["tpr"][-1] == 1.0


@pytest.mark.parametrize(("positives", "negatives"), [(2, 30), (3, 7), (24, 1), (30, 2)])
def test_a_perfect_ranking_scores_exactly_one(positives, negatives):
    # summed over the rates (k / n) these came to 0.9999999999999999, which the report shows as ">0.999"
    scores = np.r_[np.linspace(0.6, 0.99, positives), np.linspace(0.01, 0.4, negatives)]
    labels = np.r_[np.zeros(positives, int), np.ones(negatives, int)]
    for curve in M.one_vs_rest_curves(np.c_[scores, 1 - scores], labels, ["good", "dent"]):
        assert curve["roc_auc"] == 1.0 and curve["average_precision"] == 1.0


def test_expected_calibration_error():
    cal = M.calibration(PROBS, LABELS, bins=10)
    # bins: .55 (acc 0), .65 x2 (acc .5), .75 x2 (acc 1), .85 (acc 1)
    assert cal["ece"] == pytest.approx((0.55 + 2 * 0.15 + 2 * 0.25 + 0.15) / 6)
    counts = [b["count"] for b in cal["bins"]]
    assert counts == [0, 0, 0, 0, 0, 1, 2, 2, 1, 0]
    assert cal["bins"][0]["accuracy"] is None and cal["bins"][0]["confidence"] is None


@pytest.mark.parametrize(("target", "threshold", "escapes", "rejects"), [
    ("false_reject:0", 0.25, 1, 0),      # keep every good image (lowest .30): the .55 defect passes; midway .20 -> .30
    ("false_reject:0.34", 0.60, 0, 1),   # one of three good images may go: midway .55 -> .65
    ("escape:0", 0.60, 0, 1),            # midway between the .55 defect and the .65 good
    ("escape:0.34", 0.25, 1, 0),         # one of three defects may pass: midway .20 -> .30
])
def test_threshold_selection_meets_its_target(target, threshold, escapes, rejects):
    p_good, is_good = PROBS[:, 0], LABELS == 0
    choice = M.select_threshold(p_good, is_good, target)
    assert choice["threshold"] == pytest.approx(threshold)
    assert (choice["escapes"], choice["false_rejects"]) == (escapes, rejects)
    assert choice["escape_rate"] == pytest.approx(escapes / 3)
    assert choice["target"] == target


def test_threshold_target_errors_name_the_problem():
    with pytest.raises(M.ThresholdError, match="false_reject, escape"):
        M.parse_threshold_target("recall:0.1")
    with pytest.raises(M.ThresholdError, match=r"\[0, 1\)"):
        M.parse_threshold_target("escape:1.5")
    with pytest.raises(M.ThresholdError, match="no good images"):
        M.select_threshold(np.array([0.2, 0.4]), np.array([False, False]), "false_reject:0.1")
    for target in ("false_reject:0.1", "escape:0.1"):  # only good images: escapes cannot be counted
        with pytest.raises(M.ThresholdError, match="no defective images in this split"):
            M.select_threshold(np.array([0.7, 0.9]), np.array([True, True]), target)
    assert M.parse_threshold_target("false-reject:0.01") == M.ThresholdTarget("false_reject", 0.01)


def test_class_absent_from_validation_is_none_with_a_reason_never_nan():
    labels = np.array([0, 0, 1, 1])  # no scratch at all, and scratch never predicted
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    result = M.evaluate(probs, labels, CLASSES, good_class="good", threshold=0.5)
    scratch = result["per_class"][2]
    for key in ("precision", "recall", "f1", "roc_auc", "average_precision"):
        assert scratch[key] is None and scratch["undefined"][key]
    assert "absent" in scratch["undefined"]["recall"]
    assert result["summary"]["balanced_acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert "scratch" in result["summary"]["notes"][0]
    json.dumps(result, allow_nan=False)  # raises on any NaN or inf


def test_precision_of_a_class_never_predicted_is_undefined():
    rows = M.per_class_metrics(np.array([[2, 0], [1, 0]]), ["good", "dent"])
    assert rows[1]["precision"] is None and rows[1]["recall"] == 0.0 and rows[1]["f1"] == 0.0
    assert rows[1]["undefined"] == {"precision": "class never predicted"}


def test_perfect_classifier():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    result = M.evaluate(probs, labels, CLASSES, good_class="good", threshold=0.5)
    assert result["summary"]["acc"] == 1.0 and result["summary"]["balanced_acc"] == 1.0
    assert result["summary"]["f1_macro"] == 1.0 and result["summary"]["roc_auc_macro"] == 1.0
    assert all(r["average_precision"] == 1.0 for r in result["per_class"])
    gvd = result["good_vs_defect"]
    assert gvd["escape_rate"] == 0.0 and gvd["false_reject_rate"] == 0.0
    assert result["calibration"]["ece"] == pytest.approx(abs(1.0 - (0.9 + 0.1 / 3)))


def test_auc_with_one_class_present_is_undefined():
    curves = M.one_vs_rest_curves(np.array([[0.7, 0.3], [0.6, 0.4]]), np.array([0, 0]), ["good", "dent"])
    assert curves[0]["roc_auc"] is None and "no images of other classes" in curves[0]["undefined"]["roc_auc"]
    assert curves[1]["roc_auc"] is None and "absent" in curves[1]["undefined"]["roc_auc"]


def test_good_vs_defect_without_threshold_uses_argmax_and_sweep_is_monotone():
    gvd = M.good_vs_defect(PROBS, LABELS, CLASSES, "good", None)
    assert gvd["threshold"] is None and gvd["escapes"] == 1 and gvd["false_rejects"] == 1
    assert np.all(np.diff(gvd["sweep"]["escape_rate"]) <= 0)
    assert np.all(np.diff(gvd["sweep"]["false_reject_rate"]) >= 0)
    with pytest.raises(ValueError, match="not a class"):
        M.good_vs_defect(PROBS, LABELS, CLASSES, "ok", None)


@pytest.mark.parametrize("target", ["false_reject:0.3", "escape:0.5", "false_reject:0", "escape:0"])
def test_a_target_is_not_spent_where_the_classes_separate(target):
    """Cleanly separated scores: any allowance still gives no escape and no reject, the
    threshold midway in the gap (spending the allowance rejected 3 of 11 good images)."""
    good = np.linspace(0.606, 0.945, 11)
    defect = np.linspace(0.244, 0.353, 6)
    p_good = np.concatenate([good, defect])
    choice = M.select_threshold(p_good, np.arange(17) < 11, target)
    assert (choice["escapes"], choice["false_rejects"]) == (0, 0)
    assert choice["threshold"] == pytest.approx((0.353 + 0.606) / 2)


def test_threshold_ties_go_to_the_other_rate():
    """Good images at .3 .5 .7 .9, defects at .2 .6. false_reject:0.5 may reject two good
    images, and needs both (.3, .5) to block the .6 defect. false_reject:0.25 may reject one,
    but rejecting .3 blocks no more defects than rejecting none, so it rejects none."""
    p_good = np.array([0.3, 0.5, 0.7, 0.9, 0.2, 0.6])
    is_good = np.array([True, True, True, True, False, False])
    choice = M.select_threshold(p_good, is_good, "false_reject:0.5")
    assert (choice["escapes"], choice["false_rejects"]) == (0, 2)  # the 0.6 defect needs the 0.5 good rejected
    choice = M.select_threshold(p_good, is_good, "false_reject:0.25")
    assert (choice["escapes"], choice["false_rejects"]) == (1, 0)  # before: 1 escape and the .3 rejected
    assert choice["threshold"] == pytest.approx(0.25)


def test_training_and_report_agree_on_balanced_accuracy_with_a_class_absent():
    """val/ without images of a class that the model still predicts for some image: the
    score logged while training (and kept in metrics.json) is the report's, the mean recall of
    the classes present, not torchmetrics' macro recall, which counts the absent class as 0."""
    import torch

    from vision_tl.tasks.classifier import ImageClassifier

    model = ImageClassifier(["ok", "pit", "scratch"], backbone="test_efficientnet", pretrained=False, image_size=32)
    labels = torch.tensor([0, 0, 0, 2, 2, 2])
    predicted = torch.tensor([0, 0, 1, 2, 2, 0])  # one 'ok' image called 'pit', which val/ lacks
    model.val_metrics.update(torch.nn.functional.one_hot(predicted, 3).float(), labels)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    model._eval_epoch_end(model.val_metrics, "val")
    matrix = M.confusion_matrix(labels.numpy(), predicted.numpy(), 3)
    expected = M.summary_metrics(matrix, M.per_class_metrics(matrix, ["ok", "pit", "scratch"]))["balanced_acc"]
    assert logged["val/balanced_acc"] == pytest.approx(expected) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert model.eval_results["val"]["balanced_acc"] == pytest.approx(expected)
    assert model.eval_results["val"]["recall_per_class"]["pit"] is None


def test_the_operating_curve_passes_through_the_reported_threshold():
    """Scores closer together than the plot's even grid: the sweep still holds the chosen
    threshold, with exactly the rates the report states (the marker sat at the nearest grid
    point before, at an escape rate of 1/6 against a reported 0)."""
    p_good = np.array([0.5012, 0.5016, 0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.4, 0.5004, 0.45])
    is_good = np.array([True] * 6 + [False] * 6)
    threshold = 0.5008
    sweep = M.threshold_sweep(p_good, is_good, threshold=threshold)
    k = sweep["threshold"].index(threshold)
    rates = M.good_defect_rates(p_good, is_good, threshold)
    assert sweep["escape_rate"][k] == rates["escape_rate"] == 0.0
    assert sweep["false_reject_rate"][k] == rates["false_reject_rate"] == 0.0
    assert sweep["threshold"] == sorted(sweep["threshold"]) and 0.0 in sweep["threshold"] and 1.0 in sweep["threshold"]


def test_threshold_sweep_agrees_with_counting_and_stays_small():
    rng = np.random.default_rng(0)
    p_good, is_good = rng.random(5000), rng.random(5000) < 0.7
    sweep = M.threshold_sweep(p_good, is_good, threshold=0.4321)
    assert len(sweep["threshold"]) <= 2000 + 201 + 1  # not one point per image of a large test set
    for t, esc, fr in list(zip(sweep["threshold"], sweep["escape_rate"], sweep["false_reject_rate"]))[::97]:
        rates = M.good_defect_rates(p_good, is_good, t)
        assert esc == pytest.approx(rates["escape_rate"]) and fr == pytest.approx(rates["false_reject_rate"])


@pytest.mark.parametrize("p_good, is_good, target, expected", [
    # a missed defect scored exactly 1.0 (float32 softmax at a logit gap above ~17), escape 0:
    # reject everything, with a threshold just above 1.0
    ([1.0, 1.0, 0.99999994, 0.2], [True, False, True, False], "escape:0", "reject all"),
    # a good image scored exactly 0.0, false reject 0: accept everything with a threshold of 0
    ([0.0, 0.3, 0.9], [True, True, False], "false_reject:0", "accept all"),
])
def test_thresholds_at_the_ends_of_the_range_stay_exportable(p_good, is_good, target, expected):
    from vision_tl.deploy.metadata import REJECT_ALL, ModelMetadata

    choice = M.select_threshold(np.array(p_good, np.float32), np.array(is_good), target)
    t = choice["threshold"]
    assert 0.0 <= t <= REJECT_ALL
    rates = M.good_defect_rates(np.array(p_good, np.float32), np.array(is_good), t)
    if expected == "reject all":
        assert rates["false_reject_rate"] == 1.0 and rates["escape_rate"] == 0.0
    else:
        assert t == 0.0 and rates["false_reject_rate"] == 0.0
    meta = ModelMetadata(classes=["bad", "good"], input_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3,
                         good_class="good", threshold=t)
    assert ModelMetadata.from_props(meta.to_props(), "m.onnx").threshold == t  # export writes it, the line reads it


def test_a_report_of_non_finite_probabilities_names_the_images_and_writes_nothing(tmp_path):
    from vision_tl.reports.report import ReportError, write_report

    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]])
    with pytest.raises(ReportError, match=r"non-finite probabilities .* 1 image\(s\): b\.png"):
        write_report(tmp_path, probs, np.array([0, 1, 1]), ["good", "dent"], paths=["a.png", "b.png", "c.png"],
                     good_class="good", threshold=0.5)
    assert not list(tmp_path.iterdir())


def test_a_split_of_one_class_draws_its_curves_without_a_warning(tmp_path):
    import warnings

    from vision_tl.reports import plots

    probs = np.array([[0.8, 0.2], [0.9, 0.1], [0.7, 0.3]])
    result = M.evaluate(probs, np.array([0, 0, 0]), ["ok", "defect"])  # val holds good images only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of an empty legend
        png = plots.plot_roc_pr(result["curves"], tmp_path / "roc.png", title="val")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_nan_probabilities_and_labels_outside_the_classes():
    """The README promises metrics are never NaN: a NaN row gave ECE NaN and an argmax of class 0."""
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]])
    with pytest.raises(ValueError, match=r"probabilities of 1 image\(s\) are NaN or infinite \(first: row 1\)"):
        M.evaluate(probs, np.array([0, 1, 1]), ["good", "dent"])
    with pytest.raises(ValueError, match=r"labels must be class indices 0\.\.1, got 0\.\.2"):
        M.evaluate(np.full((2, 2), 0.5), np.array([0, 2]), ["good", "dent"])


@pytest.mark.parametrize("p_good, is_good, target", [
    ([0.18447742, 0.5, 0.9], [True, False, True], "false_reject:0"),   # every image passes
    ([0.3, 0.6, 0.95], [True, True, False], "escape:0"),                # every image is rejected
    ([0.3, 0.6, 0.99999994], [True, True, False], "escape:0"),          # ... the highest a hair below 1
])
def test_a_threshold_beyond_every_score_keeps_a_margin_the_exported_model_does_not_cross(p_good, is_good, target):
    """ONNX Runtime's P(good) differs from PyTorch's in the 7th decimal: a threshold one float step
    from the lowest or highest score flipped that image in the export's parity check, which then
    refused the kit's own thresholded checkpoint."""
    p_good = np.array(p_good, np.float32)
    choice = M.select_threshold(p_good, np.array(is_good), target)
    for noise in (-1e-6, 1e-6):
        shifted = M.good_defect_rates(np.clip(p_good + noise, 0, 1), np.array(is_good), choice["threshold"])
        assert (shifted["escapes"], shifted["false_rejects"]) == (choice["escapes"], choice["false_rejects"])



@pytest.mark.parametrize("p_good,is_good,message", [
    ([0.9, 0.2], ["good", "scratch"], "is_good must be True/False"),
    ([0.9, 0.2, 0.4], [True, False], "of one length"),
    ([0.9, np.nan], [True, False], "NaN or infinite"),
])
def test_select_threshold_refuses_inputs_it_would_misread(p_good, is_good, message):
    with pytest.raises(M.ThresholdError, match=message):
        M.select_threshold(np.array(p_good), np.array(is_good), "false_reject:0.1")


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_predictions_csv_is_defect_counts_the_escapes_the_report_counts(threshold):
    """Without a threshold the report counted escapes by the most probable class while the CSV's
    is_defect was empty: a reader could not find the escaped images in it."""
    import csv
    import io

    from vision_tl.reports.report import _predictions_csv

    gvd = M.good_vs_defect(PROBS, LABELS, CLASSES, "good", threshold)
    rows = list(csv.DictReader(io.StringIO(_predictions_csv(PROBS, LABELS, CLASSES, None, "good", threshold))))
    defect = [row["is_defect"] for row in rows]
    assert set(defect) == {"true", "false"}
    assert sum(d == "false" and row["true"] != "good" for d, row in zip(defect, rows)) == gvd["escapes"] == 1
    assert sum(d == "true" and row["true"] == "good" for d, row in zip(defect, rows)) == gvd["false_rejects"]
    if threshold is None:
        assert defect == ["false", "false", "true", "true", "false", "true"]  # predicted class other than good


def test_predictions_csv_leaves_is_defect_empty_without_a_good_class():
    import csv
    import io

    from vision_tl.reports.report import _predictions_csv

    rows = list(csv.DictReader(io.StringIO(_predictions_csv(PROBS, LABELS, CLASSES, None, None, None))))
    assert len(rows) == len(LABELS) and all(row["is_defect"] == "" for row in rows)
