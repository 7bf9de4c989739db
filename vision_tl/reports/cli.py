"""``vision-tl report``, ``vision-tl compare`` and ``vision-tl explain``.

Each ``*_main(argv)`` receives the arguments after the command name and returns
the exit status: 0 ok, 2 bad input (``error: ...`` on stderr, no traceback;
``VISION_TL_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vision_tl.deploy.cli import positive_int
from vision_tl.utils import env_on
from vision_tl.utils.files import path_arg

FMT = argparse.RawDescriptionHelpFormatter

REPORT_EPILOG = """examples:
  vision-tl report runs/partial/version_0
  vision-tl report runs/partial/version_0 --target-false-reject 0.01
  vision-tl report runs/partial/version_0 --target-escape 0.005 --in-place
  vision-tl report runs/partial/version_0 --split test

Writes into the run directory: report.html (self-contained), predictions.csv,
confusion_matrix_val.png, per_class_val.png, roc_pr_val.png, reliability_val.png,
error_gallery_val.png, threshold_val.png and operating_curve_val.png (with a good
class), training_curves.png (redrawn from the run's history), and a "report" / "figures"
section in metrics.json (other keys are kept). --split test writes report_test.html etc.

Thresholds: an image is good iff P(good) >= threshold. --target-false-reject R
keeps the fewest defects passing while rejecting at most R of the good validation
images; --target-escape E rejects the fewest good images while passing at most E of
the defective ones. The threshold sits midway between two observed scores, so no
validation image lies on it. It is saved to checkpoints/best.thresholded.ckpt (the
original is kept), or into best.ckpt itself with --in-place; `vision-tl export` then
carries it into ONNX.
"""

COMPARE_EPILOG = """examples:
  vision-tl compare runs/frozen/version_0 runs/partial/version_0
  vision-tl compare runs/*/version_* --out runs/compare

Prints a table; --out DIR also writes compare.html, compare.json and compare.png.
Runs with a report (vision-tl report RUN) add AUC, ECE and escape/false-reject rates.
"""

EXPLAIN_EPILOG = """examples:
  vision-tl explain runs/partial/version_0/checkpoints/best.ckpt data/demo/scratch/scratch_0001.png
  vision-tl explain best.ckpt img1.png img2.png --class scratch --out explain/
  vision-tl explain best.ckpt data/demo/crack/          # every image in a folder

Writes <out>/<image name>.gradcam.png: the image, the Grad-CAM heat map of the
class (default: the predicted one) and the overlay. The layer explained is the
backbone's deepest feature stage (timm feature_info) with at least 8 cells on the
shorter side at the model's input size (e.g. Lite0 at 128 px: the stride-16 stage).
An image that cannot be read (corrupt file, broken link) is named and skipped, the
others are explained, and the exit status is 3.
"""


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vision-tl report", formatter_class=FMT, epilog=REPORT_EPILOG,
                                description="Evaluate a run's checkpoint and write an HTML report with "
                                            "per-class metrics, ROC/PR curves, calibration and good/defect rates.")
    p.add_argument("run", type=path_arg, metavar="RUN_DIR", help="a run directory written by vision-tl fit")
    p.add_argument("--split", choices=("val", "test"), default="val", help="images to evaluate (default: val)")
    p.add_argument("--checkpoint", type=path_arg, metavar="CKPT", help="default: RUN_DIR/checkpoints/best.ckpt")
    p.add_argument("--data", type=path_arg, metavar="ROOT", help="the image folder, if it moved since training")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-false-reject", type=_rate, metavar="R",
                        help="choose the threshold so at most R (e.g. 0.01) of good images are rejected")
    target.add_argument("--target-escape", type=_rate, metavar="E",
                        help="choose the threshold so at most E (e.g. 0.005) of defective images pass")
    p.add_argument("--in-place", action="store_true",
                   help="store the chosen threshold in the checkpoint itself (atomic rewrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report of this split (report.html, predictions, figures) and a "
                        "<name>.thresholded.ckpt an earlier report wrote (its threshold is lost)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (32)")
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vision-tl compare", formatter_class=FMT, epilog=COMPARE_EPILOG,
                                description="Compare runs side by side from their metrics.json.")
    p.add_argument("runs", type=path_arg, nargs="+", metavar="RUN_DIR",
                   help="run directories, or patterns such as 'runs/*/version_*' (expanded here where no shell did)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="which metrics (default: val)")
    p.add_argument("--out", type=path_arg, metavar="DIR", help="also write compare.html, compare.json and compare.png here")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    return p


def explain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vision-tl explain", formatter_class=FMT, epilog=EXPLAIN_EPILOG,
                                description="Grad-CAM heat maps: where the model looked for a class.")
    p.add_argument("checkpoint", type=path_arg, metavar="CKPT", help="a .ckpt written by vision-tl fit")
    p.add_argument("images", type=path_arg, nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="class to explain (default: predicted)")
    p.add_argument("--out", type=path_arg, metavar="DIR", default="explain", help="output folder (default: ./explain)")
    p.add_argument("--overwrite", action="store_true", help="replace heat maps already in --out")
    return p


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate between 0 and 1, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), e.g. 0.01 for 1 %, got {text!r}")
    return value


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, action: Callable) -> int:
    """Parse, run, and turn user errors into ``error: ...`` + status 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    from vision_tl.backbones import BackboneWeightsError  # imports torch: after --help, not before

    try:
        return action(args) or 0
    except (ValueError, OSError, BackboneWeightsError) as exc:
        if env_on("VISION_TL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _report(args: argparse.Namespace) -> None:
    from vision_tl.reports.report import report_run

    target = None
    if args.target_false_reject is not None:
        target = f"false_reject:{args.target_false_reject}"
    elif args.target_escape is not None:
        target = f"escape:{args.target_escape}"
    if args.in_place and target is None:
        raise ValueError("--in-place only applies with --target-false-reject or --target-escape")
    result = report_run(args.run, split=args.split, checkpoint=args.checkpoint, data_root=args.data,
                        target=target, in_place=args.in_place, batch_size=args.batch_size,
                        overwrite=args.overwrite)
    s = result.metrics["summary"]
    print(f"{s['images']} {args.split} images: accuracy {_f(s['acc'])}, balanced accuracy "
          f"{_f(s['balanced_acc'])}, macro F1 {_f(s['f1_macro'])}, macro AUC {_f(s['roc_auc_macro'])}, "
          f"ECE {_f(s['ece'])}")
    gvd = result.metrics.get("good_vs_defect")
    if gvd is not None:
        rule = (f"at threshold {_f(gvd['threshold'])}" if gvd.get("threshold") is not None else
                "by the most probable class (no threshold set; choose one with --target-false-reject R "
                "or --target-escape E)")
        print(f"good vs defect {rule}: escape rate {_f(gvd['escape_rate'])} "
              f"({gvd['escapes']}/{gvd['defect_images']}{_within(gvd.get('escape_rate_interval'))}), false-reject "
              f"rate {_f(gvd['false_reject_rate'])} ({gvd['false_rejects']}/{gvd['good_images']}"
              f"{_within(gvd.get('false_reject_rate_interval'))})")
    if result.checkpoint is not None:
        how = "rewrote" if args.in_place else "wrote"
        print(f"threshold {result.threshold['threshold']:.6f} ({result.threshold['target']}): {how} {result.checkpoint}")
        print(f"next: vision-tl export {result.checkpoint} --out model.onnx   (the threshold travels into the ONNX "
              "metadata; predict-onnx then fills is_defect)")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {result.html}")


def _within(bounds: list[float] | None) -> str:
    """``, 95% 0.0000-0.7935``: where the rate may lie, from its counts (Wilson); nothing without one."""
    return f", 95% {bounds[0]:.4f}-{bounds[1]:.4f}" if bounds else ""


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _compare(args: argparse.Namespace) -> None:
    from vision_tl.reports.compare import (
        compare_runs,
        comparison_paths,
        format_table,
        write_comparison,
    )

    if args.out:
        comparison_paths(args.out, args.overwrite)  # refused before the work, not after the table
    comparison = compare_runs(args.runs, args.split)
    print(format_table(comparison))
    if args.out:
        print(f"wrote {write_comparison(comparison, args.out, args.overwrite)['html']}")


def _explain(args: argparse.Namespace) -> int:
    from vision_tl.reports.explain import iter_explain_checkpoint

    # one corrupt file in a folder does not stop the heat maps of the others (which a second run
    # would then refuse without --overwrite); it is named, and the exit status says so, as in predict-onnx
    unreadable: list[str] = []
    for item, path in iter_explain_checkpoint(args.checkpoint, args.images, args.out, args.class_name,
                                               args.overwrite, unreadable):
        print(f"{item.path}: predicted {item.predicted} ({item.probability:.3f}); "
              f"Grad-CAM of {item.explained} -> {path}")
    for message in unreadable:
        print(f"skipped: {message}", file=sys.stderr)
    if unreadable:
        print(f"{len(unreadable)} image(s) could not be read and have no heat map (exit status 3)", file=sys.stderr)
        return 3
    return 0


def report_main(argv: list[str] | None = None) -> int:
    """``vision-tl report RUN_DIR [options]``."""
    return _run(report_parser(), argv, _report)


def compare_main(argv: list[str] | None = None) -> int:
    """``vision-tl compare RUN_DIR... [--out DIR]``."""
    return _run(compare_parser(), argv, _compare)


def explain_main(argv: list[str] | None = None) -> int:
    """``vision-tl explain CKPT IMAGE... [--class NAME] [--out DIR]``."""
    return _run(explain_parser(), argv, _explain)


main = report_main

if __name__ == "__main__":
    sys.exit(report_main())
