"""Callbacks: the run directory's artifacts and gradual unfreezing."""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, ProgressBar, TQDMProgressBar

from vision_tl.deploy.predictor import prediction_columns, probability_text
from vision_tl.imaging import decode_error
from vision_tl.models.finetuning import unfreeze_stages
from vision_tl.tasks.classifier import gather_shares
from vision_tl.tasks.resume import TIE_BREAK, RunCheckpoint, best_mode
from vision_tl.utils import LOG_INTERVAL, read_run_metrics, say
from vision_tl.utils.files import atomic_write_text, path_lock, path_text, shown_path


class RunArtifacts(L.Callback):
    """Writes the run directory's files (``trainer.log_dir``): ``labels.json``; for fit also
    ``split.json``, ``metrics.json``, a confusion-matrix PNG and ``training_curves.png``; for
    test its report; for predict ``predictions.csv``.

    Args:
        monitor: validation metric that picks the best epoch (must match the checkpoint's).
        mode: ``max``, ``min`` or ``auto`` (min for a loss; the checkpoint's ``mode``).
    """

    def __init__(self, monitor: str = "val/balanced_acc", mode: str = "auto") -> None:
        if mode not in ("auto", "max", "min"):
            raise ValueError(f"mode must be 'auto', 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, best_mode(monitor) if mode == "auto" else mode
        # the first epoch trained in this run folder, where a run continued into a new folder
        # (its best checkpoint is among the epochs trained here, not the earlier folder's)
        self.since_epoch = 0
        self.history: list[dict] = []
        self._predictions: list[torch.Tensor] = []
        self.unreadable = 0  # images `predict` wrote as error rows (the command then exits 3)

    def run_dir(self, trainer: L.Trainer) -> Path:
        """The run directory, resolved once in :meth:`setup`.

        ``trainer.log_dir`` is a collective call under DDP (it broadcasts from rank 0),
        so it must run on every rank at the same point, never inside a rank-0-only branch.
        """
        path = getattr(self, "_run_dir", None) or Path(trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def state_dict(self) -> dict:
        # Saved in checkpoints, so a resumed run's metrics.json keeps the epochs before the stop.
        return {"history": self.history, "since_epoch": self.since_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self.since_epoch = int(state_dict.get("since_epoch", 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a checkpoint callback that kept no best checkpoint from the restored state: the run
        # continues in a new folder, whose best is one of the epochs trained from now on
        checkpoint = trainer.checkpoint_callback
        if self.history and checkpoint is not None and not getattr(checkpoint, "best_model_path", ""):
            self.since_epoch = self.history[-1]["epoch"] + 1  # (the trainer's epoch is restored later)

    @staticmethod
    def _writes(trainer: L.Trainer) -> bool:
        """Whether this process writes the run's files: rank 0, unless ``--trainer.fast_dev_run``
        (one batch of each loop, a smoke test that Lightning runs without loggers: there is no
        run directory, and its files would land in ``./runs`` over the last smoke test's)."""
        return trainer.is_global_zero and not trainer.fast_dev_run

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank
        if trainer.fast_dev_run and trainer.is_global_zero:
            say(f"vision_tl: --trainer.fast_dev_run: a smoke test of {_batches(trainer)} per loop; nothing is written "
                "(no run directory, checkpoints, metrics or predictions)")
        if not self._writes(trainer):
            return
        run = self.run_dir(trainer)
        atomic_write_text(run / "labels.json", json.dumps(pl_module.classes, indent=1))
        datamodule = trainer.datamodule
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "save_split"):
            datamodule.setup(stage)
            datamodule.save_split(run / "split.json")
            for line in datamodule.summary().splitlines():
                say(f"vision_tl: {line}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_validation_epoch_end: Lightning runs callbacks' epoch-end hooks before the
        # module's, so eval_results would still hold the previous epoch (or the sanity check).
        if not trainer.sanity_checking and "val" in pl_module.eval_results:
            entry = dict(pl_module.eval_results["val"])
            value = trainer.callback_metrics.get(self.monitor)  # any logged metric (val/loss ...)
            if value is not None:
                entry["monitored"] = float(value)
            tie = trainer.callback_metrics.get(TIE_BREAK)
            if tie is not None:
                entry["tie_break"] = float(tie)
            self.history.append(entry)
            if trainer.state.fn == "fit" and self._writes(trainer):
                # after every epoch, so a run stopped half-way has its metrics too (the plot: at the end)
                # (ranked: the checkpoint callback runs after this hook and may save this epoch)
                self._write_metrics(trainer, pl_module, "val", self.best_epoch(), plot=False)

    def best_epoch(self, trainer: L.Trainer | None = None) -> dict | None:
        """The epoch the checkpoint callback keeps as best: the monitored value's max (``mode``
        max) or min, among equals the one with the lowest :data:`TIE_BREAK` (validation loss),
        then the earliest, among the epochs trained in this run folder. With ``trainer`` (at the
        end of fit), the epoch its checkpoint callback saved as best, where it has one: the two
        differ where the callback did not see every epoch (``every_n_epochs``)."""
        key = self.monitor.split("/", 1)[-1]
        mine = [r for r in self.history if r["epoch"] >= self.since_epoch] or self.history
        if not mine:
            return None
        saved = getattr(getattr(trainer, "checkpoint_callback", None), "best_epoch", None)
        held = [r for r in mine if r["epoch"] == saved]  # (several with val_check_interval < 1)
        sign = 1.0 if self.mode == "max" else -1.0

        def score(r: dict) -> float:
            value = r.get("monitored", r.get(key))
            return float("-inf") if value is None or value != value else sign * float(value)

        def tie(r: dict) -> float:
            value = r.get("tie_break")
            return float("-inf") if value is None or value != value or self.monitor == TIE_BREAK else -value
        return max(held or mine, key=lambda r: (score(r), tie(r), -r["epoch"]))

    def _write_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, result: dict,
                       plot: bool = True) -> None:
        run = self.run_dir(trainer)
        path = run / "metrics.json"
        with path_lock(path):  # (shared with a report adding its section meanwhile)
            # a damaged file must not stop training: it is kept aside, with a warning (or, where it
            # cannot be moved, left alone: None)
            metrics = read_run_metrics(path, on_damage="set_aside")
            if metrics is not None:
                metrics.update({"classes": pl_module.classes, stage: result})
                if stage == "val":
                    metrics["val_last"] = self.history[-1]
                    if self.since_epoch:  # (the training curves shade the epochs of the earlier folder)
                        metrics["since_epoch"] = self.since_epoch
                    metrics["history"] = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                                          for r in self.history]
                atomic_write_text(path, json.dumps(metrics, indent=1))
        if not plot:
            return
        from vision_tl.reports import plot_confusion_matrix

        plot_confusion_matrix(result["confusion_matrix"], pl_module.classes,
                              run / f"confusion_matrix_{stage}.png", title=f"{stage} (epoch {result['epoch']})")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = self.best_epoch(trainer)
        checkpoints = trainer.checkpoint_callback
        saved = checkpoints.best_model_path if isinstance(checkpoints, RunCheckpoint) else None
        if trainer.fast_dev_run:
            if trainer.is_global_zero:
                say(f"vision_tl: fast_dev_run passed: the settings train and validate {_batches(trainer)}; nothing "
                    "was written. Leave out --trainer.fast_dev_run to train")
            return
        if trainer.is_global_zero and saved is not None and not (saved and Path(saved).is_file()):
            why, fix = (("training ended before an epoch was validated", "train for at least one whole epoch (see "
                         "--trainer.max_steps / max_time / limit_train_batches)") if best is None else
                        ("no validated epoch was saved", "give --checkpoint.every_n_epochs at most the number "
                         "of epochs"))
            warnings.warn(f"{why}, so run {self.run_dir(trainer)} has no checkpoints/best.ckpt for report, export or "
                          f"test; {fix}", stacklevel=2)
        if trainer.is_global_zero and best is not None:
            self._write_metrics(trainer, pl_module, "val", best)
            self._write_training_curves(trainer)
            say(f"vision_tl: best epoch {best['epoch']}: {best_summary(best)}; run directory "
                f"{shown_path(self.run_dir(trainer))}")

    def _write_training_curves(self, trainer: L.Trainer) -> None:
        """``training_curves.png`` from the files just written (metrics.json, and metrics.csv, which
        Lightning writes out at every logging call); a figure that fails warns, never fails the fit
        that trained the run."""
        from vision_tl.reports.training import write_training_curves

        try:
            write_training_curves(self.run_dir(trainer))
        except Exception as exc:  # noqa: BLE001 - a picture is not worth the trained run
            warnings.warn(f"could not draw {self.run_dir(trainer) / 'training_curves.png'} ({type(exc).__name__}: "
                          f"{exc}); the run itself is complete", stacklevel=2)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "validate" and self._writes(trainer):  # test and predict name theirs in their own lines
            say(f"vision_tl: validation logged in {self.run_dir(trainer)} (config.yaml, metrics.csv)")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._writes(trainer) and "test" in pl_module.eval_results:
            self._write_metrics(trainer, pl_module, "test", pl_module.eval_results["test"])
            self._write_test_report(trainer, pl_module)

    def _write_test_report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The HTML report from the probabilities collected during test (no second pass)."""
        from vision_tl.reports.report import write_report

        outputs = getattr(pl_module, "eval_outputs", {}).get("test")
        if outputs is None:
            return
        samples = getattr(trainer.test_dataloaders, "dataset", None)
        samples = getattr(samples, "samples", None)
        paths = [str(s.path) for s in samples] if samples and len(samples) == len(outputs["labels"]) else None
        info = {"checkpoint": trainer.ckpt_path, "backbone": pl_module.hparams.get("backbone")}
        on_val = self._tests_the_val_split(trainer)
        if on_val:  # (a note at the top, as `vision-tl report` gives its val images)
            info["notes"] = ["the val split (the folder has no test/ split) chose the best checkpoint, so these "
                             "scores are optimistic, not an independent estimate: hold out ROOT/test/<class>/ "
                             "for one"]
        result = write_report(self.run_dir(trainer), outputs["probabilities"], outputs["labels"], pl_module.classes,
                              paths=paths, good_class=pl_module.hparams.get("good_class"),
                              threshold=getattr(pl_module, "threshold", None), split="test",
                              images_split="val" if on_val else None, info=info)
        say(f"vision_tl: test report {result.html}")

    @staticmethod
    def _tests_the_val_split(trainer: L.Trainer) -> bool:
        """Whether `test` evaluated the val split, the folder having no test/ split."""
        datamodule = getattr(trainer, "datamodule", None)
        return hasattr(datamodule, "has_test_split") and not datamodule.has_test_split()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.received_sigterm:  # Lightning's predict loop never looks (fit's and evaluation's do)
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            self._predictions.clear()
            raise SIGTERMException
        if "index" in outputs:
            self._predictions.append(torch.cat([outputs["index"].reshape(-1, 1).to(outputs["probabilities"]),
                                                outputs["probabilities"].float()], dim=1))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = getattr(trainer.datamodule, "predict_samples", None)
        if samples is None:  # not the kit's data module: no file names to write rows for
            return
        rows = torch.cat(self._predictions) if self._predictions else torch.zeros(0, 1 + len(pl_module.classes))
        self._predictions.clear()
        rows = torch.cat(gather_shares(pl_module, rows)) if trainer.world_size > 1 else rows  # on every rank
        if not self._writes(trainer):
            return
        rows = rows.detach().cpu()  # on a GPU the step's outputs stay there (one copy, not one per row)
        by_index = {int(r[0]): r[1:].numpy() for r in rows}
        classes, good = pl_module.classes, pl_module.hparams.get("good_class")
        threshold = getattr(pl_module, "threshold", None)
        decide = good in classes and threshold is not None
        table = []
        for i, sample in enumerate(samples):
            true = classes[sample.label] if sample.label >= 0 else ""
            p = by_index.get(i)
            if p is None:
                table.append((path_text(sample.path), [true, "", "", *[""] * len(classes), "", decode_error(sample.path)]))
                continue
            k = int(p.argmax())
            # in float64, as report compares: a threshold one step above 1.0 (reject all) is not 1.0
            defect = [str(float(p[classes.index(good)]) < float(threshold)).lower()] if decide else [""]
            table.append((path_text(sample.path), [true, classes[k], probability_text(p[k]), *map(probability_text, p),
                                             *defect, ""]))
        for path, why in getattr(trainer.datamodule, "predict_bad", []):
            table.append((path_text(path), ["", "", "", *[""] * len(classes), "", why]))
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(prediction_columns(classes))
        writer.writerows([path, *row] for path, row in sorted(table))
        path = self.run_dir(trainer) / "predictions.csv"
        atomic_write_text(path, out.getvalue())
        failed = sum(1 for _, row in table if row[-1])
        self.unreadable = failed
        say(f"vision_tl: wrote {len(table)} prediction(s) to {path}"
                        + (f" ({failed} image(s) could not be read: see the error column; exit status 3)"
                           if failed else ""))
        say(_predicted_counts([row for _, row in table], classes, good if decide else None, threshold))


def _predicted_counts(rows: list[list[str]], classes: list[str], good: str | None, threshold: float | None) -> str:
    """``vision_tl: predicted ok 95, scratch 12, dent 0; defects (P(ok) < 0.43): 12 of 107``, from
    predictions.csv's rows (true class, predicted class, ..., is_defect, error), as predict-onnx sums up."""
    counts = Counter(row[1] for row in rows if row[1])
    line = "vision_tl: predicted " + ", ".join(f"{name} {counts[name]}" for name in classes)
    if good is not None:
        judged = [row[-2] for row in rows if row[-2]]
        line += f"; defects (P({good}) < {float(threshold)!r}): {judged.count('true')} of {len(judged)}"
    return line


def best_summary(best: dict) -> str:
    """The kept epoch's scores for fit's last line, with the good/defect threshold chosen for it
    (``--model.threshold_target``) and that threshold's rates on val: the numbers the checkpoint
    carries into ``export``, otherwise only found in metrics.json."""
    summary = ", ".join(f"{k}={best[k]:.4f}" for k in ("acc", "balanced_acc", "f1_macro"))
    if best.get("threshold") is not None:
        rates = [f"{name} {best[key]:.4f}" for key, name in (("escape_rate", "escape rate"),
                                                              ("false_reject_rate", "false-reject rate"))
                 if best.get(key) is not None]
        summary += f"; threshold {best['threshold']:.4f}" + (f" ({', '.join(rates)} on val)" if rates else "")
    return summary


def _batches(trainer: L.Trainer) -> str:
    """'one batch' or 'N batches': what ``--trainer.fast_dev_run`` (True or a number) runs of each loop."""
    n = int(trainer.fast_dev_run)  # (Lightning keeps True for 1)
    return "one batch" if n == 1 else f"{n} batches"


def _train_what_the_optimizer_holds(pl_module: L.LightningModule, optimizer) -> None:
    """A resumed run checkpointed before the layers timm's group matcher leaves out (a final
    norm, a head convolution) joined the last stage: each milestone then unfroze one real stage
    fewer than it counts now, and the restored parameter groups hold what it unfroze then. A
    stage no group holds would never train while its BatchNorm statistics moved: train the last
    stages the optimizer holds, as the run did before it stopped."""
    from vision_tl.backbones import backbone_stages
    from vision_tl.models.finetuning import apply_mode

    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    net = pl_module.net
    if all(id(p) in held for p in net.parameters() if p.requires_grad):
        return
    stages = backbone_stages(net.backbone)
    n = 0
    while n < len(stages) and all(id(p) in held for m in stages[-n - 1] for p in m.parameters()):
        n += 1
    if n == 0 or n == len(stages):
        raise ValueError("GradualUnfreezing: the resumed optimizer does not hold the backbone stages this run "
                         "trains (a checkpoint of an older vision_tl, which counted stages otherwise); start a new "
                         "run (without --ckpt_path)")
    apply_mode(net, "partial", n, pl_module.hparams.freeze_bn)
    for param in net.parameters():  # what trained before (a ViT's tokens) keeps training
        if id(param) in held:
            param.requires_grad = True
    warnings.warn(f"vision_tl: this checkpoint's optimizer holds the last {n} backbone stage(s) as this version "
                  f"counts the stages of {type(net.backbone).__name__} (a final norm or head convolution, once a "
                  "stage of its own, now belongs to the last stage); the resumed run trains those, as it did "
                  "before it stopped", stacklevel=2)


class GradualUnfreezing(BaseFinetuning):
    """Unfreeze more backbone stages at epoch milestones, e.g. ``{3: 2, 6: 4}``.

    Newly trainable stages join the optimiser as a parameter group at
    ``lr * backbone_lr_factor`` of the module's hyperparameters.
    """

    def __init__(self, milestones: dict[int, int]) -> None:
        super().__init__()
        self.milestones = {int(k): int(v) for k, v in milestones.items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            # DDP averages the gradients of the parameters that train when it wraps the model;
            # ones unfrozen later would train on each process apart and drift apart
            raise ValueError(
                f"GradualUnfreezing cannot run with {trainer.world_size} processes: DDP synchronises only the "
                "parameters that train from the start, so the ones it unfreezes would differ between processes. "
                "Train with --model.mode partial --model.trainable_stages N (or full) instead, or on one process")
        if stage == "fit":
            self._check_milestones(pl_module.net.backbone, trainer.max_epochs)
        super().setup(trainer, pl_module, stage)

    def _check_milestones(self, backbone, max_epochs: int | None) -> None:
        """Milestones that could never fire, or name a stage count the backbone lacks, refused
        before training (they failed after epochs of it, naming trainable_stages, or never fired)."""
        from vision_tl.backbones import backbone_stages

        if not self.milestones:
            return
        try:
            n = len(backbone_stages(backbone))
        except ValueError as exc:
            raise ValueError(f"GradualUnfreezing: {exc}; train with --model.mode full instead") from exc
        for epoch, count in sorted(self.milestones.items()):
            if epoch < 0 or (max_epochs is not None and 0 < max_epochs <= epoch):
                last = f"0..{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else "0 on"
                raise ValueError(f"GradualUnfreezing milestones {{{epoch}: {count}}}: epoch {epoch} never comes (this fit "
                                 f"trains epochs {last}); give an epoch in that range, or more --trainer.max_epochs")
            if count < 1:  # (more than the backbone has: all of it, as unfreeze_stages reads it)
                raise ValueError(f"GradualUnfreezing milestones {{{epoch}: {count}}}: {count} stages; give 1 to {n}, "
                                 f"the number of last stages of {type(backbone).__name__} to train (or more: all)")

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """The module's ``mode`` already froze what must start frozen."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resumed = self._restarting  # Lightning clears it here, before the epoch count is restored
        super().on_fit_start(trainer, pl_module)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        if getattr(self, "_resumed", False):
            # Lightning restored the parameter groups added before the stop, but the module's
            # ``mode`` froze their parameters again: unfreeze what the past milestones unfroze,
            # or those stages would never train again (nor match a run never stopped)
            self._resumed = False
            done = [n for milestone, n in self.milestones.items() if milestone < epoch]
            if done:
                unfreeze_stages(pl_module.net, max(done), pl_module.hparams.freeze_bn)
                _train_what_the_optimizer_holds(pl_module, optimizer)
        if epoch not in self.milestones:
            return
        params = unfreeze_stages(pl_module.net, self.milestones[epoch], pl_module.hparams.freeze_bn)
        if params:
            lr = pl_module.hparams.lr * pl_module.hparams.backbone_lr_factor
            # from its first step on the schedule (warm-up, cosine) the other groups follow; at the
            # base rate, every newly trained weight took one full-size AdamW step first
            schedules = [c.scheduler for c in pl_module.trainer.lr_scheduler_configs if hasattr(c.scheduler, "factor")]
            now = schedules[0].factor(schedules[0].last_epoch) if schedules else 1.0
            optimizer.add_param_group({"params": params, "lr": lr * now, "initial_lr": lr, "name": f"unfrozen@{epoch}"})
            pl_module.print(f"vision_tl: epoch {epoch}: unfroze {sum(p.numel() for p in params):,} parameters")
        else:  # a milestone counts the last N stages in all, those the mode trains included
            pl_module.print(f"vision_tl: epoch {epoch}: the last {self.milestones[epoch]} stage(s) train already "
                            f"(mode {pl_module.hparams.mode}); nothing more to unfreeze (a milestone counts stages "
                            "from the end, those training from the start included)")


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's progress bar, redrawn during training at most every ``min_interval`` seconds.

    Every redraw reads the training loss back from the device, which makes the CPU wait for
    the GPU to finish the step. Redrawn after every batch, that wait stops the CPU from
    queueing the next batch's copy and kernels ahead of time; on a GPU fast enough for a
    step to take milliseconds, it costs a large share of the throughput. ``vision-tl fit``
    uses this bar in place of Lightning's default. The loss shown is the model's
    ``last_train_loss`` (the classifier logs ``train/loss`` without Lightning's every-step
    progress-bar read-back).
    """

    def __init__(self, min_interval: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_interval = min_interval
        self._last_draw = float("-inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self._train_progress_bar
        now = time.monotonic()
        last = bar is not None and bar.total is not None and batch_idx + 1 >= bar.total
        if last or now - self._last_draw >= self.min_interval:
            self._last_draw = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_train_loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            items["train/loss"] = f"{loss.item():.3g}"  # read back here, at most every min_interval
        return items


class LogLineProgress(ProgressBar):
    """Progress as plain lines, for output that goes to a log file or a pipe (a batch job's log,
    ``| tee``, a scheduled task) rather than a terminal: a line for every finished epoch with its
    scores, and inside a long epoch or evaluation a line every ``interval`` seconds with the
    batches done and the time left. A bar's redraws would pile hundreds of carriage-return
    half-lines into the log. ``vision-tl`` uses it where standard output is not a terminal or
    a notebook."""

    SCORES = (("train/epoch_loss", "train loss"), ("val/loss", "val loss"), ("val/acc", "val acc"),
              ("val/balanced_acc", "balanced acc"), ("val/f1_macro", "macro F1"))

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._validated = False  # this epoch
        self._started = self._last = time.monotonic()
        self._loop_started = self._started  # the running validation, test or predict loop's start
        self._skipped: int | None = None  # batches of this epoch done before this process (a mid-epoch resume)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, **kwargs) -> None:
        if self._enabled:
            print(*args, **{"flush": True, **kwargs})

    @staticmethod
    def _epoch_label(trainer, epoch: int) -> str:
        """``2 (3 of 15)``: the epoch's number as the kit's other lines and files count it (from 0:
        "best epoch 2", metrics.json, GradualUnfreezing's milestones), then how far the fit is;
        ``2`` without an epoch limit."""
        total = trainer.max_epochs
        return f"{epoch} ({epoch + 1} of {total})" if total is not None and total > 0 else str(epoch)

    # -- a line per finished epoch, once validation has run (before checkpoints are written)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = self._last = time.monotonic()
        self._validated = False
        self._skipped = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._enabled:
            return
        metrics = dict(trainer.callback_metrics)
        loss = getattr(pl_module, "epoch_train_loss", None)  # (logged only after this hook)
        if loss is not None:
            metrics["train/epoch_loss"] = loss
        scores = [f"{label} {float(metrics[key]):.4f}" for key, label in self.SCORES
                  if key in metrics and (self._validated or not key.startswith("val/"))]
        self.print(f"epoch {self._epoch_label(trainer, trainer.current_epoch)} done in "
                   f"{_clock(time.monotonic() - self._started)}" + (": " + ", ".join(scores) if scores else ""))

    # -- within a loop: a line every `interval` seconds

    def _tick(self, what: str, done: int, total, since: float | None = None, skipped: int = 0) -> None:
        """A line on the loop ``what``, ``done`` batches of ``total`` in, begun at ``since`` (the
        epoch's start by default) after ``skipped`` batches done before it (a resumed epoch's), at
        most every ``interval`` seconds."""
        now = time.monotonic()
        if not self._enabled or now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - (self._started if since is None else since)
        known = total is not None and total != float("inf")
        line = f"{what}: batch {done}" + (f"/{int(total)}" if known else "")
        if known and done > skipped:
            line += f", {_clock(elapsed)} so far, about {_clock(elapsed / (done - skipped) * (total - done))} left"
        self.print(line)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._skipped is None:
            self._skipped = batch_idx  # (0, unless resumed from a mid-epoch checkpoint)
        self._tick(f"epoch {self._epoch_label(trainer, trainer.current_epoch)}", batch_idx + 1, self.total_train_batches,
                   skipped=self._skipped)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self.has_dataloader_changed(dataloader_idx)  # (what the totals below are of)
            # (its own time: in fit, the epoch's training so far would make its time left many times too long)
            self._tick("validation", batch_idx + 1, self.total_val_batches_current_dataloader, self._loop_started)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.has_dataloader_changed(dataloader_idx)
        self._tick("test", batch_idx + 1, self.total_test_batches_current_dataloader, self._loop_started)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.has_dataloader_changed(dataloader_idx)
        self._tick("predict", batch_idx + 1, self.total_predict_batches_current_dataloader, self._loop_started)

    def _loop_start(self, trainer, pl_module) -> None:
        self.reset_dataloader_idx_tracker()
        self._loop_started = time.monotonic()
        if trainer.state.fn != "fit":  # (in fit, the epoch's line counts its validation in)
            self._started = self._last = self._loop_started

    on_validation_start = on_test_start = on_predict_start = _loop_start


def _clock(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
