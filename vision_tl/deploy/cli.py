"""``vision-tl predict-onnx``: classify image files with an exported ONNX model, without torch.

The package's command dispatcher calls :func:`main` with the arguments that
follow ``predict-onnx``; it can also be run as ``python -m vision_tl.deploy.cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from vision_tl.deploy.metadata import DeployError
from vision_tl.deploy.predictor import (
    Prediction,
    Predictor,
    check_image_settings,
    prediction_columns,
    probability_text,
    scan_images,
)
from vision_tl.imaging import IMAGE_EXTENSIONS, INTERPOLATIONS
from vision_tl.utils import files
from vision_tl.utils.files import (
    already_there,
    atomic_path,
    free_sibling,
    held_by_another_program,
    name_key,
    path_arg,
    path_text,
    unwritable,
)

FORMATS = (".csv", ".json")
CSV_ENCODINGS = ("utf-8", "utf-8-sig")
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_UNREADABLE = 3
_EPILOG = """\
examples:
  vision-tl predict-onnx model.onnx line3/2024-06-01/ --out predictions.csv
  vision-tl predict-onnx model.onnx a.png b.png --out preds.json --threads 4
  # an ONNX model exported by another tool (no vision_tl metadata):
  vision-tl predict-onnx other.onnx images/ --out p.csv --classes ok,scratch,dent \\
      --input-size 224,224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225

The CSV has the columns path, predicted, probability, is_defect, error and one
p_<class> column per class; is_defect is filled only when the model carries a
good class and a threshold. A model exported with its training images also has
unfamiliarity and unfamiliar (true: unlike every training image; check the
camera, lighting and product) before error. Unreadable images (corrupt files, broken symbolic
links) become rows with an error instead of stopping the run. Files in the
folders that are not supported images (.gif, .txt ...) are ignored and counted
in the summary.

