"""LightningCLI for ``fit``, ``validate``, ``test`` and ``predict``."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from vision_tl.backbones import run_backbone_state
from vision_tl.data import ImageFolderDataModule
from vision_tl.data.folder import (
    DatasetError,
    check_unlabelled_root,
    class_folders,
    detect_layout,
    read_split,
    recorded_mismatches,
    same_classes,
)
from vision_tl.tasks.callbacks import LogLineProgress, RunArtifacts, ThrottledProgressBar
from vision_tl.tasks.checkpoint import read_checkpoint
from vision_tl.tasks.classifier import ImageClassifier
from vision_tl.tasks.resume import (
    TERMINATED,
    ResumableRandomState,
    RunCheckpoint,
    check_resumed_data,
    find_last_checkpoint,
    run_dir_of,
)
from vision_tl.utils import env_on, interactive, launcher_int, read_run_config, say
from vision_tl.utils.distributed import peer_stopped
from vision_tl.utils.files import (
    atomic_path,
    atomic_write_text,
    lock_dir,
    release_dir_locks,
    unwritable,
)

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended
PARTIAL_EXIT = 3  # output written, but some images could not be read (as predict-onnx)


class _NoCloudTip(logging.Filter):
    """Drops Lightning's advert for its cloud logger: these runs are offline, on the factory's machines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoCloudTip())

