"""Resuming interrupted runs exactly: random state in checkpoints, ``--ckpt_path last``.

A SIGTERM or Ctrl-C stops training at the next batch boundary; the ``last.ckpt``
written at the end of the previous epoch is the resume point. Lightning restores
weights, optimiser, scheduler and loop counters from it; this callback adds the
random number generators, so a resumed CPU run with a fixed seed continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import threading
import warnings
from pathlib import Path
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vision_tl.utils import Terminated, read_run_config, say
from vision_tl.utils.files import atomic_path, temp_prefix


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        # Python's random state is a tuple of ints: plain data, safe for weights_only=True.
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


TERMINATED: list[bool] = []  # set when a Terminated stopped this process's run (the CLI exits 143)


class ResumableRandomState(L.Callback):
    """Saves the RNG states with every checkpoint and restores them when training resumes.

    They are restored at the first ``on_train_epoch_start`` after resuming (after the
    sanity check and loop set-up), so the next epoch's augmentation and dropout match.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": _rng_state()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._log_dir = Path(trainer.log_dir or ".")  # collective under DDP: every rank calls it

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Several processes: SIGTERM stops training the way Ctrl-C does (set here, after Lightning
        registered its handlers, which this replaces until fit ends and Lightning restores them). Lightning's own SIGTERM
        handler broadcasts to the other ranks from inside the handler; when the signal lands while
        a rank is in another collective (a metric's gather at the end of validation), the ranks
        wait on each other for good or gloo aborts. Ctrl-C's path makes no such call."""
        if trainer.world_size < 2 or os.name != "posix" or threading.current_thread() is not threading.main_thread():
            return
        TERMINATED.clear()

        def stop(signum, frame) -> None:
            if not TERMINATED:
                TERMINATED.append(True)
                launcher = trainer.strategy.launcher  # ranks this process started get the signal too
                if launcher is not None:
                    launcher.kill(signum)
            raise Terminated(f"signal {signum}")

        signal.signal(signal.SIGTERM, stop)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            _set_rng_state(self._pending)
            self._pending = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        log_dir = getattr(self, "_log_dir", Path("."))
        last = log_dir / "checkpoints" / "last.ckpt"
        # A data or checkpoint error is not fixed by resuming; an interruption, a crash or a full disk is.
        # MisconfigurationException: a setting Lightning refused, which resuming repeats.
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        # FileExistsError: the run directory was another command's (nothing of this one started)
        if not trainer.is_global_zero or isinstance(exception, (ValueError, MisconfigurationException,
                                                                FileExistsError)):
            return
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # a stop (Ctrl-C, SIGTERM) is simply run again; an error (a folder that cannot be written, a
        # full disk) first needs its cause, which the error printed below names, put right
        stopped = isinstance(exception, (KeyboardInterrupt, Terminated, SIGTERMException))
        what = "interrupted" if stopped else f"stopped by an error ({type(exception).__name__}, below)"
        when = "" if stopped else ", once its cause is fixed"
        # validate, test, predict, and a smoke test (no run directory: the checkpoint looked for would be
        # one in the working directory, of some other run): nothing to resume, the command is run again
        if trainer.state.fn != "fit" or trainer.fast_dev_run:
            say(f"vision_tl: {what}; nothing was written: run the same command again{when}")
            return
        best = last.with_name("best.ckpt")  # (stopped while its first last.ckpt was written)
        if last.exists() or best.exists():
            resume = last if last.exists() else best
            say(f"vision_tl: {what}; resume from the end of the last {'finished' if resume == last else 'best'} "
                f"epoch{when} with: vision-tl fit --config {shlex.quote(str(log_dir / 'config.yaml'))} "
                f"--ckpt_path {shlex.quote(str(resume))}")
        else:
            # (not "fit --config RUN/config.yaml": a run directory holding nothing but its settings is
            # removed on the way out)
            say(f"vision_tl: {what} before the first epoch's checkpoint was written, so there is nothing to "
                f"resume; start again by running the same command{when}")


# Where the monitored value ties (a val split with one image of a rare class moves balanced
# accuracy in big steps, and it may stay flat for a whole run), the epoch with the lower
# validation loss is the better one, not the earliest: that kept an untrained epoch 0 as best.
TIE_BREAK = "val/loss"


def best_mode(monitor: str | None, mode: str = "auto") -> str:
    """``mode`` for the checkpoint of ``monitor``: ``auto`` is ``min`` for a loss, else ``max``
    (accuracy, balanced accuracy, F1). A mode that contradicts a loss or an accuracy is warned
    about: ``val/loss`` with ``max`` kept the worst epoch as best."""
    name = (monitor or "").rsplit("/", 1)[-1]
    natural = "min" if "loss" in name else "max"
    if mode == "auto":
        return natural
    if mode not in ("min", "max"):
        raise ValueError(f"checkpoint mode must be 'auto', 'max' or 'min', got {mode!r}")
    if mode != natural and ("loss" in name or name in ("acc", "balanced_acc", "f1_macro")):
        warnings.warn(f"--checkpoint.monitor {monitor} with --checkpoint.mode {mode} keeps the epoch where it is "
                      f"{'highest' if mode == 'max' else 'lowest'} as best; --checkpoint.mode auto (the default) "
                      f"picks {natural}", stacklevel=3)
    return mode


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes atomically, refreshes ``last.ckpt`` every epoch, keeps
    one best checkpoint (``save_top_k`` 1) and breaks ties of the monitored value by the lower
    :data:`TIE_BREAK`.

    Lightning 2.6 only rewrites ``last.ckpt`` in a step where a top-k checkpoint was
    saved, which leaves it stale when the monitored metric stops improving; a resume
    point must be the latest epoch, not the best one.
    """

    def __init__(self, *args, **kwargs) -> None:
        if "mode" in kwargs:  # (``auto``: min for a loss, max for the rest)
            kwargs["mode"] = best_mode(kwargs.get("monitor"), kwargs["mode"])
        super().__init__(*args, **kwargs)
        self.tie_values: dict[str, float] = {}  # TIE_BREAK's value of each kept checkpoint
        self.best_epoch: int | None = None  # the epoch best.ckpt holds (what metrics.json names)

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        better = super().check_monitor_top_k(trainer, current)
        if better or current is None or self.monitor == TIE_BREAK:
            return better
        kept = self.best_k_models.get(self.kth_best_model_path)
        tie = trainer.callback_metrics.get(TIE_BREAK)
        # a missing (checkpoint written before ties were broken) or NaN loss is the worst, as in
        # RunArtifacts.best_epoch
        wins = (kept is not None and float(current) == float(kept) and tie is not None and float(tie) == float(tie)
                and float(tie) < self._tie(self.kth_best_model_path))
        return trainer.strategy.reduce_boolean_decision(wins)  # every rank decides alike

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.save_top_k != 1:
            # best.ckpt, --ckpt_path best, report and export all mean the one best epoch; with
            # more kept, Lightning writes each over the file it drops (best-v1.ckpt, ...), so
            # best.ckpt would hold whichever epoch landed there. (validate, test and predict
            # save nothing: a run's config from an older kit still evaluates.)
            raise ValueError(f"checkpoint save_top_k={self.save_top_k}: the kit keeps one best.ckpt (the best "
                             "epoch) and last.ckpt; pass --checkpoint.save_top_k 1 (checkpoint: save_top_k: 1 "
                             "in a config file)")
        self._fitting = trainer if stage == "fit" else None  # (its ckpt_path is set by the time state loads)
        super().setup(trainer, pl_module, stage)

    def _tie(self, path: str) -> float:
        value = self.tie_values.get(path)
        return float("inf") if value is None or value != value else value

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tie_values": dict(self.tie_values), "best_epoch": self.best_epoch}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write to a temporary file beside ``filepath``, then rename: a kill or a full disk
        mid-write never leaves a partial checkpoint under the final name. A ``fast_dev_run``
        writes none (Lightning's own end-of-training ``last.ckpt`` does not check for it)."""
        if trainer.fast_dev_run:
            return
        if filepath in self.best_k_models:  # the new best: its loss, in the state it saves too
            tie = trainer.callback_metrics.get(TIE_BREAK)
            self.tie_values = {k: v for k, v in self.tie_values.items() if k in self.best_k_models}
            if tie is not None:
                self.tie_values[filepath] = float(tie)
            self.best_epoch = trainer.current_epoch
        path = Path(filepath)
        try:
            with contextlib.ExitStack() as stack:
                if trainer.is_global_zero:  # the one rank that writes, through atomic_path
                    path.parent.mkdir(parents=True, exist_ok=True)  # (checkpoints/ at the first save)
                    tmp = stack.enter_context(atomic_path(path))
                else:  # the others only join save_checkpoint's collectives; nothing is written here
                    tmp = path.with_name(f"{temp_prefix(path)}unused.tmp")
                trainer.save_checkpoint(tmp, self.save_weights_only)
        except OSError as exc:
            raise OSError(exc.errno, f"could not write checkpoint {path}: {exc.strerror or exc}; the previous "
                          "checkpoint, if any, is unchanged") from exc
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the best/last bookkeeping when the run is the same but its folder is spelled
        differently (a relative ``runs/...`` when it started, absolute when resumed, or the same
        run reached from another working directory). Lightning compares the strings, and on a
        mismatch wrote ``best-v1.ckpt``/``last-v1.ckpt`` beside stale ``best.ckpt``/``last.ckpt``."""
        old = state_dict.get("dirpath")
        trainer = getattr(self, "_fitting", None)
        resumed = trainer.ckpt_path if trainer is not None else None
        # the same run: its folder spelled otherwise, or the run renamed or moved (a resume reads its
        # checkpoint from the folder it continues in)
        same_run = old and self.dirpath and (
            Path(old).parts[-3:] == Path(self.dirpath).parts[-3:]
            or resumed is not None and _same_folder(Path(resumed).parent, Path(self.dirpath)))
        if old and self.dirpath and old != self.dirpath and same_run:
            state_dict = {k: _moved(v, old, self.dirpath) for k, v in state_dict.items()}
        elif old and self.dirpath and old != self.dirpath:
            # test/validate/predict write into a new run folder: the bookkeeping of the run that
            # trained the checkpoint does not apply there, and saying so on every command is noise.
            state_dict = {**state_dict, "dirpath": self.dirpath, "best_model_score": None, "best_k_models": {},
                          "best_model_path": "", "kth_best_model_path": "", "last_model_path": ""}
        best = state_dict.get("best_model_path")
        if best and not Path(best).is_file():
            # a run continued into a new folder at the old one's place (the old one moved away):
            # the best score it names belongs to a checkpoint this folder does not have, and would
            # never be beaten, leaving the new run without a best.ckpt
            state_dict = {**{k: v for k, v in state_dict.items() if k != "kth_value"}, "best_model_score": None,
                          "best_k_models": {}, "best_model_path": "", "kth_best_model_path": ""}
        super().load_state_dict(state_dict)
        # (a checkpoint written before ties were broken has none: a tie with a measured loss beats it)
        self.tie_values = {k: float(v) for k, v in (state_dict.get("tie_values") or {}).items()
                           if k in self.best_k_models}
        self.best_epoch = state_dict.get("best_epoch") if self.best_model_path else None

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # Lightning saves either at the end of the training epoch or after validation; the
    # refresh runs after whichever of the two did the saving, never before it.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _moved(value, old: str, new: str):
    """``value`` (a path, or a dict keyed by paths) with the folder ``old`` replaced by ``new``."""
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old):]
    if isinstance(value, dict):
        return {_moved(k, old, new): v for k, v in value.items()}
    return value


def _check_resumed_root(run: Path, datamodule, advice: str) -> None:
    """The run's config.yaml names the folder it trained on; another folder is refused."""
    from vision_tl.data.folder import DatasetError

    try:
        trained = (read_run_config(run).get("data") or {}).get("root")
    except (OSError, ValueError, AttributeError):
        return  # no readable config: nothing to compare with
    root = getattr(datamodule, "root", None)
    if trained is None or root is None:
        return
    if Path(str(trained)).expanduser().resolve() != Path(str(root)).expanduser().resolve():
        raise DatasetError(
            f"resuming {run}: it was trained on {trained}, but this command's data is {root}, and the run has no "
            f"split.json to check the images by; {advice} (--config {run / 'config.yaml'} --ckpt_path last resumes "
            "that run; if its folder moved, set data.root in that config.yaml)")


def check_resumed_data(run: Path, datamodule) -> None:
    """A run resumed into its own directory must go on with the classes and images it started
    with: checked before anything in the run directory is rewritten.

    Raises:
        DatasetError: other classes, or train/val images missing, changed or added.
    """
    from vision_tl.data.folder import DatasetError, read_split

    advice = ("resume with the run's own data (data.root in its config.yaml), or start a new run "
              "without --ckpt_path")
    labels = run / "labels.json"
    try:
        before = json.loads(labels.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"resuming {run}: its {labels.name} (the class names in index order) cannot be read "
                           f"({exc}); restore it (checkpoints/last.ckpt stores the same list under "
                           "'vision_tl' -> 'classes'), or start a new run without --ckpt_path") from exc
    if not isinstance(before, list):
        raise DatasetError(f"resuming {run}: its {labels.name} holds a {type(before).__name__}, not the list of "
                           "class names vision-tl fit writes; restore it, or start a new run without --ckpt_path")
    classes = list(datamodule.classes)
    if list(before) != classes:
        raise DatasetError(f"resuming {run}: it was trained on the classes {before}, but the data now has "
                           f"{classes}; {advice}")
    record = run / "split.json"
    if not record.is_file():
        # train/ + val/ folders: no record of the images, so at least the same folder
        _check_resumed_root(run, datamodule, advice)
        return
    datamodule.setup("fit")
    new = datamodule.split_record() or {}
    old = read_split(record)

    def files(record: dict, *parts: str) -> set[tuple[str, str, str]]:
        return {(e["path"], e["label"], e["sha256"]) for part in parts for e in record.get(part, [])}

    root = getattr(datamodule, "root", "the data root")
    was, is_ = files(old, "train", "val"), files(new, "train", "val")
    if was != is_:  # files added, removed or changed: name those, not the ones a new split moved
        old_paths, new_paths = {f[0] for f in was - is_}, {f[0] for f in is_ - was}
        kinds = (("changed (other content or class)", sorted(old_paths & new_paths)),
                 ("new", sorted(new_paths - old_paths)), ("missing", sorted(old_paths - new_paths)))
        raise DatasetError(
            f"resuming {run}: the images under {root} are not the ones in its split.json ("
            + ", ".join(f"{len(paths)} {kind}, e.g. {paths[0]}" for kind, paths in kinds if paths)
            + f"); the resumed epochs would train and validate on other images. {advice[0].upper()}{advice[1:]}")
    for part in ("train", "val"):
        was, is_ = files(old, part), files(new, part)
        if was != is_:
            example = sorted(was - is_ or is_ - was)[0][0]
            raise DatasetError(
                f"resuming {run}: its images are split into train and val differently from its split.json "
                f"({len(was - is_)} of its {part} images moved, e.g. {example}; were --data.seed or "
                f"--data.val_fraction changed?); the resumed epochs would train and validate on other images. "
                f"{advice[0].upper()}{advice[1:]}")


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path:
    """The newest ``<save_dir>/<name>/version_*/checkpoints/last.ckpt``."""
    base = Path(save_dir) / name
    candidates = sorted(base.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no run under {base} has checkpoints/last.ckpt; give the checkpoint path "
            "explicitly, e.g. --ckpt_path runs/partial/version_0/checkpoints/last.ckpt"
        )
    return candidates[-1]


def run_dir_of(checkpoint: Path) -> Path | None:
    """``RUN`` for ``RUN/checkpoints/x.ckpt`` when RUN looks like a vision_tl run directory."""
    run = checkpoint.resolve().parent.parent
    return run if checkpoint.parent.name == "checkpoints" and (run / "config.yaml").exists() else None
