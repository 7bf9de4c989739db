"""``vision-tl extract`` and ``vision-tl probe``: argparse front-ends over :mod:`vision_tl.features`.

``main(argv)`` receives the command name as ``argv[0]`` (``extract`` or ``probe``).
Bad input prints ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vision_tl.deploy.cli import input_size_arg, positive_int
from vision_tl.utils.files import path_arg

EXTRACT_EXAMPLES = """examples:
  vision-tl extract images/ --backbone tf_efficientnet_lite0 --out emb.parquet
  vision-tl extract images/ --backbone resnet50 --weights resnet50.safetensors --out r50.npz
  vision-tl extract images/ --backbone tf_efficientnet_lite0 --stages 3,4,pooled --out multi.npz

A killed or interrupted run resumes: images whose content hash is already in the
feature cache ($VISION_TL_CACHE or ~/.cache/vision_tl/features) are skipped.
"""

PROBE_EXAMPLES = """examples:
  vision-tl probe images/ --backbone tf_efficientnet_lite0 --backbone tf_efficientnet_lite2
  vision-tl probe images/ --backbone tf_efficientnet_lite0 --shots 1 5 10 --draws 10
  vision-tl probe images/ --backbone tf_efficientnet_lite0 --plot-dir runs/probe

Features come from the feature cache, so a second probe of the same folder takes seconds.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=path_arg, help="image folder: <class>/ sub-folders, train/ val/ splits, or flat")
    parser.add_argument("--stages", default="pooled",
                        help="'pooled' (default), stage numbers into the model's feature_info such as "
                             "'3,4', or both: '3,4,pooled' (each stage average-pooled, concatenated)")
    parser.add_argument("--image-size", type=input_size_arg, default=None, metavar="H,W",
                        help="input size: one int for a square, or H,W (default: the backbone's pretrained_cfg)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="images per forward pass (default: 8, about 1.1 GB peak on a CPU and no slower than 16)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image decoders (default: one per core but one, up to 16; every core on 1-2 cores): "
                             "threads, or loader processes on Linux machines of 8 cores or more")
    parser.add_argument("--cache-dir", type=path_arg, default=None,
                        help="feature cache (default $VISION_TL_CACHE or ~/.cache/vision_tl/features)")
    parser.add_argument("--random-init", action="store_true",
                        help="use randomly initialised backbones (no ImageNet weights; the same seeded "
                             "weights every run), on purpose")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser for ``extract`` or ``probe``."""
    fmt = argparse.RawDescriptionHelpFormatter
    if command == "extract":
        parser = argparse.ArgumentParser(
            prog="vision-tl extract", formatter_class=fmt, epilog=EXTRACT_EXAMPLES,
            description="Write one embedding per image (relative path, label, sha256, features) "
                        "to .npz or .parquet, with the backbone, weights identity and preprocessing.")
        _common(parser)
        parser.add_argument("--backbone", default="tf_efficientnet_lite0",
                            help="timm model name (default: %(default)s)")
        parser.add_argument("--weights", type=path_arg, default=None, help="local .safetensors/.pth backbone weights")
        parser.add_argument("--out", type=path_arg, required=True, help="output file, .npz or .parquet")
        parser.add_argument("--precision", choices=("32", "bf16"), default="32",
                            help="32 (default) or bf16 autocast, for GPUs (cached apart from fp32)")
        parser.add_argument("--decode", choices=("cpu", "device"), default="cpu",
                            help="where JPEGs are decoded: cpu (Pillow's pixels; default) or device "
                                 "(nvJPEG on the GPU, for folders the CPU's cores cannot decode fast enough; pixels "
                                 "differ from Pillow's by at most 3 levels on average, checked at the start; cached "
                                 "separately)")
        parser.add_argument("--no-cuda-graphs", action="store_true",
                            help="on a GPU, launch the backbone's kernels one by one instead of replaying them as a "
                                 "CUDA graph per batch shape (same embeddings; slower where the CPU is the limit)")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
        parser.add_argument("--no-cache", action="store_true",
                            help="keep nothing in the cache (partial shards live beside --out until done)")
        parser.add_argument("--unlabelled", action="store_true",
                            help="every image under ROOT at any depth, without labels: its sub-folders "
                                 "(dates, lines) are not classes")
        return parser
    parser = argparse.ArgumentParser(
        prog="vision-tl probe", formatter_class=fmt, epilog=PROBE_EXAMPLES,
        description="Cross-validate quick heads (logistic regression, k-NN) on frozen features of "
                    "each backbone and print accuracy ± std, balanced accuracy and extraction images/s.")
    _common(parser)
    parser.add_argument("--backbone", action="append", required=True, dest="backbones",
                        help="timm model name; repeat to compare several")
    parser.add_argument("--weights", type=path_arg, default=None, help="local weights (only with a single --backbone)")
    parser.add_argument("--heads", default="logreg,knn", help="comma list of logreg, knn, logreg-l2 (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="k of stratified k-fold, 0 skips it (default: %(default)s)")
    parser.add_argument("--shots", type=int, nargs="+", default=[],
                        help="few-shot: N training images per class, the rest test (several allowed)")
    parser.add_argument("--draws", type=int, default=10, help="random draws per few-shot setting (10)")
    parser.add_argument("--views", type=int, default=1,
                        help="cached views per image: 1 clean + K-1 augmented, used for training rows (default: %(default)s)")
    parser.add_argument("--augment", default="inspection", help="augmentation preset of extra views (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and draws, and of the weights with --random-init (default: %(default)s)")
    parser.add_argument("--plot-dir", type=path_arg, default=None, help="write pca_<backbone>.png scatters here")
    return parser


def _run_extract(args: argparse.Namespace) -> None:
    from vision_tl.caches.inventory import cache_note, default_root, entry_bytes
    from vision_tl.features.api import extract
    from vision_tl.utils import launcher_int

    cache = None if args.no_cache else Path(args.cache_dir).expanduser() if args.cache_dir else default_root("features")
    speaks = launcher_int("RANK") == 0  # under torchrun every rank gets here; rank 0 writes the file
    before = entry_bytes(cache) if cache is not None and speaks else None
    extract(args.root, args.backbone, args.out, weights=args.weights, pretrained=not args.random_init,
            stages=args.stages, image_size=args.image_size, batch_size=args.batch_size,
            num_workers=args.num_workers, cache_dir=args.cache_dir, use_cache=not args.no_cache,
            overwrite=args.overwrite, skip_bad=args.skip_bad, device=args.device, precision=args.precision,
            decode=args.decode, cuda_graphs=not args.no_cuda_graphs, progress=not args.no_progress,
            return_features=False, unlabelled=args.unlabelled)
    if speaks:
        print(f"vision_tl: wrote {args.out}")
        note = cache_note(cache, "features", before=before) if cache is not None else None
        if note:  # it grew: its size, and how to prune it
            print(f"vision_tl: {note}")


def _run_probe(args: argparse.Namespace) -> None:
    from vision_tl.features.probe import format_table, probe

    if args.weights is not None and len(args.backbones) != 1:
        raise ValueError("--weights applies to one backbone; pass a single --backbone with it")
    twice = sorted({b for b in args.backbones if args.backbones.count(b) > 1})
    if twice:
        raise ValueError(f"--backbone {', '.join(twice)} is given more than once; name each backbone once")
    results = probe(args.root, args.backbones, heads=[h.strip() for h in args.heads.split(",") if h.strip()],
                    folds=args.folds, shots=args.shots, draws=args.draws, seed=args.seed,
                    plot_dir=args.plot_dir, skip_bad=args.skip_bad, weights=args.weights,
                    pretrained=not args.random_init, stages=args.stages, image_size=args.image_size,
                    views=args.views, augment=args.augment, cache_dir=args.cache_dir,
                    batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                    progress=not args.no_progress)
    print(format_table(results, args.folds))
    if args.plot_dir:
        print(f"vision_tl: PCA scatters in {args.plot_dir}")


def main(argv: list[str] | None = None) -> int:
    """Run ``extract ...`` or ``probe ...`` (``argv[0]`` is the command name).

    Example:
        >>> main(["extract", "images/", "--backbone", "tf_efficientnet_lite0", "--out", "emb.npz"])
        0
    """
    from vision_tl.errors import user_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("extract", "probe"):
        print("usage: vision-tl {extract,probe} ... (vision-tl extract --help)", file=sys.stderr)
        return 2
    args = build_parser(argv[0]).parse_args(argv[1:])
    with user_errors():
        _run_extract(args) if argv[0] == "extract" else _run_probe(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