# Lightning's warnings that only alarm in the kit's commands. Ignored while a command runs (see
# run_lightning_cli), not from import on: a filter added at import is lost where the import
# happened inside a caller's warnings.catch_warnings block (a notebook helper, a test).
_LIGHTNING_NOISE = (
    # Lightning 2.6 calls a torch pytree API that newer torch deprecates: nothing a user can act on.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # A resume reopens its run's log folder; the kit has kept the old metrics.csv aside by then
    # (see _keep_metrics_csv), so Lightning's "previous log files will be deleted" only alarms.
    r".*Previous log files in this directory will be deleted",
    # Likewise its checkpoints/ folder: --checkpoint.dirpath is fixed to RUN/checkpoints and a new
    # run never reuses a run directory, so "Checkpoint directory ... exists and is not empty" means a resume.
    r"Checkpoint directory .* exists and is not empty",
    # Small folders have fewer batches per epoch than log_every_n_steps: the step losses are still
    # logged (every N steps across epochs) and the epoch metrics always; the warning is only noise.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


@contextlib.contextmanager
def _without_lightning_noise():
    with warnings.catch_warnings():
        for message in _LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


def _names_a_folder(value) -> bool:
    """Whether a cache setting is a folder path (not ``auto``, ``true``, ``none`` and the like,
    which the model and data module check themselves)."""
    from vision_tl.data.datamodule import _NOT_FOLDERS

    return isinstance(value, str) and value.strip().lower() not in _NOT_FOLDERS | {"true", "false"}


def _user_progress_bar(config) -> bool:
    """Whether the run's config names a progress bar among ``trainer.callbacks`` (kept as given)."""
    trainer = config.get("trainer") if hasattr(config, "get") else None
    callbacks = (trainer.get("callbacks") if hasattr(trainer, "get") else None) or []
    if not isinstance(callbacks, list):
        callbacks = [callbacks]
    names = [str(c.get("class_path", "")) if hasattr(c, "get") else type(c).__name__ for c in callbacks]
    return any(name.endswith("ProgressBar") for name in names)


def _logger_init(config):
    """The logger's ``init_args`` in a subcommand's config, or None (no logger, or ``logger: false``)."""
    logger = config.get("trainer", {}).get("logger")
    return logger.get("init_args") if hasattr(logger, "get") else None


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run (its config, class names or checkpoints, e.g. one trained
    from Python or by an older version, which wrote no config.yaml) or any other visible file a
    command would write over (predictions.csv, metrics.csv, a user's own files)."""
    try:
        return any(not entry.name.startswith(".") for entry in Path(folder).iterdir())
    except OSError:  # not there (or not a folder: the logger says so)
        return False


_PICK_ANOTHER = ("pick an empty one with --trainer.logger.init_args.name NAME or --trainer.logger.init_args.version N "
                 "(or leave version unset to get the next free one; with --trainer.logger false, another "
                 "--trainer.default_root_dir)")


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config; refuses, with a clear error, to reuse an existing run directory."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir  # collective under DDP: the same directory on every rank
        exists = taken = False
        if trainer.is_global_zero and log_dir is not None:
            # First of the callbacks (see instantiate_trainer): nothing is written into the run
            # before it is this command's. Two commands started at once can both pick version_N;
            # the run's lock goes to one of them.
            taken = not lock_dir(Path(log_dir))
            exists = not self.overwrite and not taken and holds_run(Path(log_dir))
        taken, exists = trainer.strategy.broadcast((taken, exists))  # every rank stops, not only rank 0
        if (taken or exists) and log_dir is not None:  # another command's run: never cleaned up here
            _NOT_OWN.add(Path(log_dir))
        if taken:
            pinned = (_logger_init(self.config) or {}).get("version") is not None
            raise FileExistsError(f"run directory {log_dir} is in use by another command started at the same "
                                  "moment; " + ("give another --trainer.logger.init_args.version" if pinned else
                                                "run this command again, which picks the next free version"))
        if exists:  # (two fits given one version, or a folder of the user's files)
            raise FileExistsError(f"run directory {log_dir} already holds a run or other files, which this command "
                                  f"would write over; {_PICK_ANOTHER}")
        if log_dir is not None:
            _OWN_RUNS.append(Path(log_dir))
        # The saved config says how to train, not where: with a fixed version in it,
        # `validate/test/predict --config RUN/config.yaml` would point at this same, occupied
        # run directory (as after a resume, which pins the version) and be refused.
        init = _logger_init(self.config)
        if init is not None and init.get("version") is not None:
            init.version = None
        # Nor which checkpoint to start from: kept after a resume, `fit --config RUN/config.yaml`
        # (a new run, as the messages say) would resume into this run again. (validate, test and
        # predict keep theirs: which checkpoint they evaluated.)
        if stage == "fit" and self.config.get("ckpt_path") is not None:
            self.config.ckpt_path = None
        # Absolute, so the run's data is the same whichever folder report, export or a resume runs
        # from (the runs folder already is: see VisionTLCLI.before_instantiate_classes).
        data = self.config.get("data")
        if data is not None and data.get("root"):
            data.root = str(Path(data.root).expanduser().resolve())
        # Written beside itself and renamed: a resume rewrites the run's config.yaml, and a kill or
        # a full disk half-way would leave a run that can no longer be resumed. And in UTF-8, which
        # the kit reads it as: jsonargparse writes in the system's encoding (cp1252 on Windows),
        # which misencodes a data root such as C:\Users\Jürgen and cannot hold one with 傷 at all.
        parser, real_save = self.parser, self.parser.save

        def save_atomically(cfg, path, multifile=False, **kwargs):
            if multifile:  # (never asked for by the kit) several files, which only jsonargparse writes
                with atomic_path(Path(path), overwrite=True) as tmp:
                    real_save(cfg, str(tmp), **{**kwargs, "multifile": True, "overwrite": True})
                return
            skip_unset = kwargs.get("skip_unset", kwargs.get("skip_none", True))
            text = parser.dump(cfg, skip_unset=skip_unset, skip_validation=kwargs.get("skip_validation", False))
            atomic_write_text(Path(path), text)
        self.parser.save = save_atomically
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            del self.parser.save  # the parser's own method again


_UNKNOWN_KEY = (
    re.compile(r"Group '(\w+)' does not accept option '([\w.-]+)'"),  # --print_config's check
    re.compile(r"does not accept options? '?([\w.-]+)"),
    re.compile(r"unrecognized arguments: --([\w.-]+)"),
    re.compile(r"Key '([\w.-]+)' is not expected"),
    re.compile(r"Option '([\w.-]+)' is not accepted"),  # --print_config, a top-level key
)


# What other training tools call some of our keys.
_ALIASES = {
    "learning_rate": "model.lr", "lr0": "model.lr", "epochs": "trainer.max_epochs",
    "num_epochs": "trainer.max_epochs", "max_epochs": "trainer.max_epochs", "batch": "data.batch_size",
    "batch_size": "data.batch_size", "imgsz": "model.image_size", "img_size": "model.image_size",
    "input_size": "model.image_size", "arch": "model.backbone", "model_name": "model.backbone",
    "workers": "data.num_workers", "num_workers": "data.num_workers", "augmentation": "data.augment",
    "seed": "seed_everything", "data_dir": "data.root", "root": "data.root", "freeze": "model.mode",
}


class _Parser(LightningArgumentParser):
    """Says what an unknown option or config key should have been, in two lines instead of
    a screenful of usage."""

    _argv: list[str] = []
    _subcommand: str | None = None  # of the root parser's command line

    def parse_args(self, args=None, *pargs, **kwargs):
        _Parser._argv = list(sys.argv[1:] if args is None else args)
        if self._subcommands_action is not None:
            choices = self._subcommands_action.choices
            _Parser._subcommand = next((a for a in _Parser._argv if a in choices), None)
        if self.exit_on_error:
            for name in self._config_files():
                problem = _config_file_problem(name)
                if problem:
                    print(f"error: --config {name}: {problem}", file=sys.stderr)
                    raise SystemExit(2)
        # Config files on disk (--config, and a group's own file: --data d.yaml) are read as UTF-8, as
        # YAML is and as the kit writes a run's config.yaml, not in the system's encoding: on Windows
        # (cp1252), `--config RUN/config.yaml` of a run whose data root is C:\Users\Jürgen read it as
        # C:\Users\JÃ¼rgen. jsonargparse has no option for the encoding (see _utf8_config_reads).
        with _utf8_config_reads():
            return super().parse_args(args, *pargs, **kwargs)

    @staticmethod
    def _config_files() -> list[str]:
        """The ``--config`` files of the parsed command line, in order."""
        argv = _Parser._argv
        files = [b for a, b in zip(argv, argv[1:], strict=False) if a in ("-c", "--config")]
        return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]

    @staticmethod
    def _config_values(key: str) -> list[tuple[str, object]]:
        """(file, value) for each ``--config`` file (of the parsed command line) in which ``key``
        is written, in the order given: the last one wins unless a flag sets ``key``."""
        found = []
        for name in _Parser._config_files():
            written, value = _Parser._file_value(name, key)
            if written:
                found.append((name, value))
        return found

    @staticmethod
    def _file_value(name: str, key: str) -> tuple[bool, object]:
        """(whether config file ``name`` writes the dotted ``key``, its value there)."""
        try:
            node = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return False, None
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        return (True, node[leaf]) if isinstance(node, dict) and leaf in node else (False, None)

    @staticmethod
    def _flags_undone() -> list[tuple[str, str, str, object]]:
        """``--data.root DIR --config configs/partial.yaml``: the command line is read in order, so a
        ``--config`` file after a flag sets the flag's key back (here to data/demo). For each such
        key: (key, the flag's value, the file that wins, its value there)."""
        argv, settings = _Parser._argv, []  # (key, value, file or None for a flag), in order
        for i, arg in enumerate(argv):
            if arg in ("-c", "--config") and i + 1 < len(argv):
                settings.append(("--config", argv[i + 1], argv[i + 1]))
            elif arg.startswith("--config="):
                settings.append(("--config", arg.split("=", 1)[1], arg.split("=", 1)[1]))
            elif arg.startswith("--") and arg[2:].split("=", 1)[0] not in ("help", "print_config"):
                key, given_inline, value = arg[2:].partition("=")
                if not given_inline and i + 1 < len(argv) and not argv[i + 1].startswith("--") \
                        and argv[i + 1] not in ("-c", "-h"):  # (a value may be negative: -1)
                    value = argv[i + 1]
                settings.append((key, value, None))
        undone = []
        for i, (key, value, file) in enumerate(settings):
            if file is not None or key.endswith("+"):
                continue
            winner = None
            for later_key, _value, later_file in settings[i + 1:]:
                if later_file is None and later_key == key:
                    winner = None  # set again by a later flag: that one is taken as meant
                elif later_file is not None and _Parser._file_value(later_file, key)[0]:
                    winner = later_file
            if winner is not None:
                written = _Parser._file_value(winner, key)[1]
                if not isinstance(written, dict) and str(written) != str(value):  # (a group is merged)
                    undone.append((key, value, winner, written))
        return undone

    @staticmethod
    def _config_holding(key: str) -> str | None:
        """The first ``--config`` file (of the parsed command line) in which ``key`` is written."""
        return next((name for name, _ in _Parser._config_values(key)), None)

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        linked = (re.search(r"argument ([\w.]+) --> ([\w.]+)", message)
                  or re.search(r'Linked "([\w.]+)" must be given via "([\w.]+)"', message))
        if linked and self.exit_on_error:  # e.g. --data.image_size, which follows --model.image_size
            source, target = linked.groups() if "-->" in message else linked.groups()[::-1]
            print(f"error: {target} is set from {source}; pass --{source} instead of --{target}", file=sys.stderr)
            raise SystemExit(2)
        helps = f"all options: {parser.prog.replace(' [options]', '')} --help"
        required = re.search(r"the following arguments are required: (.+)", message)
        if required and self.exit_on_error:  # `predict.data.root` (the root parser's key): the option to type
            command = _Parser._subcommand
            keys = [k.strip() for k in required.group(1).split(",")]
            keys = [k[len(command) + 1:] if command and k.startswith(command + ".") else k for k in keys]
            if command:
                helps = f"all options: {parser.prog.replace(' [options]', '')} {command} --help"
            run = (" (the training image folder; a run's --config RUN/config.yaml gives it)"
                   if keys == ["data.root"] else "")
            sys.stderr.write(f"error: {', '.join('--' + k for k in keys)} is required{run}\n{helps}\n")
            self.exit(2)
        value = re.search(r'Parser key "([\w.]+)":\s*(.+)', message, re.S)
        if value and self.exit_on_error:  # a value of the wrong type: the key and why, not the usage text
            why = " ".join(value.group(2).split())
            sys.stderr.write(f"error: --{value.group(1)}: {why}\n{helps}\n")
            self.exit(2)
        ambiguous = re.search(r"ambiguous option: (--[\w.]+) could match (.+)", message)
        if ambiguous and self.exit_on_error:
            given, options = ambiguous.group(1), [o.strip() for o in ambiguous.group(2).split(",")]
            close = [o for o in options if o.endswith("." + given[2:])] or options[:3]
            sys.stderr.write(f"error: {given} is not an option; did you mean {' or '.join(close)}?\n{helps}\n")
            self.exit(2)
        key = next((".".join(m.groups()) for pattern in _UNKNOWN_KEY if (m := pattern.search(message))), None)
        if key is None or not self.exit_on_error:
            return super().error(message, ex)
        self._unknown_key(key, parser, helps)

    def _unknown_key(self, key: str, parser, helps: str) -> None:
        """Exit with what the unknown option or config ``key`` should have been: underscores for
        dashes, a run's config in place of an evaluation's, or the close and valid keys."""
        if parser is self and self._subcommands_action is not None:
            # --print_config checks the config on the root parser: name the subcommand's options
            parser = self._subcommands_action.choices.get(_Parser._subcommand, self)
            if parser is not self:
                helps = f"all options: {parser.prog.replace(' [options]', '')} --help"
        dests = {a.dest for a in parser._actions}
        source = self._config_holding(key)
        if "-" in key and key.replace("-", "_") in dests:  # --ckpt-path, --trainer.max-epochs
            written = (f"key {key!r} in {source} is not an option; keys are written with underscores: "
                       f"{key.replace('-', '_')!r}" if source else
                       f"--{key} is not an option; options are written with underscores: --{key.replace('-', '_')}")
            sys.stderr.write(f"error: {written}\n{helps}\n")
            self.exit(2)
        if source and key in _EVALUATION_KEYS:
            sys.stderr.write(f"error: {source} is the config of a `vision-tl validate`, `test` or `predict` output "
                             f"(it has {key!r}), not of a training run{_trained_by(source)}\n{helps}\n")
            self.exit(2)
        keys = sorted({d for d in dests if "." in d and not d.startswith("__")})
        # a linked key (data.image_size, set from model.image_size) cannot be given: name its source instead
        sources = {a.dest: a.source[0][0] for a in parser._actions
                   if type(a).__name__ == "ActionLink" and getattr(a, "source", None)}
        section = key.split(".")[0] + "."
        in_section = [k for k in keys if k.startswith(section) and k.count(".") == 1 and k not in sources]
        alias = _ALIASES.get(key.split(".")[-1])
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = [alias] if alias else list(dict.fromkeys(sources.get(k, k) for k in close))
        lines = [f"error: unknown option or config key {key!r}" + (f" in {source}" if source else "")
                 + (f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else "")]
        if in_section:
            lines.append(f"valid keys under {section[:-1]!r}: {', '.join(k[len(section):] for k in in_section)}")
        lines.append(helps)
        sys.stderr.write("\n".join(lines) + "\n")
        self.exit(2)


_SECTIONS = ("trainer", "model", "data", "checkpoint", "artifacts", "resume_state")
# top-level keys that only the configs `validate`, `test` and `predict` save have
_EVALUATION_KEYS = ("return_predictions", "verbose")


def _trained_by(config: str) -> str:
    """'; use the training run's config: RUN/config.yaml', from an evaluation config's ckpt_path."""
    try:
        ckpt = (yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}).get("ckpt_path")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        ckpt = None
    run = Path(str(ckpt)).parent.parent if ckpt else None
    if run is not None and (run / "config.yaml").is_file():
        return f"; use the config of the run that trained its checkpoint: --config {run / 'config.yaml'}"
    return "; use the config.yaml of the run that trained the checkpoint"