exit status:
  0    every image was predicted
  2    bad arguments, model or inputs (nothing written), or an --out that could not
       be replaced (the message names the file that holds the predictions)
  3    the output was written, but some images could not be read (error rows)
  130  interrupted (nothing written)
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vision-tl predict-onnx``."""
    parser = argparse.ArgumentParser(
        prog="vision-tl predict-onnx",
        description="Classify images with an exported ONNX model (onnxruntime, no torch).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=path_arg, metavar="MODEL.onnx", help="the exported ONNX model")
    parser.add_argument("inputs", type=path_arg, metavar="INPUT", nargs="+",
                        help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", type=path_arg, required=True, metavar="FILE",
                        help="output file; the format follows the extension: .csv or .json")
    parser.add_argument("--csv-encoding", choices=CSV_ENCODINGS, default="utf-8",
                        help="text encoding of a .csv --out (default: utf-8). utf-8-sig starts the file with a "
                             "byte order mark, by which Excel on Windows knows it is UTF-8: without it Excel reads "
                             "it as the system's code page and shows a class Kratzer_ä as Kratzer_Ã¤")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                        help="images per inference batch (default: 32)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--decode-threads", type=_at_least_zero, default=None, metavar="N",
                        help="threads decoding and resizing images, the next batch while the model runs "
                             "(default: one per core, at most 8; 0: decode between batches)")
    parser.add_argument("--classes", type=_name_list, default=None, metavar="A,B,C",
                        help="class names in output order, for a model exported by another tool (a vision_tl "
                             "model carries its own and refuses others)")
    parser.add_argument("--input-size", type=input_size_arg, default=None, metavar="H,W",
                        help="model input height,width (overrides the model metadata)")
    parser.add_argument("--mean", type=_triple, default=None, metavar="R,G,B",
                        help="normalisation mean on the 0..1 scale, for a float-input model "
                             "(refused when the model normalises inside the graph)")
    parser.add_argument("--std", type=_triple, default=None, metavar="R,G,B",
                        help="normalisation std on the 0..1 scale, for a float-input model "
                             "(refused when the model normalises inside the graph)")
    parser.add_argument("--interpolation", choices=tuple(INTERPOLATIONS), default=None,
                        help="resize interpolation (overrides the model metadata; a value other "
                             "than the model's makes predictions differ from the validated ones)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it already exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``vision-tl predict-onnx``; returns the exit status.

    0: every image predicted; 2: bad arguments, model or inputs (nothing written), or an --out
    that could not be replaced (the predictions are then in another file, named in the message);
    3: the output was written but some images could not be read (error rows).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with _one_line_warnings():
            return _predict(args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a path the file system refuses (too long, not permitted): named in exc
        print(f"error: {exc.strerror or exc}: {exc.filename or ''} (nothing written)".rstrip(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130


def _predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_output(out, args.overwrite)
    if args.csv_encoding != "utf-8" and out.suffix.lower() != ".csv":  # (JSON must not start with a BOM)
        raise DeployError(f"--csv-encoding {args.csv_encoding} is for a .csv --out, not {out.name}; leave it out")
    check_image_settings()  # a bad $VISION_TL_MAX_IMAGE_PIXELS / _JPEG_DECODER: one error before any work
    images, ignored = _collect_images(args.inputs)
    predictor = Predictor(
        args.model, classes=args.classes, input_size=args.input_size, mean=args.mean,
        std=args.std, interpolation=args.interpolation, threads=args.threads,
    )
    start = time.perf_counter()
    with _progress(len(images)) as update:
        predictions = predictor.predict_paths(images, args.batch_size, on_progress=update,
                                              decode_threads=args.decode_threads)
    elapsed = time.perf_counter() - start
    writer = _write_csv if out.suffix.lower() == ".csv" else _write_json
    scored = predictor.scores_unfamiliarity
    _write_atomic(out, lambda fh: writer(fh, predictions, predictor.classes, scored), args.overwrite,
                  args.csv_encoding)
    _print_summary(predictions, predictor, elapsed, out, ignored)
    failed = sum(1 for p in predictions if p.error is not None)
    if failed:
        print(f"{_plural(failed, 'image')} of {len(predictions)} could not be read: "
              f"{'its row' if failed == 1 else 'their rows'} in {out} "
              f"{'has' if failed == 1 else 'have'} an error and no prediction "
              f"(exit status {EXIT_UNREADABLE})", file=sys.stderr)
        return EXIT_UNREADABLE
    return EXIT_OK


def _check_output(out: Path, overwrite: bool) -> None:
    """Fail before any inference when the output cannot be written."""
    if out.is_dir():
        raise DeployError(f"--out {out} is a folder; give a file name such as {out / 'p.csv'}")
    if out.suffix.lower() not in FORMATS:
        raise DeployError(
            f"--out {out}: unknown output format {out.suffix or '(no extension)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    folder = out.parent
    if not folder.is_dir():
        raise DeployError(f"output folder {folder} does not exist; create it first")
    there = already_there(out)
    if there and not overwrite:
        raise DeployError(f"{out} {there}; pass --overwrite to replace it")
    if there and held_by_another_program(out):  # (checked again when the file is replaced, see _write_atomic)
        raise DeployError(f"--out {out} cannot be replaced: {_held_hint()}")
    reason = unwritable(folder)
    if reason:
        raise DeployError(f"--out {out}: cannot write in {folder} ({reason}); write to a folder you can write to")


def _collect_images(inputs: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """Expand files and folders, keeping order and dropping repeats.

    Returns:
        The images to predict and the non-image files found in the folders.
    """
    seen: set[Path] = set()
    images: list[Path] = []
    ignored: dict[Path, Path] = {}
    for item in inputs:
        scan = scan_images(item)
        for path in scan.images:
            key = name_key(path)
            if key not in seen:
                seen.add(key)
                images.append(path)
        ignored.update((name_key(path), path) for path in scan.ignored)
    return images, list(ignored.values())


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show Python warnings (e.g. a changed interpolation) as ``warning: ...`` lines."""
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: IO[str] | None = None, line: str | None = None) -> None:
        del category, filename, lineno, file, line
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], object] | None]:
    """A tqdm bar on stderr: redrawn in a terminal, a line every 30 s in a log (none for a
    shorter job); nothing where tqdm is absent (it is optional in the torch-free install)."""
    bar = None
    try:
        import tqdm  # noqa: F401
    except ImportError:
        pass
    else:
        from vision_tl.utils import progress_bar

        bar = progress_bar(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar.update if bar is not None else None
    finally:
        if bar is not None:
            bar.close()


def _held_hint() -> str:
    """Why a file could not be replaced: on Windows (no ``flock``), most often another program
    holding it open; elsewhere open files are replaced, so it is the permissions."""
    if files.fcntl is None:
        return "it may be open in another program (such as Excel); close it there and run again"
    return "check the permissions of the file and its folder (a sticky folder such as /tmp keeps other users' files)"


def _write_atomic(out: Path, write: Callable[[IO[str]], None], overwrite: bool, encoding: str = "utf-8") -> None:
    """Write through a temporary file in the same folder, renamed into place when complete;
    without ``overwrite``, a file another process wrote there meanwhile is kept (an error).

    Where ``out`` cannot be replaced (on Windows, opened in Excel since the check before
    inference), the predictions are written beside it under a name that holds nothing
    (p.unsaved.csv) rather than lost, and the error names both files."""
    def write_to(path: Path, overwrite: bool) -> None:
        with atomic_path(path, overwrite=overwrite) as tmp, \
                open(tmp, "w", encoding=encoding, errors="backslashreplace", newline="") as fh:
            write(fh)

    try:
        write_to(out, overwrite)
    except PermissionError as exc:
        if not os.path.lexists(out):
            raise DeployError(f"{out}: cannot write the predictions ({exc})") from exc
        kept = free_sibling(out, "unsaved")
        try:
            write_to(kept, overwrite=False)
        except OSError as again:
            raise DeployError(f"{out} could not be replaced ({exc}): {_held_hint()}; nor could the predictions be "
                              f"written to {kept} ({again})") from exc
        raise DeployError(f"{out} could not be replaced ({exc}): {_held_hint()}. The predictions were written to "
                          f"{kept} instead") from exc
    except OSError as exc:
        raise DeployError(f"{out}: cannot write the predictions ({exc})") from exc


def _write_csv(fh: IO[str], predictions: list[Prediction], classes: list[str], unfamiliar: bool = False) -> None:
    writer = csv.writer(fh)
    writer.writerow(prediction_columns(classes, true=False, unfamiliar=unfamiliar))
    for p in predictions:
        scored = [_fmt(p.unfamiliarity), _flag(p.unfamiliar)] if unfamiliar else []
        writer.writerow([path_text(p.path), p.predicted or "", _fmt(p.probability),
                         *[_fmt(p.probabilities.get(name)) for name in classes], _flag(p.is_defect), *scored,
                         p.error or ""])


def _write_json(fh: IO[str], predictions: list[Prediction], classes: list[str], unfamiliar: bool = False) -> None:
    del classes  # each object carries its own probabilities mapping
    json.dump([p.to_dict(unfamiliar=unfamiliar) for p in predictions], fh, indent=2)
    fh.write("\n")


def _flag(value: bool | None) -> str:
    return "" if value is None else str(value).lower()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fmt(value: float | None) -> str:
    return "" if value is None else probability_text(value)


def _print_summary(predictions: list[Prediction], predictor: Predictor, elapsed: float,
                   out: Path, ignored: Sequence[Path] = ()) -> None:
    errors = [p for p in predictions if p.error is not None]
    predicted = len(predictions) - len(errors)
    counts = Counter(p.predicted for p in predictions if p.predicted is not None)
    rate = len(predictions) / elapsed if elapsed > 0 else float("inf")
    print(f"{_plural(len(predictions), 'image')}: {predicted} predicted, {len(errors)} could not "
          f"be read, {elapsed:.2f} s ({rate:.1f} images/s)")
    width = max(len(name) for name in predictor.classes)
    for name in predictor.classes:
        print(f"  {name:<{width}}  {counts[name]}")
    meta = predictor.metadata
    if meta.good_class is not None and meta.threshold is not None:
        defects = sum(1 for p in predictions if p.is_defect)
        unjudged = f" ({len(errors)} unreadable, not judged)" if errors else ""
        print(f"  defects (P({meta.good_class}) < {float(meta.threshold)!r}): {defects} of "
              f"{predicted} predicted{unjudged}")
    if meta.flags_unfamiliar and predictor.scores_unfamiliarity:
        unfamiliar = sum(1 for p in predictions if p.unfamiliar)
        print(f"  unfamiliar (unlike every training image: check camera, lighting, product): {unfamiliar} of "
              f"{predicted}")
    if ignored:
        names = ", ".join(str(p) for p in ignored[:3]) + (", ..." if len(ignored) > 3 else "")
        print(f"ignored {_plural(len(ignored), 'non-image file')} in the input folders "
              f"(not {'/'.join(IMAGE_EXTENSIONS)}): {names}")
    for p in errors[:5]:
        print(f"skipped: {p.error}", file=sys.stderr)
    if len(errors) > 5:
        print(f"skipped: ... and {len(errors) - 5} more (see the error column)", file=sys.stderr)
    print(f"wrote {out}")


# ------------------------------------------------------------ argument types


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (also used by the export and report commands)."""
    return _int_from(text, 1, "a positive integer")


def _at_least_zero(text: str) -> int:
    return _int_from(text, 0, "a whole number of at least 0")


def _int_from(text: str, least: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from exc
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, got {text!r}")
    return names


def input_size_arg(text: str) -> tuple[int, int]:
    """``argparse`` type for an input size: ``H,W``, ``HxW`` or one int for a square."""
    parts = text.replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 224,224), got {text!r}") from exc
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 224,224), got {text!r}")
    return values[0], values[1]


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected 3 numbers R,G,B, got {text!r}") from exc
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 numbers R,G,B, got {text!r}")
    return values[0], values[1], values[2]


if __name__ == "__main__":
    from vision_tl.utils import printable_stdout

    printable_stdout()
    sys.exit(main())
