"""``vision-tl export``: checkpoint -> ONNX, with a parity check against PyTorch.

The package's command dispatcher calls :func:`main` with the arguments that
follow ``export``; it can also be run as ``python -m vision_tl.export.cli``.
"""

from __future__ import annotations

import argparse
import sys

from vision_tl.deploy import DeployError
from vision_tl.deploy.cli import positive_int
from vision_tl.export.options import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MAX_DECISION_CHANGES,
    DEFAULT_OPSET,
    KEEP_FLOAT_CHOICES,
    MAX_OPSET,
    MIN_OPSET,
    ExportError,
    ExportOptions,
    Int8Config,
    ParityError,
    VariantRejected,
)
from vision_tl.utils.files import path_arg

_EPILOG = """\
examples:
  vision-tl export runs/frozen/version_0/checkpoints/best.ckpt --out model.onnx
  vision-tl export best.ckpt --out model.onnx --parity-images line_images/
  vision-tl export best.ckpt --out model.onnx --int8 --fp16 --threads 2

The model's input is 'image', uint8 [N, H, W, 3] RGB after a plain resize to the
training size; normalisation is inside the graph. The output 'probabilities' is
float32 [N, classes]. Class names, input size, mean/std, interpolation, threshold,
backbone, kit version and training metrics are stored in the ONNX metadata_props.

Unfamiliar images: with the run's training and validation images at hand, the model
also outputs 'unfamiliarity' [N], 1 - the best cosine similarity of an image's
features to those of up to 2,000 training images (embedded in the model); above the
highest score of the validation images (metadata unfamiliar_threshold) an image is
unlike every training image: moved camera, changed lighting, another product.
--no-unfamiliar leaves it out.

Parity: by default the run's validation images (split.json beside the checkpoint's
run directory) are predicted by PyTorch and onnxruntime; max |Δprob| must be
<= 1e-4 and top-1 agreement 100 %. The report is printed and saved as
<name>.parity.json. --int8 / --fp16 also write <name>.int8.onnx / <name>.fp16.onnx,
each with its accuracy change on the same images and its latency/throughput.

Exit status: 0 ok; 1 parity failed (nothing written under --out); 2 bad input;
3 --out passed and was written, but an --int8/--fp16 variant failed its check
(nothing written under the variant's name; its report is <name>.int8.parity-failed.json).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vision-tl export``."""
    p = argparse.ArgumentParser(
        prog="vision-tl export", epilog=_EPILOG,
        description="Export a vision_tl checkpoint to ONNX (uint8 NHWC in, probabilities out).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=path_arg, metavar="CHECKPOINT", help="a .ckpt written by vision-tl fit")
    p.add_argument("--out", type=path_arg, required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: {DEFAULT_OPSET})")
    p.add_argument("--parity-images", type=path_arg, default="auto", metavar="DIR|auto|none",
                   help="images for the PyTorch-vs-ONNX check: 'auto' = the run's val split "
                        "(default), a folder (labels from class sub-folders), or 'none' to skip")
    p.add_argument("--data", type=path_arg, default=None, metavar="ROOT",
                   help="the run's image folder (--data.root of its fit), if it moved since training: its "
                        "split's validation and training images are read there")
    p.add_argument("--no-normalize-in-graph", dest="normalize_in_graph", action="store_false",
                   help="take normalised float32 NCHW input instead of uint8 NHWC pixels")
    p.add_argument("--no-unfamiliar", dest="unfamiliar", action="store_false",
                   help="leave out the output 'unfamiliarity' (how unlike every training image an image is; "
                        "by default added when the run's training and validation images are at hand)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    q = p.add_argument_group("smaller variants (INT8: faster on CPUs)")
    q.add_argument("--int8", action="store_true",
                   help="also write <name>.int8.onnx (static QDQ, calibrated on training images)")
    q.add_argument("--calibration-images", type=positive_int, default=None,
                   metavar="N", help=f"calibration images (default: {DEFAULT_CALIBRATION_IMAGES})")
    q.add_argument("--calibration-method", choices=CALIBRATION_METHODS,
                   default=None, help=f"default: {Int8Config.method}")
    q.add_argument("--calibration-percentile", type=float, default=None, metavar="P",
                   help=f"activation range percentile for the percentile method "
                        f"(default: {Int8Config.percentile})")
    q.add_argument("--keep-float", choices=KEEP_FLOAT_CHOICES, default=None,
                   help=f"layers left in fp32 (default: {Int8Config.keep_float})")
    q.add_argument("--calibration-dir", type=path_arg, metavar="DIR", default=None,
                   help="training images (only): INT8 calibration and the unfamiliarity bank (default: the run's "
                        "training images from its split.json or ROOT/train/)")
    q.add_argument("--fp16", action="store_true",
                   help="also write <name>.fp16.onnx (half the size; faster on GPUs, usually slower on CPUs)")
    q.add_argument("--max-accuracy-drop", type=float, default=None,
                   metavar="POINTS", help="fail a variant that loses more accuracy "
                   f"(percentage points, default: {DEFAULT_MAX_ACCURACY_DROP})")
    q.add_argument("--max-decision-changes", type=float, default=None,
                   metavar="PERCENT", help="fail a variant of a model with a good/defect threshold that flips "
                   "the decision on more of the check images (percent, default: "
                   f"{DEFAULT_MAX_DECISION_CHANGES})")
    q.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="onnxruntime threads for the speed numbers (default: its choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``vision-tl export``; returns 0 (ok), 1 (parity failed), 2 (bad input) or 3 (variant failed)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    problem = _option_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    written: list[str] = []  # for the message after an interruption

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        if message.startswith(("wrote ", "removed ")):
            written.append(message)

    # (imports torch, timm and onnx: here, so that --help and a usage error answer without them)
    from vision_tl.export.pipeline import export_onnx

    try:
        export_onnx(args.checkpoint, args.out, _export_options(args), log=log)
    except VariantRejected as exc:
        print(f"error: variant rejected: {exc}", file=sys.stderr)
        return 3
    except ParityError as exc:
        print(f"error: parity check failed: {exc}", file=sys.stderr)
        return 1
    except (ExportError, DeployError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the vision-tl command (it then exits 143)
        if written:
            print(f"interrupted after it {'; '.join(written)}; nothing else changed under the final names",
                  file=sys.stderr)
        else:
            print("interrupted; nothing written under the final names", file=sys.stderr)
        return 130
    return 0


def _option_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the parsed options (an option that does nothing with the others, a bound
    out of range), or None."""
    int8_only = {"--calibration-images": args.calibration_images, "--keep-float": args.keep_float,
                 "--calibration-method": args.calibration_method,
                 "--calibration-percentile": args.calibration_percentile}
    given = [name for name, value in int8_only.items() if value is not None]
    if given and not args.int8:
        return f"{', '.join(given)} apply only with --int8"
    if args.calibration_dir is not None and not (args.int8 or args.unfamiliar):
        return ("--calibration-dir gives training images for --int8 and the unfamiliarity output; with "
                "neither (--no-unfamiliar, no --int8) it has nothing to do")
    if args.calibration_percentile is not None and (args.calibration_method or Int8Config.method) != "percentile":
        return (f"--calibration-percentile applies only with --calibration-method percentile, not "
                f"{args.calibration_method}")
    if args.max_accuracy_drop is not None and not (args.int8 or args.fp16):
        return "--max-accuracy-drop applies only with --int8 or --fp16"
    if args.max_decision_changes is not None and not (args.int8 or args.fp16):
        return "--max-decision-changes applies only with --int8 or --fp16"
    # (not given: the defaults, which are in range)
    if args.max_accuracy_drop is not None and not 0 <= args.max_accuracy_drop < float("inf"):
        # nan too: it would pass every copy
        return f"--max-accuracy-drop must be a number >= 0 of percentage points, got {args.max_accuracy_drop}"
    if args.max_decision_changes is not None and not 0 <= args.max_decision_changes <= 100:  # nan too
        return (f"--max-decision-changes must be a percentage of the check images (0 to 100), got "
                f"{args.max_decision_changes}")
    return None


def _export_options(args: argparse.Namespace) -> ExportOptions:
    """The parsed options as :class:`ExportOptions`, with the defaults of those not given."""
    return ExportOptions(
        opset=args.opset, parity_images=args.parity_images, data_root=args.data,
        normalize_in_graph=args.normalize_in_graph, overwrite=args.overwrite,
        int8=args.int8, calibration_dir=args.calibration_dir, fp16=args.fp16,
        max_accuracy_drop=DEFAULT_MAX_ACCURACY_DROP if args.max_accuracy_drop is None else args.max_accuracy_drop,
        max_decision_changes=(DEFAULT_MAX_DECISION_CHANGES if args.max_decision_changes is None
                              else args.max_decision_changes),
        threads=args.threads, unfamiliar=args.unfamiliar,
        int8_config=Int8Config(
            method=args.calibration_method or Int8Config.method,
            percentile=Int8Config.percentile if args.calibration_percentile is None else args.calibration_percentile,
            calibration_images=args.calibration_images or DEFAULT_CALIBRATION_IMAGES,
            keep_float=args.keep_float or Int8Config.keep_float),
    )


if __name__ == "__main__":
    sys.exit(main())