@contextlib.contextmanager
def _utf8_config_reads():
    """jsonargparse's paths read a file on disk as UTF-8 while this is open (a URL, standard input
    or an fsspec path as before)."""
    from jsonargparse import Path as ConfigPath

    own = ConfigPath.read_text

    def read_text(self) -> str:
        local = self.absolute if not (self.is_url or self.is_fsspec) else None
        if local is None or not os.path.isfile(local):
            return own(self)
        with open(local, encoding="utf-8-sig") as fh:  # (-sig: a BOM a Windows editor put in, dropped)
            return fh.read()

    ConfigPath.read_text = read_text
    try:
        yield
    finally:
        ConfigPath.read_text = own


def _config_file_problem(name: str) -> str | None:
    """What makes a ``--config`` file unusable, in words (None when it can be parsed)."""
    path = Path(name).expanduser()
    if not path.is_file():
        return "no such file" if not path.exists() else "is not a file; give a YAML config such as configs/partial.yaml"
    try:
        node = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start}: {exc.reason}); save it with UTF-8 encoding"
    except OSError as exc:
        return f"cannot be read as text ({exc})"
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
    example = "a YAML mapping of sections such as 'model:', 'data:', 'trainer:' (see configs/partial.yaml)"
    if node is None:
        return f"is empty; a config is {example}"
    if not isinstance(node, dict):
        return f"is a YAML {type(node).__name__}, not {example}"
    for section in _SECTIONS:
        value = node.get(section)
        if value is not None and not isinstance(value, dict):
            return (f"'{section}:' must be a mapping of options (e.g. '{section}:' then an indented "
                    f"'key: value' line), got {value!r}")
    return None


