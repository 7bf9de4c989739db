"""Which epoch is kept as best when the monitored metric ties: the lower validation loss.

A val split with one image of a rare class moves balanced accuracy in big steps; it can stay
flat for a whole run, and keeping the earliest of equal epochs kept the untrained epoch 0.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from vision_tl.tasks.callbacks import RunArtifacts
from vision_tl.tasks.resume import RunCheckpoint

# epoch -> (balanced accuracy, validation loss): flat, then worse, with the loss falling first
SCORES = [(0.5, 0.9), (0.5, 0.4), (0.5, 0.6), (0.25, 0.1)]


class _Flat(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        acc, loss = SCORES[self.current_epoch]
        self.log("val/balanced_acc", acc)
        self.log("val/loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 2)), batch_size=2)

    val_dataloader = train_dataloader


def test_a_tie_keeps_the_epoch_with_the_lower_validation_loss(tmp_path):
    checkpoint = RunCheckpoint(dirpath=tmp_path, filename="best", monitor="val/balanced_acc", mode="max",
                               save_last=True, auto_insert_metric_name=False)
    trainer = L.Trainer(max_epochs=len(SCORES), callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(_Flat())
    best = torch.load(tmp_path / "best.ckpt", weights_only=True, map_location="cpu")
    assert best["epoch"] == 1  # not epoch 0 (first of the ties), not epoch 2 (a tie with a higher loss)
    assert checkpoint.tie_values == {str(tmp_path / "best.ckpt"): pytest.approx(0.4)}
    restored = RunCheckpoint(dirpath=tmp_path, filename="best", monitor="val/balanced_acc", mode="max")
    restored.load_state_dict(checkpoint.state_dict())  # a resumed run goes on breaking ties the same way
    assert restored.tie_values == checkpoint.tie_values


def test_metrics_json_names_the_same_best_epoch_as_the_checkpoint():
    artifacts = RunArtifacts(monitor="val/balanced_acc", mode="max")
    artifacts.history = [{"epoch": e, "balanced_acc": a, "monitored": a, "tie_break": loss}
                         for e, (a, loss) in enumerate(SCORES)]
    assert artifacts.best_epoch()["epoch"] == 1
    for entry in artifacts.history:  # runs recorded before ties were broken: the earliest, as then
        del entry["tie_break"]
    assert artifacts.best_epoch()["epoch"] == 0
    by_loss = RunArtifacts(monitor="val/loss", mode="min")
    by_loss.history = [{"epoch": e, "monitored": loss, "tie_break": loss} for e, (_, loss) in enumerate(SCORES)]
    assert by_loss.best_epoch()["epoch"] == 3


def test_mode_auto_keeps_the_lowest_loss_and_the_highest_accuracy():
    assert RunCheckpoint(monitor="val/loss", mode="auto").mode == "min"
    assert RunCheckpoint(monitor="val/balanced_acc", mode="auto").mode == "max"
    assert RunArtifacts(monitor="val/loss", mode="auto").mode == "min"
    with pytest.warns(UserWarning, match="val/loss with --checkpoint.mode max keeps the epoch where it is highest"):
        RunCheckpoint(monitor="val/loss", mode="max")  # a config written for accuracy, then the monitor changed
    with pytest.raises(ValueError, match="'auto', 'max' or 'min'"):
        RunCheckpoint(monitor="val/loss", mode="lowest")


class _Scored(_Flat):
    def __init__(self, scores) -> None:
        super().__init__()
        self.scores = scores

    def validation_step(self, batch, batch_idx):
        acc, loss = self.scores[self.current_epoch]
        self.log("val/balanced_acc", acc)
        self.log("val/loss", loss)


def _fit(tmp_path, scores, checkpoint=None, **kwargs) -> tuple[RunCheckpoint, L.Trainer]:
    checkpoint = checkpoint or RunCheckpoint(dirpath=tmp_path, filename="best", monitor="val/balanced_acc",
                                             mode="max", auto_insert_metric_name=False, **kwargs)
    trainer = L.Trainer(max_epochs=len(scores), callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(_Scored(scores))
    return checkpoint, trainer


def _epoch(path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["epoch"]


def _artifacts_best(scores) -> int:
    artifacts = RunArtifacts(monitor="val/balanced_acc", mode="max")
    artifacts.history = [{"epoch": e, "monitored": a, **({} if loss is None else {"tie_break": loss})}
                         for e, (a, loss) in enumerate(scores)]
    return artifacts.best_epoch()["epoch"]


@pytest.mark.parametrize("save_top_k", [2, -1, 0])
def test_only_one_best_checkpoint_is_kept(tmp_path, save_top_k):
    # with more, Lightning writes each new best over the file it drops: best.ckpt would hold
    # whichever epoch landed there, not the one report, export and --ckpt_path best mean
    with pytest.raises(ValueError, match=f"save_top_k={save_top_k}: the kit keeps one best.ckpt.*"
                                         "--checkpoint.save_top_k 1"):
        _fit(tmp_path, SCORES, save_top_k=save_top_k)
    # ... which only training can break: a run's config from an older kit still evaluates
    checkpoint = RunCheckpoint(dirpath=tmp_path, monitor="val/balanced_acc", mode="max", save_top_k=save_top_k)
    L.Trainer(callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").validate(_Flat(), verbose=False)


def test_best_ckpt_carries_its_own_loss_for_a_resume_to_compare_against(tmp_path):
    scores = [(0.5, 2.0), (0.5, 1.0), (0.4, 0.1)]
    _fit(tmp_path, scores)
    best = torch.load(tmp_path / "best.ckpt", weights_only=True, map_location="cpu")
    state = next(v for k, v in best["callbacks"].items() if k.startswith("RunCheckpoint"))
    assert best["epoch"] == _artifacts_best(scores) == 1
    assert state["tie_values"] == {str(tmp_path / "best.ckpt"): pytest.approx(1.0)}  # epoch 1's, not epoch 0's


def test_a_kept_checkpoint_without_a_loss_or_with_nan_loses_a_tie_in_both_places(tmp_path):
    for i, kept_loss in enumerate((None, float("nan"))):
        checkpoint = RunCheckpoint(dirpath=tmp_path / str(i), filename="best", monitor="val/balanced_acc", mode="max",
                                   auto_insert_metric_name=False)
        checkpoint.best_k_models = {str(tmp_path / str(i) / "best.ckpt"): torch.tensor(0.5)}
        checkpoint.kth_best_model_path = checkpoint.best_model_path = str(tmp_path / str(i) / "best.ckpt")
        checkpoint.tie_values = {} if kept_loss is None else {checkpoint.best_model_path: kept_loss}
        trainer = type("T", (), {"callback_metrics": {"val/loss": torch.tensor(0.4)},
                                 "strategy": type("S", (), {"reduce_boolean_decision": staticmethod(bool)})()})()
        assert checkpoint.check_monitor_top_k(trainer, torch.tensor(0.5))  # (a run resumed from an older kit)
        assert _artifacts_best([(0.5, kept_loss), (0.5, 0.4)]) == 1


def test_metrics_json_names_the_epoch_best_ckpt_holds_when_not_every_epoch_is_checked(tmp_path):
    scores = [(0.5, 1.0), (0.5, 2.0), (0.5, 0.5), (0.5, 3.0)]  # epoch 2 is best, but never a candidate
    checkpoint = RunCheckpoint(dirpath=tmp_path, filename="best", monitor="val/balanced_acc", mode="max",
                               auto_insert_metric_name=False, every_n_epochs=2)
    _, trainer = _fit(tmp_path, scores, checkpoint)
    artifacts = RunArtifacts(monitor="val/balanced_acc", mode="max")
    artifacts.history = [{"epoch": e, "monitored": a, "tie_break": loss} for e, (a, loss) in enumerate(scores)]
    held = _epoch(tmp_path / "best.ckpt")
    assert held == checkpoint.best_epoch == 1
    assert artifacts.best_epoch(trainer)["epoch"] == held  # what fit prints and metrics.json keeps at the end
    assert artifacts.best_epoch()["epoch"] == 2  # (ranked alone: an epoch that has no checkpoint)


def test_with_several_validations_per_epoch_the_final_best_is_the_one_saved(tmp_path):
    class _Twice(_Flat):
        def train_dataloader(self):  # two batches, validated after each
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)

        def validation_step(self, batch, batch_idx):
            acc, loss = [(0.5, 1.0), (0.25, 0.5), (0.25, 0.4), (0.25, 0.3)][self.global_step - 1]
            self.log("val/balanced_acc", acc)
            self.log("val/loss", loss)

    checkpoint = RunCheckpoint(dirpath=tmp_path, filename="best", monitor="val/balanced_acc", mode="max",
                               auto_insert_metric_name=False)
    artifacts = RunArtifacts(monitor="val/balanced_acc", mode="max")
    trainer = L.Trainer(max_epochs=2, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", val_check_interval=0.5)
    trainer.fit(_Twice())
    artifacts.history = [{"epoch": e, "monitored": a, "tie_break": loss}
                         for e, (a, loss) in zip((0, 0, 1, 1), [(0.5, 1.0), (0.25, 0.5), (0.25, 0.4), (0.25, 0.3)])]
    best = torch.load(tmp_path / "best.ckpt", weights_only=True, map_location="cpu")
    assert best["global_step"] == 1  # the first validation of epoch 0
    assert artifacts.best_epoch(trainer) == artifacts.history[0]  # its metrics, not epoch 0's later ones


def _logged_balanced_acc(model, labels: list[int], predicted: list[int]) -> float:
    model.val_metrics.update(torch.nn.functional.one_hot(torch.tensor(predicted), 3).float(), torch.tensor(labels))
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    model._eval_epoch_end(model.val_metrics, "val")
    return float(logged["val/balanced_acc"])


def test_equal_balanced_accuracies_are_logged_equal_so_the_loss_breaks_the_tie():
    """Val images 1 / 6 / 12 per class: missing 1 of the 6 and 2 of the 12, or 2 of the 6, both
    average the recalls to 8/9. A float32 mean of them in class order came out one step apart
    (0.88888884 and 0.88888890), so the checkpoint took the later epoch as better, whatever its
    validation loss, instead of a tie decided by the loss."""
    from vision_tl.tasks.classifier import ImageClassifier

    model = ImageClassifier(["a", "b", "c"], backbone="test_efficientnet", pretrained=False, image_size=32)
    labels = [0] + [1] * 6 + [2] * 12
    one_and_two = [0] + [1] * 5 + [0] + [2] * 10 + [0] * 2
    two_of_six = [0] + [1] * 4 + [0] * 2 + [2] * 12
    first, second = _logged_balanced_acc(model, labels, one_and_two), _logged_balanced_acc(model, labels, two_of_six)
    assert first == second == pytest.approx(8 / 9)


def test_fits_last_line_names_the_threshold_the_kept_epoch_carries():
    """With --model.threshold_target the kept checkpoint carries a threshold into export, but fit's
    last line gave only accuracy, balanced accuracy and F1: the threshold and its rates were in
    metrics.json alone."""
    from vision_tl.tasks.callbacks import best_summary

    best = {"epoch": 3, "acc": 0.97, "balanced_acc": 0.9, "f1_macro": 0.8, "threshold": 0.6510336,
            "escape_rate": 0.5, "false_reject_rate": 0.0}
    assert best_summary(best) == ("acc=0.9700, balanced_acc=0.9000, f1_macro=0.8000; threshold 0.6510 "
                                  "(escape rate 0.5000, false-reject rate 0.0000 on val)")
    plain = {k: v for k, v in best.items() if k not in ("threshold", "escape_rate", "false_reject_rate")}
    assert best_summary(plain) == "acc=0.9700, balanced_acc=0.9000, f1_macro=0.8000"


def test_predict_sums_up_its_csv_rows_as_predict_onnx_does():
    """`vision-tl predict` prints the count per predicted class (every class, zeros too) and, with a
    good class and threshold, how many readable images are defects; unreadable rows count in neither."""
    from vision_tl.tasks.callbacks import _predicted_counts

    classes = ["ok", "dent", "scratch"]
    rows = [["", "ok", "0.9", "0.9", "0.05", "0.05", "false", ""],
            ["", "ok", "0.6", "0.6", "0.3", "0.1", "true", ""],  # ok, yet below the threshold: a defect
            ["", "dent", "0.8", "0.1", "0.8", "0.1", "true", ""],
            ["", "", "", "", "", "", "", "broken.png: cannot identify image file"]]
    assert _predicted_counts(rows, classes, None, None) == "vision_tl: predicted ok 2, dent 1, scratch 0"
    assert _predicted_counts(rows, classes, "ok", 0.7) == ("vision_tl: predicted ok 2, dent 1, scratch 0; "
                                                          "defects (P(ok) < 0.7): 2 of 3")
    # the threshold as stored, not rounded to 6 digits: "reject everything" (one step above 1) read "< 1"
    import math
    assert "defects (P(ok) < 1.0000000000000002): " in _predicted_counts(
        rows, classes, "ok", math.nextafter(1.0, 2.0))