class VisionTLCLI(LightningCLI):
    """Links the model's backbone to the data's preprocessing, and the data's classes to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/balanced_acc",
            "checkpoint.mode": "auto",  # min for a loss, max for an accuracy (RunCheckpoint)
            "checkpoint.filename": "best",
            "checkpoint.save_last": True,
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(RunArtifacts, "artifacts")
        parser.add_lightning_class_args(ResumableRandomState, "resume_state")
        parser.link_arguments("checkpoint.monitor", "artifacts.monitor")
        parser.link_arguments("checkpoint.mode", "artifacts.mode")
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.image_size", "data.image_size")
        parser.link_arguments("data.good_class", "model.good_class")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        """Lightning's parser for ``subcommand``, with ``--ckpt_path`` described as the kit reads it
        (Lightning's text gives its own meaning of best/last; Lightning 2.x, private hook)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        ckpt = parser._option_string_actions.get("--ckpt_path")
        if ckpt is not None:
            ckpt.help = ("a checkpoint file, e.g. RUN/checkpoints/best.ckpt; 'last' (and, except for fit, 'best') means "
                         "that file of the run whose config.yaml is given with --config. fit: resume from it (into its "
                         "run directory when it is that run's); validate, test, predict: the weights to evaluate "
                         "(required)")
        # RunCheckpoint's own meaning of ModelCheckpoint's options (Lightning's text describes others)
        for option, text in (
                ("--checkpoint.dirpath", "fixed: RUN/checkpoints (report, export, test and resume read it there)"),
                ("--checkpoint.filename", "fixed: best (best.ckpt; last.ckpt beside it)"),
                ("--checkpoint.monitor", "the validation metric whose best epoch is kept as best.ckpt: "
                                         f"{', '.join(MONITORED)}"),
                ("--checkpoint.mode", "auto (default): min for a loss, max for an accuracy; or min, max. Ties of "
                                      "the monitored value go to the epoch with the lower val/loss"),
                ("--checkpoint.save_top_k", "only 1: the kit keeps one best.ckpt (the best epoch) and last.ckpt")):
            action = parser._option_string_actions.get(option)
            if action is not None:
                action.help = text  # (jsonargparse appends the type and default)
        return parser

    def instantiate_classes(self) -> None:
        """validate, test and predict take every weight from ``--ckpt_path``: the model is built
        without the backbone's pretrained weights, which need not exist on this machine (a local
        ``--model.weights`` file removed since, a timm cache this machine lacks). The config as
        given (saved in the output directory) keeps its settings."""
        sub = self.subcommand
        model = self.config[sub].get("model") if sub in ("validate", "test", "predict") else None
        if model is None or not self.config[sub].get("ckpt_path"):
            super().instantiate_classes()
            return
        given = model.get("pretrained"), model.get("weights")
        model.pretrained, model.weights = False, None
        try:
            super().instantiate_classes()
        finally:
            model.pretrained, model.weights = given
        record = self.__dict__.pop("_held_out_check", None)  # (set by _use_the_runs_split)
        if record is not None and isinstance(self.datamodule, ImageFolderDataModule):
            self.datamodule.held_out_check = record

    def before_fit(self) -> None:
        """A frozen fit resumed from a checkpoint: the backbone takes the checkpoint's weights before
        set-up fills the feature cache (Lightning restores them only after set-up). Otherwise the
        features came from the weights the config names now, which may have changed since, while
        the checkpoint, and every later evaluation, holds the run's own."""
        weights = self.__dict__.pop("_resumed_weights", None)  # (the checkpoint _resume_into_run read)
        hparams = getattr(self.model, "hparams", {})
        if weights is None or hparams.get("mode") != "frozen" or hparams.get("feature_cache") is None:
            return
        self.model.net.backbone.load_state_dict(run_backbone_state(weights))

    def instantiate_trainer(self, **kwargs):
        """Lightning's trainer, with its default progress bar swapped for one that does not
        make the CPU wait for the GPU after every batch (:class:`ThrottledProgressBar`), or, where
        standard output is a log file or a pipe, for lines (:class:`LogLineProgress`).

        Lightning's default is ``RichProgressBar`` where ``rich`` is installed (common on GPU
        machines) and ``TQDMProgressBar`` elsewhere; both redraw after every batch.
        """
        trainer = super().instantiate_trainer(**kwargs)
        _OWN_LOGGERS.extend(trainer.loggers)  # see _remove_empty_new_runs
        # The run directory's claim (SaveRunConfig.setup) before any callback writes into it
        own = [c for c in trainer.callbacks if isinstance(c, SaveRunConfig)]
        trainer.callbacks[:] = own + [c for c in trainer.callbacks if not isinstance(c, SaveRunConfig)]
        if _user_progress_bar(self.config.get(self.subcommand, self.config)):
            return trainer
        # a terminal or a notebook redraws a bar; a log file or a pipe gets lines (LogLineProgress)
        bar = ThrottledProgressBar if interactive(sys.stdout) else LogLineProgress
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) in (TQDMProgressBar, RichProgressBar):
                trainer.callbacks[i] = bar()
        return trainer

    def before_instantiate_classes(self) -> None:
        init = _logger_init(self.config[self.subcommand])
        trainer = self.config[self.subcommand].get("trainer")
        root = trainer.get("default_root_dir") if trainer is not None else None
        if init is not None and root and str(root) != _DEFAULT_ROOT and init.get("save_dir") == _DEFAULT_ROOT:
            # the default logger, and the recipes' (runs/<recipe>), write where --trainer.default_root_dir says
            init.save_dir = str(root)
        if init is not None and init.get("save_dir"):
            # Absolute from the start, so checkpoints record the folder the way a resume from
            # any working directory (or the saved config.yaml) spells it.
            init.save_dir = str(Path(init.save_dir).expanduser().resolve())
        if trainer is not None and trainer.get("default_root_dir"):  # (where a run without a logger writes)
            trainer.default_root_dir = str(Path(str(trainer.default_root_dir)).expanduser().resolve())
        if init is not None and init.get("save_dir") is not None:  # see _remove_empty_new_runs
            parent = Path(init.save_dir) / (init.get("name") or "")
            _WATCHED_RUNS.append((parent, {p.name for p in parent.glob("version_*")}))
        data = self.config[self.subcommand].get("data")
        if data is not None and data.get("split_file"):  # absolute, as data.root: the run works from anywhere
            data.split_file = str(Path(str(data.split_file)).expanduser().resolve())
        if data is not None and data.get("predict_root"):  # as in predictions.csv and the run's config.yaml
            data.predict_root = str(Path(str(data.predict_root)).expanduser().absolute())
        # cache folders named by a path, absolute too: a resume from another folder would otherwise start a
        # new, empty cache there without a word ("auto"/true: the default place; none/false: no cache)
        if data is not None and _names_a_folder(data.get("decoded_cache")):
            data.decoded_cache = str(Path(data.decoded_cache).expanduser().resolve())
        self._check_gpu()
        self._check_gpu_config_order()
        self._check_flag_order()
        self._check_launcher()
        if self.subcommand == "fit":
            _check_recipe_root(self.config.fit)
            _check_fit_settings(self.config.fit)
        self._resume_into_run()
        model = self.config[self.subcommand].get("model")
        if self.subcommand == "fit" and model is not None and model.get("weights"):
            # absolute, as data.root: the run's config.yaml and checkpoints then start (or resume) the same
            # way from any working directory. (After the resume's check, which compares the checkpoint's
            # spelling: a run from before this recorded the path as given.)
            model.weights = str(Path(str(model.weights)).expanduser().resolve())
        if model is not None and _names_a_folder(model.get("feature_cache")):  # (a model setting too: after the check)
            model.feature_cache = str(Path(model.feature_cache).expanduser().resolve())
        self._require_checkpoint()
        self._use_the_checkpoints_classes()
        self._use_the_runs_split()
        self._refuse_existing_run()

    def _use_the_runs_split(self) -> None:
        """``validate``, ``test`` and ``predict`` of a run's checkpoint score the images that run
        held out (its ``split.json``), as ``vision-tl report`` does: a new split of a folder that
        gained images, or under another seed or val_fraction, would move training images into val.

        The run is the checkpoint's (``RUN/checkpoints/x.ckpt``), else the one whose
        ``config.yaml`` is given (a checkpoint kept elsewhere). Where its split cannot be used (the
        folder has its own ``val/`` now, or does not hold the recorded images), the data module
        is told to warn about evaluated images the run trained on (:attr:`held_out_check`)."""
        if self.subcommand not in ("validate", "test", "predict"):
            return
        cfg = self.config[self.subcommand]
        data = cfg.get("data")
        if data is None or not cfg.get("ckpt_path"):
            return
        if Path(str(cfg.ckpt_path)).is_file():  # absolute in the saved config, as the data root is
            cfg.ckpt_path = str(Path(str(cfg.ckpt_path)).resolve())
        run = run_dir_of(Path(str(cfg.ckpt_path))) or _run_of_config(cfg)
        record = run / "split.json" if run is not None else None
        if data.get("split_file"):  # made absolute in before_instantiate_classes
            given = Path(str(data.split_file))
            if record is not None and record.is_file() and given != record.resolve() and not _same_split(given, record):
                warnings.warn(f"--data.split_file {given} is not the split of the checkpoint's run ({record}): its "
                              "val images may be images that run trained on, scored as held out", stacklevel=2)
                self._held_out_check = record
            return
        if self.subcommand == "predict" and data.get("predict_root"):
            return  # new images: the training folder is not split at all
        if record is None or not record.is_file():
            return
        try:
            entries = read_split(record)
        except ValueError:
            return  # unreadable: the data module's own split stands; report names the problem
        root = Path(str(data.root)).expanduser().resolve()
        if root.is_dir() and "val" in detect_layout(root):  # its own val/ now: no split is made, so none can be reused
            self._held_out_check = record
            return
        # the folder that was split: ROOT, or ROOT/train/ when ROOT has train/ (and test/) but no val/;
        # the same folder elsewhere (moved, copied) when the recorded images are there, unchanged
        split_root = next((folder for folder in (root, root / "train") if folder == Path(entries["root"]).resolve()
                           or not any(recorded_mismatches(folder, entries.get("val", []), sample=True))), None)
        if split_root is not None and not _same_classes(entries.get("classes"), split_root):
            return  # a class folder added or gone: the checkpoint's own check names the class lists
        if split_root is not None:
            data.split_file = str(record)
            say(f"vision_tl: train/val split from {record} (the images the run held out)")
        else:
            warnings.warn(f"{root} does not hold the images {record} lists (the run trained on {entries['root']}): "
                          "a new train/val split is made, whose val images are not the ones the run held out",
                          stacklevel=2)
            self._held_out_check = record

    def _use_the_checkpoints_classes(self) -> None:
        """``predict --data.predict_root`` of a checkpoint names the classes the checkpoint
        records: the training folder (``data.root``) is not read, and need not exist (a line PC
        that only holds the run). Where it exists with other classes, the data module warns.
        ``validate`` and ``test`` score the folder's labels, so there the two lists must agree."""
        cfg = self.config[self.subcommand]
        data = cfg.get("data")
        if self.subcommand != "predict" or data is None or not data.get("predict_root"):
            return
        ckpt = cfg.get("ckpt_path")
        if not ckpt or not Path(str(ckpt)).is_file():
            return  # (_require_checkpoint named the problem)
        saved = (read_checkpoint(ckpt).get("vision_tl") or {}).get("classes")
        if not saved:
            return
        given = data.get("classes")
        if given and not same_classes(list(given), list(saved)):  # e.g. a predict config.yaml of another checkpoint
            warnings.warn(f"data.classes {list(given)} is not the class list of {ckpt} ({list(saved)}): the "
                          "checkpoint's classes are used, as its outputs are those", stacklevel=2)
        data.classes = list(saved)

    def _require_checkpoint(self) -> None:
        """``validate``, ``test`` and ``predict`` evaluate a trained checkpoint. Without
        ``--ckpt_path`` Lightning would evaluate the freshly built model (an untrained head) and
        exit 0; with ``best``/``last`` and no trainer history it loads nothing and says so only
        in a log line. Both name the checkpoint files instead."""
        if self.subcommand not in ("validate", "test", "predict"):
            return
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        run = _config_run(cfg, "checkpoints")
        named = _named_checkpoint(cfg, ckpt)
        if named is not None:
            cfg.ckpt_path = named
            return
        if ckpt is not None and ckpt not in ("best", "last", "hpc", "registry"):
            return
        example = run / "checkpoints" / "best.ckpt" if run is not None else "RUN/checkpoints/best.ckpt"
        given = "no --ckpt_path" if ckpt is None else f"--ckpt_path {ckpt} (no such checkpoint here)"
        raise ValueError(
            f"`vision-tl {self.subcommand}` evaluates a trained checkpoint, and got {given}: it would score a model "
            f"with an untrained head. Pass the checkpoint file, e.g. --ckpt_path {example}")

    def _check_gpu(self) -> None:
        """``--trainer.accelerator gpu`` (e.g. from configs/gpu.yaml) on a machine where PyTorch
        sees no GPU: say so and what to do, instead of Lightning's 'No supported gpu backend'."""
        import torch

        accelerator = self.config[self.subcommand].trainer.get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
            raise ValueError(
                f"--trainer.accelerator {accelerator} asks for a GPU, but PyTorch {torch.__version__} "
                f"({build}) sees none; on this machine leave out configs/gpu.yaml or pass "
                "--trainer.accelerator auto (uses a GPU when there is one) or cpu"
            )

    def _check_gpu_config_order(self) -> None:
        """``--config configs/gpu.yaml --config configs/frozen.yaml``: the recipe, given last, sets
        ``accelerator: auto`` and ``precision: 32-true`` back, so the run trains in full precision
        (on the CPU, where there is no GPU) without a word, and its config.yaml still reads
        ``pipeline: device``. Warn, naming the files; a flag given after them is taken as meant."""
        import torch

        trainer = self.config[self.subcommand].get("trainer")
        asked = [name for name, value in _Parser._config_values("trainer.accelerator") if value in ("gpu", "cuda")]
        if trainer is None or not asked:
            return
        gpu_file, undone, later = asked[-1], [], []
        for key in ("accelerator", "precision"):
            written = _Parser._config_values(f"trainer.{key}")
            wanted = [value for name, value in written if name == gpu_file]
            last, value = written[-1] if written else (gpu_file, None)
            if wanted and last != gpu_file and str(value) != str(wanted[-1]) and str(trainer.get(key)) == str(value):
                undone.append(f"trainer.{key} {value}")
                later += [last] if last not in later else []
        if undone:
            where = " on the CPU (no GPU here)" if not torch.cuda.is_available() else ""
            warnings.warn(f"--config {', '.join(later)} comes after {gpu_file} and sets {' and '.join(undone)} "
                          f"back (the last file wins), so this run trains{where} without its GPU settings; give "
                          f"{gpu_file} last, after the recipe", stacklevel=2)

    def _check_flag_order(self) -> None:
        """A flag given before a ``--config`` file that writes the same key: the file wins, and the
        run would train on the recipe's folder or for its number of epochs without a word."""
        for key, value, file, written in _Parser._flags_undone():
            warnings.warn(f"--{key} {value} comes before --config {file}, which sets {key} {written} (the "
                          f"command line is read in order, the last one wins), so this run uses {written}; "
                          f"give --{key} after --config", stacklevel=2)

    def _check_launcher(self) -> None:
        """torchrun (or srun) started several processes, but the trainer was told of one device
        (every shipped config says ``devices: 1``): each process would train its own copy into
        its own run directory. Lightning catches other mismatches, not this one."""
        world, local = launcher_int("WORLD_SIZE", 1), launcher_int("LOCAL_WORLD_SIZE", 1)
        trainer = self.config[self.subcommand].trainer
        if world > 1 and str(trainer.get("devices")) == "1" and str(trainer.get("num_nodes") or 1) == "1":
            raise ValueError(
                f"this command runs in {world} processes (WORLD_SIZE={world}), but --trainer.devices is 1, so each "
                f"would train alone; pass --trainer.devices {local} --trainer.strategy ddp (with --trainer.num_nodes "
                f"for several machines), or start it without torchrun")

    def _refuse_existing_run(self) -> None:
        """An explicit ``--trainer.logger.init_args.version`` naming an existing run fails *before*
        the logger exists: once created, its teardown would rewrite that run's metrics.csv."""
        init = _logger_init(self.config[self.subcommand])
        if init is None or init.get("version") is None or self.save_config_kwargs.get("overwrite"):
            return
        version = init.version if isinstance(init.version, str) else f"version_{init.version}"
        run = Path(init.get("save_dir") or ".") / (init.get("name") or "") / version
        if holds_run(run):
            raise FileExistsError(f"run directory {run} already holds a run or other files, which this command "
                                  f"would write over; {_PICK_ANOTHER}")

    def _resume_into_run(self) -> None:
        """``fit --ckpt_path last|RUN/checkpoints/last.ckpt`` resumes *into* that run directory."""
        if self.subcommand != "fit" or not self.config.fit.get("ckpt_path"):
            return
        cfg = self.config.fit
        if cfg.trainer.get("fast_dev_run"):
            # Before the run is touched (its metrics.csv is renamed below): a smoke test writes
            # nothing, and Lightning's ends after one epoch, so a resumed one could train nothing.
            raise ValueError(f"--trainer.fast_dev_run with --ckpt_path {cfg.ckpt_path}: a smoke test trains a batch "
                             "of the settings and writes nothing, a resume continues a run and writes into it; leave "
                             "out --ckpt_path to smoke-test the settings, or --trainer.fast_dev_run to resume")
        init = _logger_init(cfg)
        ckpt = _resume_checkpoint(cfg, init)
        path = Path(ckpt)
        state = read_checkpoint(path)  # a truncated file or another tool's checkpoint: one clear line
        cfg.ckpt_path = str(path)
        self._resumed_weights = state["state_dict"]  # (for before_fit: read once)
        self._check_resumable(ckpt, path, state)
        run = run_dir_of(path)
        if run is not None and init is not None and Path(init.save_dir).resolve() / init.name == run.parent:
            self._continue_in_run(run, path, state, init)
        else:
            # its run's settings, or (a checkpoint moved out of its run) the data settings it stored
            source = run if run is not None else path
            _check_resumed_steps(source, _trained_settings(run, state), cfg)
            say(f"vision_tl: continuing the training in {path} (its epoch count, optimizer state, history and model "
                 "settings) in a new run directory; to train afresh from ImageNet weights, leave out --ckpt_path")
        _note_mid_epoch(state, path)

    def _check_resumable(self, ckpt: str, path: Path, state: dict) -> None:
        """Refuse a resume of ``path`` (``--ckpt_path ckpt``) with other model settings, or one
        that would train nothing, before anything in its run is renamed."""
        # `last`, resolved only here, missed the check a file gets at parsing (_parse_ckpt_path): the
        # model must be the checkpoint's, or the run would mix e.g. two input sizes in one history
        saved = state.get("hyper_parameters") or {}
        differ = {k: change for k, change in _changed_settings(self._model_settings(), saved).items() if k in saved}
        if differ:
            shown = ", ".join(f"{k} {new} (the checkpoint has {old})" for k, (new, old) in differ.items())
            raise ValueError(
                f"--ckpt_path {ckpt}: a resume continues the model in {path}, but the model settings differ: {shown}; "
                "drop those options to resume, or start a new run (without --ckpt_path) to train with them")
        done, limit = int(state.get("epoch", -1)) + 1, self.config.fit.trainer.get("max_epochs")
        if limit is not None and 0 < limit <= done:  # before anything in the run is renamed
            raise ValueError(
                f"--ckpt_path {ckpt}: {path} has trained {done} epoch(s) and --trainer.max_epochs is {limit}, so "
                f"a resume would train nothing; pass a larger --trainer.max_epochs (e.g. {done + 10}) to train on")

    def _continue_in_run(self, run: Path, path: Path, state: dict, init) -> None:
        """Resume into ``run``, the directory ``path`` was saved in: refused while another process
        trains it, when it cannot be written or its data changed, before anything in it is touched."""
        cfg = self.config.fit
        if first_process() and not lock_dir(run):  # (DDP: the first process holds it for all)
            raise ValueError(
                f"resuming {run}: another process is training that run right now (it holds the run's lock); "
                "let it finish, or stop it, then resume with the same command (its last.ckpt is then the "
                "newest); nothing in the run was changed")
        reason = unwritable(run)
        if reason:  # (it stopped at renaming metrics.csv, with the bare system error)
            raise ValueError(f"resuming {run}: cannot write in it ({reason}); make the run directory writable, "
                             "or copy the run elsewhere and resume the copy")
        if (run / "labels.json").is_file():  # before anything in the run is touched
            data = cfg.data
            check_resumed_data(run, ImageFolderDataModule(  # the run's own split (its split_file, if any)
                data.root, val_fraction=data.val_fraction, seed=data.seed,
                skip_bad_images=data.skip_bad_images, num_workers=0, split_file=data.get("split_file")))
            _check_resumed_steps(run, _trained_settings(run, state), cfg)
        init.version = run.name  # continue in the same run directory
        self.save_config_kwargs["overwrite"] = True
        _keep_metrics_csv(run)
        say(f"vision_tl: resuming {run} from {path.name}")
        if any(run.glob("report*.html")):
            say(f"vision_tl: note: the report in {run} describes the checkpoint from before this resume; "
                 f"run `vision-tl report {run}` again when training ends")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads hyperparameters from ``--ckpt_path`` right after parsing (Lightning
        2.x, private hook); a truncated or foreign checkpoint must fail first, with its path
        named, instead of with a traceback from ``torch.load``. A predict's ``--data.predict_root``
        that is not there is refused before either reads the checkpoint."""
        subcommand = self.config.get("subcommand")
        if subcommand == "predict":
            _check_predict_root(self.config.predict)
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        named = _named_checkpoint(self.config[subcommand], ckpt) if subcommand in ("validate", "test", "predict") else None
        if named is not None:  # the run's file now, so that its settings win over the command line's as a path's do
            ckpt = self.config[subcommand].ckpt_path = named
        if ckpt and ckpt not in ("best", "last", "hpc", "registry"):
            read_checkpoint(ckpt)
        before = self._model_settings()
        super()._parse_ckpt_path()
        after = self._model_settings()
        self._check_checkpoint_settings(ckpt, before, after)
        data = self.config[subcommand].get("data") if subcommand else None
        good = data.get("good_class") if hasattr(data, "get") else None
        if ckpt and after.get("threshold_target") and good is None:  # before the model's own, vaguer error
            run = run_dir_of(Path(str(ckpt)))
            config = f"{run / 'config.yaml'}" if run is not None else "that run's config.yaml"
            trained = (read_checkpoint(ckpt).get("hyper_parameters") or {}).get("good_class")
            raise ValueError(
                f"--ckpt_path {ckpt} was trained with threshold_target {after['threshold_target']!r} on a good class "
                f"({trained!r}), but the config names no --data.good_class: are the config and the checkpoint from "
                f"different runs? Use --config {config}, or pass --data.good_class {trained or 'NAME'}")

    def _model_settings(self) -> dict:
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        return dict(model.as_dict() if hasattr(model, "as_dict") else model or {})

    @staticmethod
    def _check_checkpoint_settings(ckpt, before: dict, after: dict) -> None:
        """The checkpoint's model settings replace the config's (the weights only fit the model they
        were trained in). A ``--model.X`` given on the command line that the checkpoint overrides
        would be ignored without a word: refused. Other replaced settings are listed."""
        changed = _changed_settings(before, after)
        argv = _Parser._argv
        explicit = [k for k in changed if any(a == f"--model.{k}" or a.startswith(f"--model.{k}=") for a in argv)]
        if explicit:
            shown = ", ".join(f"--model.{k} {changed[k][0]} (the checkpoint has {changed[k][1]})" for k in explicit)
            raise ValueError(
                f"{shown}: the model settings stored in --ckpt_path {ckpt} replace the command line's, because its "
                "weights fit only the model they were trained in; drop the option, or, to train in other settings "
                "from pretrained weights, start a new run without --ckpt_path")
        if changed:
            say("vision_tl: the checkpoint's model settings replace the config's: "
                 + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))


# The data.root of configs/*.yaml: the synthetic set `vision-tl demo` writes, what a fit trains on
# when --data.root is left out.
RECIPE_ROOT = "data/demo"


def _check_recipe_root(cfg) -> None:
    """A fit without --data.root trains on the recipe's demo set; where there is none, the error
    says so, not only that a folder the user never named does not exist."""
    root = (cfg.get("data") or {}).get("root")
    if root is not None and Path(str(root)).as_posix() == RECIPE_ROOT and not Path(root).exists():
        raise DatasetError(f"data root {root} does not exist in {Path.cwd()}: it is the recipes' default "
                           "(configs/*.yaml), the synthetic set `vision-tl demo` writes there; give your image "
                           "folder with --data.root DIR, or run `vision-tl demo` first")


def _check_predict_root(cfg) -> None:
    """``predict --data.predict_root DIR`` where DIR is not there: refused before the checkpoint is
    read (a large one takes a while to load), with the message the data module's set-up gives."""
    root = (cfg.get("data") or {}).get("predict_root")
    if root:
        check_unlabelled_root(Path(str(root)).expanduser().absolute())


# What ImageClassifier logs per validation epoch: the metrics --checkpoint.monitor may name.
MONITORED = ("val/balanced_acc", "val/acc", "val/f1_macro", "val/loss")


def _check_fit_settings(cfg) -> None:
    """Settings that would train nothing, or end a fit without ``best.ckpt`` and ``metrics.json``
    (the run ``report``, ``export`` and ``test`` read), refused before any work."""
    trainer, checkpoint = cfg.get("trainer") or {}, cfg.get("checkpoint") or {}

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if trainer.get("max_epochs") == 0:
        raise ValueError("--trainer.max_epochs 0 trains nothing and would leave a run without checkpoints "
                         "or metrics; give at least 1 (or -1 for no limit of epochs, with --trainer.max_steps)")
    # no limit of epochs (-1, or unset with max_time: Lightning then sets -1) and none of steps: the
    # schedule's length came out infinite, and the fit crashed at the first optimizer set-up
    if trainer.get("max_steps") in (None, -1) and (trainer.get("max_epochs") == -1 or (
            trainer.get("max_epochs") is None and trainer.get("max_time") is not None)):
        raise ValueError("--trainer.max_epochs -1 (or --trainer.max_time without max_epochs) and no "
                         "--trainer.max_steps: the learning rate warms up, then "
                         "decays to 0 along a cosine over the run's optimizer steps, so their number must be known; "
                         "give --trainer.max_steps N as well, or a number of epochs (--trainer.max_time and early "
                         "stopping may still end the run sooner)")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and not (isinstance(accumulate, int) and not isinstance(accumulate, bool)
                                       and accumulate >= 1):
        raise ValueError(f"--trainer.accumulate_grad_batches {accumulate}: give a whole number of batches, at least 1 "
                         "(1, the default: one optimizer step per batch)")
    for option, what in (("max_steps", "optimizer steps"), ("limit_train_batches", "training batches"),
                         ("limit_val_batches", "validation batches")):
        if number(trainer.get(option)) and trainer.get(option) == 0:
            raise ValueError(f"--trainer.{option} 0: no {what}, so the run would end without a validated best.ckpt "
                             f"and metrics.json; leave it unset, or give a positive number (or a fraction for limit_*)")
    interval = trainer.get("val_check_interval")
    if number(interval) and interval <= 0:
        raise ValueError(f"--trainer.val_check_interval {interval}: validation would never run; give a fraction of "
                         "an epoch in (0, 1] or a number of batches >= 1 (default: 1.0, after every epoch)")
    every, epochs = trainer.get("check_val_every_n_epoch"), trainer.get("max_epochs")
    if number(every) and number(epochs) and 0 < epochs < every:
        raise ValueError(f"--trainer.check_val_every_n_epoch {every} with --trainer.max_epochs {epochs}: no epoch "
                         "would be validated, so no best.ckpt; give a value of at most the number of epochs")
    monitor = checkpoint.get("monitor")
    if monitor not in MONITORED:
        raise ValueError(f"--checkpoint.monitor {monitor}: best.ckpt is the epoch with the best value of a metric "
                         f"validation logs; give one of {', '.join(MONITORED)} (default val/balanced_acc)")
    if checkpoint.get("filename") != "best" or checkpoint.get("dirpath") is not None:
        raise ValueError("--checkpoint.filename and --checkpoint.dirpath are fixed: report, export, test and resume "
                         "read RUN/checkpoints/best.ckpt and last.ckpt; leave both unset (to keep a copy elsewhere, "
                         "copy the file after training)")
    every_n = checkpoint.get("every_n_epochs")
    if every_n == 0 and not checkpoint.get("every_n_train_steps") and not checkpoint.get("train_time_interval"):
        raise ValueError("--checkpoint.every_n_epochs 0 saves no epoch's best.ckpt; leave it unset (1: every epoch)")
    if number(every_n) and number(epochs) and 0 < epochs < every_n:
        raise ValueError(f"--checkpoint.every_n_epochs {every_n} with --trainer.max_epochs {epochs}: no epoch's "
                         "checkpoint would be saved, so no best.ckpt; give a value of at most the number of epochs")


def _run_settings(run: Path) -> dict:
    """The run's config.yaml, or {} where it cannot be read (nothing to compare with)."""
    try:
        return read_run_config(run)
    except (OSError, ValueError):
        return {}


def _trained_settings(run: Path | None, state: dict) -> dict:
    """What a checkpoint trained with: its run's config.yaml (which a user may edit) with the data
    settings the checkpoint itself stores put over it (or those alone, for a checkpoint moved out
    of its run)."""
    settings = _run_settings(run) if run is not None else {}
    stored = state.get("datamodule_hyper_parameters") or {}
    return {**settings, "data": {**(settings.get("data") or {}), **stored}}


def _check_resumed_steps(source: Path, saved: dict, cfg) -> None:
    """A resume goes on step by step (learning-rate schedule, data order): the batch size and the
    gradient accumulation must be those ``source`` (a run, or a checkpoint) trained with, as its
    settings ``saved`` say. The others' settings are checked elsewhere."""
    for section, key, option in (("data", "batch_size", "--data.batch_size"),
                                 ("trainer", "accumulate_grad_batches", "--trainer.accumulate_grad_batches")):
        was, now = (saved.get(section) or {}).get(key), (cfg.get(section) or {}).get(key)
        if was is not None and now is not None and was != now:
            raise ValueError(
                f"resuming {source}: it trained with {option} {was}, and this command gives {now}; a resume goes "
                f"on step by step (learning-rate schedule, data order), so keep {option} {was}, or start a new run "
                "(without --ckpt_path) to train with the other value")


def _resume_checkpoint(cfg, init) -> str:
    """``fit``'s ``--ckpt_path`` as a file: ``last`` is the last checkpoint of the run whose
    config.yaml is given (else the logger's newest run); Lightning's other names are refused."""
    ckpt = cfg.ckpt_path
    if ckpt == "last":
        # `--config RUN/config.yaml --ckpt_path last` means that run's last checkpoint,
        # even when a newer run has been started since.
        run = _config_run(cfg, "labels.json")
        if run is not None and not (run / "checkpoints" / "last.ckpt").is_file():
            best = run / "checkpoints" / "best.ckpt"
            if best.is_file():  # killed while writing its first last.ckpt, after best.ckpt
                raise FileNotFoundError(
                    f"--ckpt_path last: run {run} has no checkpoints/last.ckpt (it was stopped while writing "
                    f"it), but it has {best.name}: resume from that epoch with --ckpt_path {best}")
            raise FileNotFoundError(
                f"--ckpt_path last: run {run} has no checkpoints/last.ckpt (it stopped before its first "
                f"epoch ended), so there is nothing to resume; start it again without --ckpt_path: "
                f"vision-tl fit --config {run / 'config.yaml'} (a new run directory)")
        if run is not None:
            ckpt = str(run / "checkpoints" / "last.ckpt")
        elif init is None:
            raise ValueError("--ckpt_path last needs a logger with save_dir and name (as in configs/*.yaml)")
        else:
            ckpt = str(find_last_checkpoint(init.save_dir, init.name))
    elif ckpt in ("best", "hpc", "registry") and not Path(ckpt).exists():  # Lightning's names, not the kit's
        run = _config_run(cfg, "checkpoints")
        example = run / "checkpoints" / "best.ckpt" if run is not None else "RUN/checkpoints/best.ckpt"
        raise ValueError(f"--ckpt_path {ckpt}: fit resumes from 'last' (the last checkpoint of the run whose "
                         f"config.yaml is given) or from a checkpoint file, e.g. --ckpt_path {example}")
    return ckpt


def _named_checkpoint(cfg, ckpt) -> str | None:
    """``--ckpt_path best|last`` as the file of the run whose ``config.yaml`` is given, where
    that file exists; None otherwise."""
    run = _config_run(cfg, "checkpoints") if ckpt in ("best", "last") else None
    path = run / "checkpoints" / f"{ckpt}.ckpt" if run is not None else None
    return str(path) if path is not None and path.is_file() else None


def _config_run(cfg, marker: str) -> Path | None:
    """The run directory of the last ``--config`` file that sits in one (``--config
    RUN/config.yaml``: its folder holds ``marker``, e.g. ``checkpoints``), else None."""
    runs = [Path(str(c)).parent for c in cfg.get("config") or []]
    return next((r for r in reversed(runs) if (r / marker).exists()), None)


def _changed_settings(before: dict, after: dict) -> dict[str, tuple]:
    """``{key: (before, after)}`` for the model settings that differ, leaving out the classes
    (linked from the data) and settings ``before`` leaves unset."""
    return {k: (v, after.get(k)) for k, v in before.items()
            if k not in ("classes", "class_counts") and v is not None and _plain(v) != _plain(after.get(k))}


def _plain(value):
    """``value`` with tuples as lists: a size parsed from the command line, (32, 64), is the
    [32, 64] a checkpoint or config.yaml holds."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _note_mid_epoch(state: dict, path: Path) -> None:
    """Say so when the checkpoint was written inside an epoch (``--checkpoint.every_n_train_steps``):
    Lightning restarts that epoch's data from its first batch, so the resumed run sees some of
    its images twice and others not at all, and does not end as an uninterrupted one would."""
    try:
        batches = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        done, last = int(batches["current"]["processed"]), bool(batches["is_last_batch"])
    except (KeyError, TypeError, ValueError):
        return
    if done and not last:
        say(f"vision_tl: note: {path.name} was written {done} batches into epoch "
            f"{state.get('epoch')}; that epoch restarts from its first batch, so the resumed run will not match an "
            "uninterrupted one exactly (end-of-epoch checkpoints, the default, do)")


def _same_classes(recorded, folder: Path) -> bool:
    """Whether ``folder``'s class folders are the classes a split record lists (in NFC form)."""
    try:
        found = class_folders(folder)
    except (OSError, DatasetError):
        return True  # (the data module names the problem)
    return not isinstance(recorded, list) or same_classes(recorded, found)


def _run_of_config(cfg) -> Path | None:
    """The run directory whose ``config.yaml`` was given with ``--config`` (holding its
    ``split.json``), for a checkpoint kept outside ``RUN/checkpoints/``."""
    for given in reversed(cfg.get("config") or []):
        folder = Path(str(given)).expanduser().resolve().parent
        if (folder / "split.json").is_file() and (folder / "config.yaml").is_file():
            return folder
    return None


def _same_split(a: Path, b: Path) -> bool:
    """Whether two split files list the same train and val images (a run trained with
    ``--data.split_file`` writes its own copy of the split it was given)."""
    try:
        first, second = read_split(a), read_split(b)
    except (OSError, ValueError):
        return False
    def entries(split: dict, part: str) -> list[tuple]:
        return sorted((str(e.get("path")), str(e.get("sha256"))) for e in split.get(part, []))
    return first.get("root") == second.get("root") and all(
        entries(first, part) == entries(second, part) for part in ("train", "val"))


def _keep_metrics_csv(run: Path) -> None:
    """Lightning's CSVLogger deletes ``metrics.csv`` when it reopens a run; keep it under a new name."""
    csv = run / "metrics.csv"
    if csv.exists():
        n = 1
        while (run / f"metrics.before_resume_{n}.csv").exists():
            n += 1
        csv.rename(run / f"metrics.before_resume_{n}.csv")
        _KEPT_CSVS.append((csv, run / f"metrics.before_resume_{n}.csv"))
        say(f"vision_tl: kept the step log from before this resume as {run / f'metrics.before_resume_{n}.csv'}")


def _restore_metrics_csvs() -> None:
    """A resume that fails before it logs anything (a weights file gone, a bad setting found when the
    model is built) gives the run its ``metrics.csv`` back: it leaves the run as it found it."""
    for csv, kept in _KEPT_CSVS:
        if not csv.exists() and kept.exists():
            with contextlib.suppress(OSError):
                kept.rename(csv)
    _KEPT_CSVS.clear()


# (runs folder, version directories in it before this command), for _remove_empty_new_runs
_WATCHED_RUNS: list[tuple[Path, set[str]]] = []
_KEPT_CSVS: list[tuple[Path, Path]] = []  # (metrics.csv, the name a resume kept it under), see _keep_metrics_csv
# The run directory this command's trainer writes to (SaveRunConfig.setup), and its loggers, which
# make that directory before any setup (a failing data module's included): only it may be removed.
_OWN_RUNS: list[Path] = []
_OWN_LOGGERS: list = []
_NOT_OWN: set[Path] = set()  # a run directory SaveRunConfig found taken by another command


def _own_runs() -> list[Path]:
    runs = list(_OWN_RUNS)
    for logger in _OWN_LOGGERS:  # a logger that made its directory in this process (rank 0 under DDP)
        if getattr(logger, "_experiment", None) is not None and getattr(logger, "log_dir", None):
            runs.append(Path(logger.log_dir))
    return [run for run in runs if run not in _NOT_OWN]


def first_process() -> bool:
    """Whether this is the first process of a command (global rank 0, as torchrun, srun or
    Lightning's launcher number them; the only one, without a launcher)."""
    return launcher_int("RANK", launcher_int("SLURM_PROCID", launcher_int("LOCAL_RANK", 0))) == 0


def _forget_runs() -> None:
    release_dir_locks()  # the command is over: its runs are free for the next one
    _KEPT_CSVS.clear()
    _WATCHED_RUNS.clear()
    _OWN_RUNS.clear()
    _OWN_LOGGERS.clear()
    _NOT_OWN.clear()


# What every command writes into its run directory before any result.
_BOOKKEEPING = {"config.yaml", "hparams.yaml", "labels.json", "split.json", "metrics.csv"}


def _remove_empty_new_runs() -> None:
    """A command that failed before any result leaves no ``version_N`` behind. Only the directory
    this command's trainer wrote to is removed, if it was new and holds nothing but start-up
    bookkeeping: never another command's (another fit may be starting beside this one). A resumed
    run that logged nothing gets its ``metrics.csv`` back."""
    _restore_metrics_csvs()
    new = {(parent, name) for parent, before in _WATCHED_RUNS for name in
           ({p.name for p in parent.glob("version_*")} - before)}
    for run in _own_runs():
        if (run.parent, run.name) not in new or not run.is_dir():
            continue
        try:  # under DDP every rank fails and cleans up: another may have removed it already
            entries = list(run.iterdir())
            if all(e.is_file() and e.name in _BOOKKEEPING for e in entries):
                for entry in entries:
                    entry.unlink(missing_ok=True)
                run.rmdir()
        except FileNotFoundError:
            pass
    _forget_runs()


def run_lightning_cli(argv: list[str]) -> int:
    """Run LightningCLI on ``argv`` (``fit ...``); user errors print one line, not a traceback."""
    from vision_tl.errors import user_errors

    _forget_runs()
    TERMINATED.clear()  # an earlier command's SIGTERM (several fits in one Python session)
    # Lightning reports bad trainer settings (--trainer.max_epochs -3) as MisconfigurationException.
    try:
        with user_errors(extra=(MisconfigurationException,)), _without_lightning_noise():
            unreadable = _run_cli(argv)
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit without a code, i.e. status 0: a run
        # stopped half-way would pass for a finished one in `fit && export` or a job script.
        _remove_empty_new_runs()  # stopped before its first epoch: nothing to keep
        return SIGTERM_EXIT
    except RuntimeError as exc:
        # DDP: a rank that stopped on its own error (one line, printed by it) leaves the others
        # with a lost connection in their next collective; they say so in one line too.
        message = peer_stopped(exc)
        _remove_empty_new_runs()
        if message is None or env_on("VISION_TL_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        _remove_empty_new_runs()
        if TERMINATED and exc.code == 1:  # SIGTERM under DDP, stopped like Ctrl-C (ResumableRandomState)
            return SIGTERM_EXIT
        raise
    except BaseException:
        _remove_empty_new_runs()
        raise
    _forget_runs()
    # Like predict-onnx: the CSV is written, but some images have an error row instead of a prediction.
    return PARTIAL_EXIT if unreadable else 0


# Shown by `vision-tl COMMAND --help` (Lightning's default is the first lines of the Trainer method's docstring).
_DESCRIPTIONS = {
    "fit": "Train a classifier on an image folder (one sub-folder per class, or train/ val/ [test/]). "
           "Writes runs/<name>/version_N/: config.yaml, labels.json, split.json (when it splits the folder), metrics.json and "
           "checkpoints/best.ckpt, last.ckpt. Example: vision-tl fit --config configs/partial.yaml --data.root DIR",
    "validate": "Evaluate a checkpoint on the val split. "
                "Example: vision-tl validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/best.ckpt",
    "test": "Evaluate a checkpoint on the test/ split (or val, when the folder has none) and write its report. "
            "Example: vision-tl test --config RUN/config.yaml --ckpt_path RUN/checkpoints/best.ckpt",
    "predict": "Predict the run's test/ (or val) split, or new images with --data.predict_root DIR (any folder "
               "or one image), into predictions.csv in a new run directory. "
               "Example: vision-tl predict --config RUN/config.yaml --ckpt_path RUN/checkpoints/best.ckpt "
               "--data.predict_root DIR",
}


_DEFAULT_ROOT, _DEFAULT_NAME = "runs", "lightning_logs"  # where a run without a config's logger goes


def _prog() -> str:
    """The command as typed, for usage lines and "all options: ... --help" hints: ``vision-tl``, or
    ``python -m vision_tl.cli`` (as under torchrun), which argparse would call ``cli.py``."""
    return "python -m vision_tl.cli" if Path(sys.argv[0]).name == "cli.py" else "vision-tl"


def _run_cli(argv: list[str]) -> int:
    """Run the command; returns how many images `predict` wrote as error rows."""
    cli = VisionTLCLI(
        ImageClassifier,
        ImageFolderDataModule,
        # From the console script argv is sys.argv[1:]: let Lightning read it (and rebuild it
        # for DDP ranks); from Python, pass it explicitly.
        args=None if list(argv) == sys.argv[1:] else argv,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": False},
        # Without a config the run still gets an explicit logger (Lightning's own default names
        # no folder in config.yaml): its runs then resume in place from any working directory.
        trainer_defaults={"default_root_dir": _DEFAULT_ROOT, "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": _DEFAULT_ROOT, "name": _DEFAULT_NAME}}},
        parser_kwargs={"default_env": False, "prog": _prog(), **{name: {"default_env": False, "description": text}
                                                for name, text in _DESCRIPTIONS.items()}},
        parser_class=_Parser,
        auto_configure_optimizers=False,
    )
    trainer = getattr(cli, "trainer", None)
    return sum(getattr(c, "unreadable", 0) for c in getattr(trainer, "callbacks", []) or [])


if __name__ == "__main__":
    sys.exit(run_lightning_cli(sys.argv[1:]))
