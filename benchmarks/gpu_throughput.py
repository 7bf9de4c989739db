"""GPU training throughput: the kit's ``fit`` vs the plain-loop upper bound, in one run.

1. Prepares (on the CPU, in parallel) a folder of >= 10,000 synthetic 224 px JPEGs with
   the demo generator, unless it exists.
2. Measures the plain PyTorch upper bound on the GPU: bf16 autocast, channels_last,
   batch 256, tensors already on the device -- training for ``partial`` and ``full``,
   inference for ``frozen``.
3. Runs the kit's ``fit`` (device pipeline: decoded-image cache, pixels kept on the GPU,
   on-device augmentation, bf16-mixed, channels_last) per mode and reports steady-state
   images/s (epochs after the first, which fills the decoded cache), the ratio to the
   bound, peak GPU memory and the CPU's waits for the GPU per training step; ``partial``
   once more through loader processes (``--data.pixels_on_device false``); ``frozen``
   once more with its feature cache, as the recipe runs by default (whole fit); then
   ``vision-tl extract`` over the JPEGs (bf16, no feature cache; a new process, as a user
   runs it) against the inference bound, and its engine in steady state (after its first
   batches); both again with ``--decode device`` (JPEGs decoded by nvJPEG on the GPU).
4. Appends the table, with the device name and this command, to benchmarks/RESULTS.md. A check
   or row that fails, and the time limit (SIGTERM, e.g. from ``timeout``), are listed under the
   table; the rows measured before and after them are kept. The time limit may come in any phase
   (preparing the JPEGs, the checks, the bounds, between the rounds of a row): the table is written
   with what was measured until then, and says in which phase it stopped.

Must finish in under 5 minutes on an H100/H200. Smoke-test on a CPU with
``--device cpu --images 256 --size 64 --batch 32 --backbone test_efficientnet [--pipeline device]``.

    python benchmarks/gpu_throughput.py                      # on a GPU machine
    python benchmarks/gpu_throughput.py --compile            # the kit's fit with torch.compile
    python benchmarks/gpu_throughput.py --modes frozen,extract   # only some rows (quicker)
    python benchmarks/gpu_throughput.py --modes partial,partial-variants   # partial's frozen stages graphed/unfolded
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _throughput import plain_inference_rate, plain_net, plain_train_rate  # noqa: E402

from vision_tl import imaging  # noqa: E402
from vision_tl.data.decode_threads import decode_in_processes  # noqa: E402
from vision_tl.data.device import default_decode_threads, default_num_workers  # noqa: E402
from vision_tl.data.device_decode import decoding_difference  # noqa: E402

RESULTS = Path(__file__).parent / "RESULTS.md"
# loaders: partial through loader processes; cached: frozen with its feature cache (the recipe's default)
# variants: frozen eager with BatchNorm folded (the default before CUDA graphs); partial-variants:
# partial with its frozen stages as one CUDA graph (opt-in) and with them unfolded
MODES = ("frozen", "partial", "full", "loaders", "cached", "extract", "variants", "partial-variants")
DEFAULT_MODES = MODES[:-2]  # all rows within the 5 minutes a GPU run may take; variants on request
CACHED = "frozen, feature cache (whole fit)"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROUNDS = 3  # alternating rounds of the extract steady-state rows


def _render(job: tuple[str, int, int, str]) -> None:
    from PIL import Image

    from vision_tl.data.synthetic import CLASSES, render_sample

    kind, index, size, folder = job
    rng = np.random.default_rng([CLASSES.index(kind), index])
    Image.fromarray(render_sample(kind, rng, size)).save(Path(folder) / kind / f"{kind}_{index:05d}.jpg", quality=90)


def prepare(root: Path, images: int, size: int) -> Path:
    from vision_tl.data.synthetic import CLASSES

    marker = root / f".ready_{images}_{size}"
    if marker.exists():
        return root
    per_class = images // len(CLASSES)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
    jobs = [(kind, i, size, str(root)) for kind in CLASSES for i in range(per_class)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        try:
            list(pool.map(_render, jobs, chunksize=64))
        except Stopped:  # the time limit: leaving the pool waits for the images being made, not the queued ones
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    marker.touch()
    print(f"prepared {len(jobs)} JPEGs at {size} px in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def checks(args, root: Path) -> None:
    """Before timing: the fast paths give the CPU paths' numbers (exits if not).

    A device-pipeline batch, copied on the side stream and normalised on the device, equals
    the CPU pipeline's; ``extract``'s embeddings on the device (several batches in flight)
    match the CPU's, allowing for TF32 convolutions.
    """
    import copy

    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.data import ImageFolderDataModule
    from vision_tl.features.extractor import FeatureExtractor, iter_embeddings

    device = torch.device(args.device)
    common = {"image_size": args.size, "batch_size": 64, "val_fraction": 0.05, "num_workers": 2}
    fast = ImageFolderDataModule(str(root), pipeline="device", decoded_cache=str(args.cache), **common)
    slow = ImageFolderDataModule(str(root), pipeline="cpu", **common)
    fast.setup("fit")
    slow.setup("fit")
    batch, (x_ref, y_ref) = next(iter(fast.val_dataloader())), next(iter(slow.val_dataloader()))
    x, y = fast.on_after_batch_transfer(fast.transfer_batch_to_device(batch, device, 0), 0)
    pixel_error = float((x.cpu() - x_ref).abs().max())
    if not torch.equal(y.cpu(), y_ref) or pixel_error > 1e-5:
        raise SystemExit(f"device pipeline differs from the CPU pipeline (max error {pixel_error:g})")
    resident = ImageFolderDataModule(str(root), pipeline="device", decoded_cache=str(args.cache),
                                     pixels_on_device=True, **common)
    resident.setup("fit")
    rows = next(iter(resident.val_dataloader()))
    x_rows, y_rows = resident.on_after_batch_transfer(resident.transfer_batch_to_device(rows, device, 0), 0)
    if not (torch.equal(x_rows, x) and torch.equal(y_rows, y)):
        raise SystemExit("batches gathered from the pixels on the device differ from the loader's")
    syncs = host_syncs(fast, batch, device) if args.device == "cuda" else []
    model = create_backbone(args.backbone, pretrained=args.backbone != "test_efficientnet").eval()
    pre = resolve_preprocessing(args.backbone, args.size)
    paths = sorted(root.rglob("*.jpg"))[:96]
    feats = {}
    on_device = copy.deepcopy(model).to(device)
    for name, net, decode in (("cpu", model, "cpu"), (args.device, on_device, "cpu"), ("decode", on_device, "device")):
        runs = iter_embeddings(FeatureExtractor(net, args.backbone, pre, decode=decode), paths, batch_size=32,
                               num_workers=2, device=device if name == "decode" else name, progress=False)
        feats[name] = np.concatenate([r.features for r in runs])
    cosine = {name: _min_cosine(feats["cpu"], feats[name]) for name in (args.device, "decode")}
    if any(len(f) != len(paths) for f in feats.values()) or cosine[args.device] < 0.999:
        raise SystemExit(f"extract on {args.device} differs from the CPU (min cosine {cosine[args.device]:.5f})")
    mean, largest = decoding_difference(device, (args.size, args.size))
    args.decode_check = (f"JPEGs decoded on the device (`--decode device`): pixels differ from Pillow's by {mean:.2f} "
                         f"on average (largest {largest}) on the check's JPEGs; embeddings of {len(paths)} images vs "
                         f"decoding on the CPU: min cosine {cosine['decode']:.5f}.")
    print(f"checks passed: device pipeline = CPU pipeline (max error {pixel_error:.1e}); "
          f"extract on {args.device} vs CPU: min cosine {cosine[args.device]:.6f}; "
          f"host waits in copy + augmentation: {len(syncs)} {syncs[:2]}\n{args.decode_check}", flush=True)
    modes = {m.strip() for m in args.modes.split(",")}
    graph_checks = [("check: frozen backbone as a CUDA graph", graph_check, (args,))]
    if modes & {"extract", "cached"}:
        graph_checks.append(("check: extract through CUDA graphs", extract_graph_check, (args, root)))
    if "partial-variants" in modes:
        graph_checks.append(("check: partial's frozen stages as one CUDA graph", partial_graph_check, (args,)))
    passed = []
    for what, fn, fn_args in graph_checks:  # kept as each passes: the time limit may come in the next
        passed.append(attempt(args, what, fn, *fn_args))
        args.graph_check = "; ".join(c for c in passed if c)
    print(args.graph_check, flush=True)


class Stopped(Exception):
    """The run's time limit came (SIGTERM from ``timeout``): what was measured is still reported.
    Raised by the SIGTERM handler :func:`main` installs, with the phase it came in (``args.phase``)."""


def attempt(args, what: str, fn, *fn_args):
    """``fn(*fn_args)``, or None where it fails: the failure (a check that finds other numbers, a
    ``fit`` that exits with an error) is printed and listed under the table, and the other rows
    are still measured. A GPU run is scarce; one failing row must not cost the rest. While it
    runs, ``what`` is the phase a time limit names."""
    import traceback

    outer, args.phase = args.phase, what
    try:
        return fn(*fn_args)
    except Stopped:
        raise
    except (Exception, SystemExit) as exc:  # (the checks and kit_rate exit with their reason)
        traceback.print_exc()
        args.problems.append(f"{what} failed: {str(exc).strip() or type(exc).__name__}")
        print(f"{what} FAILED: {exc}", flush=True)
        return None
    finally:
        args.phase = outer


def graph_check(args) -> str:
    """The frozen backbone replayed as a CUDA graph gives the eager backbone's logits: for two
    batch sizes, in fp32 and bf16, after weights changed in place and after weights replaced."""
    from vision_tl.tasks import ImageClassifier

    device = torch.device(args.device)
    model = ImageClassifier(["a", "b", "c", "d"], backbone=args.backbone, pretrained=args.backbone != "test_efficientnet",
                            image_size=args.size, mode="frozen", feature_cache=None, fold_batchnorm=False)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 3, args.size, args.size, generator=g).to(device) for n in (64, 7)]
    first = model.net.backbone.get_parameter(next(n for n, p in model.net.backbone.named_parameters() if p.ndim == 4))
    worst, rounds, recorded = 0.0, 0, 0
    for change in ("none", "in place", "replaced"):
        with torch.no_grad():
            if change == "in place":
                first.mul_(0.5)
            elif change == "replaced":
                first.data = first.data.clone() * 2.0  # other addresses; Lightning's weight averaging swaps so
                model._refold()
        for amp in (False, True):
            for x in xs:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    graphed = model(x).float()
                    graphs = model.__dict__.get("_graphed_backbone")
                    recorded = max(recorded, 0 if graphs is None else _recorded(graphs))
                    # eager through the network itself: model(x) with the switch off would free
                    # the recorded graphs, and the next round could not test their reuse
                    eager = model.net(x.contiguous(memory_format=torch.channels_last)).float()
                err = float((graphed - eager).abs().max() / eager.abs().max().clamp_min(1e-6))
                worst, rounds = max(worst, err), rounds + 1
                if err > (2e-2 if amp else 1e-3):
                    raise SystemExit(f"CUDA graph differs from eager ({change} weights, amp={amp}, batch {len(x)}): "
                                     f"relative error {err:.2e}")
    if device.type == "cuda" and not recorded:
        raise SystemExit("no CUDA graph was recorded for the frozen backbone")
    return (f"CUDA graph vs eager frozen backbone: largest relative logit difference {worst:.1e} over {rounds} "
            f"comparisons (fp32 and bf16, batches 64 and 7, weights as loaded, changed in place, replaced)")


def _recorded(graphs) -> int:
    """Graphs a :class:`GraphedInference` holds (a shape that failed to record holds None)."""
    return sum(v is not None for v in graphs._graphs.values())


def partial_graph_check(args, steps: int = 3) -> str:
    """``partial`` training steps with the frozen stages as one CUDA graph (``partial_cuda_graph``)
    give the logits and gradients of the same stages run eagerly (unfolded, as in the graph), in
    fp32 and bf16; the chain records on its second step."""
    from vision_tl.tasks import ImageClassifier

    device = torch.device(args.device)
    worst, rounds = 0.0, 0
    for amp in (False, True):
        models = {}
        for graph in (True, False):
            models[graph] = ImageClassifier(["a", "b", "c", "d"], backbone=args.backbone, image_size=args.size,
                                            pretrained=args.backbone != "test_efficientnet", mode="partial",
                                            dropout=0.0, partial_cuda_graph=graph, fold_batchnorm=False)
        models[False].load_state_dict(models[True].state_dict())
        g = torch.Generator().manual_seed(2)
        for _ in range(steps):
            x = torch.randn(32, 3, args.size, args.size, generator=g).to(device)
            out = {}
            for graph, model in models.items():
                model.to(device).train().zero_grad()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out[graph] = model(x).float()
                out[graph].sum().backward()
            err = float((out[True] - out[False]).abs().max() / out[False].abs().max().clamp_min(1e-6))
            grads = [(p.grad, q.grad) for p, q in zip(models[True].parameters(), models[False].parameters())
                     if p.requires_grad]
            err = max([err] + [float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in grads])
            worst, rounds = max(worst, err), rounds + 1
            if err > (2e-2 if amp else 1e-3):
                raise SystemExit(f"partial through the graphed chain differs from eager (amp={amp}): relative "
                                 f"error {err:.2e} in logits or gradients")
        chained = models[True].__dict__.get("_graphed_chain")
        if device.type == "cuda" and (chained is None or not _recorded(chained[2].graphs)):
            raise SystemExit("partial_cuda_graph recorded no CUDA graph")
    return (f"partial with its frozen stages as one CUDA graph vs eager: largest relative difference in logits "
            f"and gradients {worst:.1e} over {rounds} training steps (fp32 and bf16)")


def extract_graph_check(args, root: Path) -> str:
    """Extraction through CUDA graphs (normalisation and the backbone replayed per batch shape)
    gives the eager unfolded extractor's embeddings: real JPEGs, several batches and a smaller
    last one (which runs eagerly), fp32 and bf16, pooled and intermediate stages."""
    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.features.extractor import FeatureExtractor, iter_embeddings

    device = torch.device(args.device)
    model = create_backbone(args.backbone, pretrained=args.backbone != "test_efficientnet").to(device)
    pre = resolve_preprocessing(args.backbone, args.size)
    paths = sorted(root.rglob("*.jpg"))[:200]  # batches of 64, 64, 64 and 8
    worst, recorded = 0.0, 0
    for precision in ("32", "bf16"):
        feats = {}
        for graphs in (True, False):
            fx = FeatureExtractor(model, args.backbone, pre, "2,pooled", precision=precision, cuda_graphs=graphs,
                                  fold_batchnorm=False)
            rows = []
            for batch in iter_embeddings(fx, paths, 64, 2, device, progress=False):
                rows.append(batch.features)
                recorded = max(recorded, _recorded(fx._graphs))  # freed when the pass ends
            feats[graphs] = np.concatenate(rows)
        err = float(np.abs(feats[True] - feats[False]).max() / max(np.abs(feats[False]).max(), 1e-6))
        worst = max(worst, err)
        if err > (2e-2 if precision == "bf16" else 1e-3):
            raise SystemExit(f"extract through CUDA graphs differs from eager ({precision}): relative error {err:.2e}")
    if device.type == "cuda" and not recorded:
        raise SystemExit("extract recorded no CUDA graph")
    return (f"extract through CUDA graphs vs eager: largest relative difference {worst:.1e} "
            f"({len(paths)} JPEGs, fp32 and bf16, stage 2 + pooled)")


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).min())


def host_syncs(dm, batch, device: torch.device) -> list[str]:
    """Operations that make the CPU wait for the GPU while a training batch is copied and
    augmented (none expected): PyTorch's sync debug mode reports each one as a warning."""
    import warnings

    from vision_tl.data.batch_augment import BatchAugment

    augment = BatchAugment.from_preset("inspection", dm.preprocessing).to(device)
    augment(dm.transfer_batch_to_device(batch, device, 0)[0])  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            augment(dm.transfer_batch_to_device(batch, device, 0)[0])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [str(w.message).splitlines()[0] for w in caught]


def bounds(args, num_classes: int, out: dict[str, float]) -> None:
    """The plain-loop bounds (images/s) into ``out``, each as it is measured: those measured
    before a time limit are kept."""
    amp = torch.bfloat16 if args.device == "cuda" else None
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
          .contiguous(memory_format=torch.channels_last) for _ in range(4)]
    ys = [torch.randint(0, num_classes, (args.batch,), generator=g).to(args.device) for _ in range(4)]
    for mode in ("partial", "full"):
        net = plain_net(args.backbone, num_classes, mode, args.device, channels_last=True)
        out[mode] = plain_train_rate(net, list(zip(xs, ys)), args.steps, amp)
    net = plain_net(args.backbone, num_classes, "frozen", args.device, channels_last=True)
    out["frozen"] = plain_inference_rate(net, xs, args.steps, amp)


def kit_rate(args, root: Path, mode: str, extra: tuple[str, ...] = (),
             feature_cache: bool = False) -> tuple[float, float, dict]:
    """Steady-state training images/s of the user's ``vision-tl fit`` command, the peak GPU
    memory in GiB and where the CPU waited for the GPU (``SyncAudit``): the mode's recipe plus
    ``configs/gpu.yaml`` (on a GPU), run in this process with a throughput meter and the
    audit added to the trainer's callbacks.

    ``feature_cache`` (frozen): the recipe as users run it, with a new, empty feature cache;
    the backbone then runs once per image, and the rate is every epoch's images over the whole
    fit, the extraction included.

    Each fit runs in a new process, as users run it: CUDA graphs, caches and allocator state
    of an earlier fit cannot slow a later one (two H100 runs measured partial at 0.58-0.71
    after graphed fits in the same process, against 0.82 before)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, waits = Path(tmp) / "rate.json", Path(tmp) / "syncs.json"
        meter = {"class_path": "_throughput.ThroughputMeter",
                 "init_args": {"skip_epochs": 0 if feature_cache else 1, "out": str(out), "whole": feature_cache}}
        audit = {"class_path": "_throughput.SyncAudit", "init_args": {"out": str(waits)}}
        busy_out = Path(tmp) / "busy.json"
        busy = {"class_path": "_throughput.GpuBusy", "init_args": {"out": str(busy_out)}}
        argv = ["fit", "--config", str(CONFIGS / f"{mode}.yaml")]
        if args.device == "cuda":
            argv += ["--config", str(CONFIGS / "gpu.yaml"), "--data.pipeline", args.pipeline]
        else:
            argv += ["--trainer.accelerator", "cpu", "--data.pipeline", args.pipeline]
        # the whole-fit row times everything from setup on: no instrumentation inside it
        probes = () if feature_cache else (f"--trainer.callbacks+={json.dumps(audit)}",
                                           f"--trainer.callbacks+={json.dumps(busy)}")
        argv += ["--data.root", str(root), "--data.decoded_cache", str(args.cache), "--data.batch_size",
                 str(args.batch), "--data.val_fraction", "0.05", "--data.augment", "inspection",
                 "--model.backbone", args.backbone, "--model.image_size", str(args.size),
                 "--model.pretrained", str(args.backbone != "test_efficientnet").lower(),
                 # frozen without the feature cache: the backbone runs on every batch (the
                 # inference-bound path); with the cache (the default) later epochs cost ~nothing
                 "--model.feature_cache", str(Path(tmp) / "features") if feature_cache else "null",
                 "--trainer.max_epochs", str(args.epochs),
                 "--trainer.logger.init_args.save_dir", tmp, f"--trainer.callbacks+={json.dumps(meter)}", *probes,
                 *extra]
        if args.workers is not None:
            argv += ["--data.num_workers", str(args.workers)]
        if args.compile:  # compiling happens in the first epoch, which is not timed
            argv += ["--model.compile", "true"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-m", "vision_tl.cli", *argv], env=env)
        if done.returncode != 0:
            raise SystemExit(f"fit failed (exit {done.returncode}): vision-tl {' '.join(argv)}")
        result = json.loads(out.read_text())
        peak = result.get("peak_gib", float("nan"))
        syncs = json.loads(waits.read_text()) if waits.exists() else {}
        if busy_out.exists():  # rides along with the waits, for the report
            syncs["busy"] = json.loads(busy_out.read_text())
        return result["images_per_second"], peak, syncs


def waits_per_step(syncs: dict) -> str:
    if not syncs.get("sites") and not syncs.get("steps"):
        return "n/a"
    return f"{sum(syncs['sites'].values()) / max(1, syncs['steps']):.1f}"


def gpu_busy(syncs: dict) -> str:
    busy = (syncs or {}).get("busy") or {}
    return "n/a" if busy.get("busy") is None else f"{100 * busy['busy']:.0f} %"


def extract_rate(args, root: Path, decode: str = "cpu") -> tuple[float, float, float, float]:
    """``vision-tl extract`` over the JPEG folder in a fresh process, as a user runs it (decode
    on threads, uint8 to the device, bf16 on a GPU; no feature cache): images/s over the
    extraction (decoding start-up and first batches included; the model's loading and Python's
    imports not), the extraction's seconds, the seconds until its first batch's features were
    back, and the process's wall time in seconds."""
    import subprocess
    import tempfile

    from vision_tl.features.store import read_features

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "features.npz"
        argv = [sys.executable, "-m", "vision_tl.cli", "extract", str(root), "--backbone", args.backbone,
                "--out", str(out), "--batch-size", str(args.batch), "--image-size", str(args.size),
                "--device", args.device, "--precision", "bf16" if args.device == "cuda" else "32",
                "--no-cache", "--no-progress", "--decode", decode]
        if args.workers is not None:
            argv += ["--num-workers", str(args.workers)]
        if args.backbone == "test_efficientnet":
            argv.append("--random-init")
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"extract failed (exit {done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")
        meta = {k: float("nan") if v is None else v for k, v in read_features(out).metadata.items()}
        return (float(meta["images_per_second"]), float(meta.get("seconds", "nan")),
                float(meta.get("seconds_to_first_batch", "nan")), wall)


def extract_steady_rate(args, root: Path, skip: int = 3, decode: str = "cpu",
                        cuda_graphs: bool = True) -> tuple[float, float]:
    """images/s of extract's engine (``iter_embeddings``: workers, side-stream copy, one batch
    in flight, bf16) after its first ``skip`` batches, i.e. without starting the loader
    processes and the GPU's first-shape warm-up, which dominate a 10,000-image run that
    ideally takes half a second; and the peak GPU memory in GiB."""
    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.features.extractor import FeatureExtractor, iter_embeddings

    device = torch.device(args.device)
    model = create_backbone(args.backbone, pretrained=args.backbone != "test_efficientnet").to(device)
    fx = FeatureExtractor(model, args.backbone, resolve_preprocessing(args.backbone, args.size),
                          precision="bf16" if args.device == "cuda" else "32", decode=decode, cuda_graphs=cuda_graphs)
    paths = sorted(root.rglob("*.jpg"))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, images = 0.0, 0
    for k, batch in enumerate(iter_embeddings(fx, paths, args.batch, args.workers, device, progress=False)):
        if k == skip - 1:
            start = time.perf_counter()
        elif k >= skip:  # the batches yielded after the clock started
            images += len(batch.positions)
    rate = images / (time.perf_counter() - start) if images else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return rate, peak


def augment_ms(args, reps: int = 20) -> float:
    """Milliseconds per batch of the ``inspection`` batch augmentation (with normalisation) on a
    uint8 channels-last batch on the device, the work the kit adds to each training step: on a
    GPU, ``reps`` calls queued back to back between two events (one call alone would time
    mostly the CPU issuing it, which in training overlaps the previous step); on a CPU, the
    median of ``reps`` calls."""
    from vision_tl.backbones import resolve_preprocessing
    from vision_tl.data.batch_augment import BatchAugment

    device = torch.device(args.device)
    augment = BatchAugment.from_preset("inspection", resolve_preprocessing(args.backbone, args.size)).to(device)
    x = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0)).to(device).permute(0, 3, 1, 2)
    for _ in range(3):  # warm-up left out
        augment(x)
    if args.device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        for _ in range(reps):
            augment(x)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / reps
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        augment(x)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def measure_extract(args, root: Path, bound: dict[str, float], kit: dict) -> None:
    """The extract rows: ``vision-tl extract`` in a new process (and how long a new process takes
    to import the kit and start the device), its engine in steady state with simplejpeg, eager
    and with Pillow decoding (median of :data:`ROUNDS` alternating runs each), and with ``--decode device``."""
    for decode, label in (("cpu", "extract"), ("device", "extract --decode device")):
        measured = attempt(args, f"vision-tl {label}", extract_rate, args, root, decode)
        if measured is None:
            continue
        rate, seconds, first, wall = measured
        # its GPU memory: another process's; its timings go with the row, for the report
        kit[f"{label} (vision-tl extract, new process)"] = (rate, float("nan"), {"times": (seconds, first, wall)})
        print(f"{label}: {rate:,.0f} img/s (ratio {rate / bound['frozen']:.2f}) over {seconds:.2f} s of extraction, "
              f"the first batch's features back after {first:.2f} s; the process took {wall:.1f} s", flush=True)
        steady = attempt(args, f"{label}, steady state", extract_steady_rate, args, root, 3, decode) \
            if decode == "device" else None
        if steady is not None:
            kit[f"{label}, steady state"] = (*steady, {})
            print(f"{label}, steady state: {steady[0]:,.0f} img/s", flush=True)
    # CPU decoding in steady state: the default (CUDA graph), eager (the backbone's kernels
    # launched one by one, BatchNorm folded: the path before graphs) and Pillow decoding,
    # alternating (the first of a set ran slower in an earlier run): the median of ROUNDS of each
    variants = {"extract, steady state": (None, True),
                "extract, steady state, eager (BatchNorm folded, no CUDA graph)": (None, False)}
    if jpeg_decoder() != "Pillow":
        variants["extract, steady state, Pillow decoding"] = (False, True)
    rates: dict[str, list] = {label: [] for label in variants}
    try:
        for _ in range(ROUNDS):
            for label, (fast_jpeg, graphs) in variants.items():
                imaging._fast_jpeg = fast_jpeg  # loaders inherit this process's choice
                rate = attempt(args, label, extract_steady_rate, args, root, 3, "cpu", graphs)
                if rate is not None:
                    rates[label].append(rate)
    finally:  # the time limit too: the rounds measured before it are rows
        imaging._fast_jpeg = None
        for label, runs in rates.items():
            if not runs:
                continue
            kit[label] = (float(np.median([r for r, _ in runs])), max(peak for _, peak in runs), {})
            print(f"{label}: {kit[label][0]:,.0f} img/s (median of {len(runs)}: "
                  f"{', '.join(f'{r:,.0f}' for r, _ in runs)})", flush=True)
    start_up = attempt(args, "a new process's start-up", process_start_seconds, args)
    if start_up is not None:
        args.start_up = start_up
        print(f"a new process that imports the kit and starts {args.device}: {start_up:.1f} s", flush=True)


def process_start_seconds(args) -> float:
    """Seconds a new Python process takes to import what ``vision-tl extract`` imports and to
    start the device (CUDA's context): the part of extract's wall time before any of its work."""
    import subprocess

    code = ("import torch, timm, vision_tl.features.api, vision_tl.cli; "
            f"torch.zeros(1, device={args.device!r}).sum().item()")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def jpeg_decoder() -> str:
    """Which decoder ``load_rgb`` uses for JPEGs in this process."""
    module = imaging.fast_jpeg_decoder()
    return f"simplejpeg {module.__version__} (bit-exact with Pillow)" if module is not None else "Pillow"


def report(args, device_name: str, bound: dict[str, float], kit: dict[str, tuple[float, float, dict]],
           augment: float | None) -> str:
    lines = [f"### GPU pipeline throughput ({device_name})", "",
             f"`python benchmarks/gpu_throughput.py --images {args.images} --batch {args.batch} "
             f"--epochs {args.epochs}{' --compile' if args.compile else ''}"
             f"{'' if args.modes == ','.join(DEFAULT_MODES) else ' --modes ' + args.modes}` — {args.backbone}, {args.size} px, "
             f"batch {args.batch}, bf16, channels_last{'; the kit with torch.compile, the bound eager' if args.compile else ''}.",
             "",
             "| mode | plain-loop bound (img/s) | kit (img/s) | ratio | peak GPU memory (GiB) | CPU waits for the GPU per step "
             "| GPU busy in steps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, (rate, peak, syncs) in kit.items():
        kind = "inference" if mode.startswith(("frozen", "extract")) else "train"
        bound_rate = bound["frozen" if mode.startswith("extract") else mode.split(",")[0]]
        lines.append(f"| {mode} | {bound_rate:,.0f} ({kind}) | {rate:,.0f} | {rate / bound_rate:.2f} | {peak:.1f} "
                     f"| {waits_per_step(syncs)} | {gpu_busy(syncs)} |")
    workers = args.workers if args.workers is not None else default_num_workers(gpu=args.device == "cuda")
    threads = args.workers if args.workers is not None else default_decode_threads()
    decoders = "loader processes" if decode_in_processes(threads) else "threads"
    lines += ["", f"JPEG decoding: {jpeg_decoder()}; {workers} loader processes (fit), {threads} decoding {decoders} "
              "(extract, the decoded cache's build)."]
    if augment is not None:  # (measured after the bounds)
        lines += ["", f"Augmentation (inspection preset, normalisation included) on the device: {augment:.2f} ms per "
                  f"batch of {args.batch}, against {1000 * args.batch / bound['frozen']:.1f} ms for the frozen "
                  "bound's inference step."]
    shown = {"frozen" if mode.startswith("extract") else mode.split(",")[0] for mode in kit}
    alone = [f"{mode} {rate:,.0f} ({'inference' if mode == 'frozen' else 'train'})"
             for mode, rate in bound.items() if mode not in shown]
    if alone:  # rows not asked for (--modes), or the time limit came before them
        lines += ["", "Plain-loop bounds without a row above (img/s): " + ", ".join(alone) + "."]
    if CACHED in kit:
        lines += ["", f"`{CACHED}`: `configs/frozen.yaml` as users run it, with its feature cache (new and empty): "
                  f"every epoch's training images ({args.epochs} epochs) over the whole fit, from setup to the end "
                  "of training, with the one extraction pass and the validation passes included. Its bound, one "
                  "inference pass per image and epoch, is what the backbone would cost without the cache."]
    for mode, (_, _, syncs) in kit.items():
        if "times" not in (syncs or {}):
            continue
        seconds, first, wall = syncs["times"]
        lines += ["", f"`vision-tl {mode.split(' (')[0]}`: {seconds:.2f} s of extraction, of which {first:.2f} s until "
                  f"the first batch's features were back (decoding start-up, GPU warm-up); {wall:.1f} s for the "
                  "whole process" + (f", of which {args.start_up:.1f} s for a new process to import the kit and "
                                     "start the device." if getattr(args, "start_up", None) else ".")]
    for check in ("graph_check", "decode_check"):
        if getattr(args, check, None):
            lines += ["", getattr(args, check)]
    for mode, (_, _, syncs) in kit.items():
        busy = (syncs or {}).get("busy")
        if busy:
            top = "; ".join(f"{name} {ms:.2f}" for name, ms in busy["top"])
            lines += ["", f"{mode}: {busy['wall_ms_per_step']:.1f} ms per profiled step; most device time "
                          f"(ms per step): {top}"]
    sites = {site: n for _, _, syncs in kit.values() for site, n in (syncs or {}).get("sites", {}).items()}
    if sites:
        lines += ["", "Where the CPU waited: " + "; ".join(f"{site} ({n}x)" for site, n in sites.items())]
    if getattr(args, "problems", None):  # after a failed check, the rows above are of a path that errs
        lines += ["", "**Not as planned** (the log has the tracebacks):", ""] + [f"- {p}" for p in args.problems]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/vision_tl_gpu_bench"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vision_tl_gpu_bench_decoded"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of the plain-loop bound")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes (default: the kit's choice from the machine's cores)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pipeline", choices=("device", "cpu"), default=None,
                        help="the kit's input pipeline (default: device on a GPU, cpu otherwise)")
    parser.add_argument("--compile", action="store_true",
                        help="the kit's fit runs with --model.compile true (the plain-loop bound stays eager)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated rows to measure, of {','.join(MODES)} (default: all but the two variants)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}; got {args.modes!r}")
    args.pipeline = args.pipeline or ("device" if args.device == "cuda" else "cpu")
    args.problems, args.phase = [], "start-up"

    def stop(signum, frame):
        del signum, frame
        if args.phase is not None:  # None: measuring is over, the table is being written (milliseconds)
            raise Stopped(f"stopped by the time limit during {args.phase}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        measure(args, modes)
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure(args, modes: list[str]) -> None:
    """Everything after parsing: data, checks, bounds, the kit's rows, the table. The time limit
    may come in any of them: the table then holds what was measured before it."""
    start = time.perf_counter()
    bound: dict[str, float] = {}
    kit: dict[str, tuple[float, float, dict]] = {}
    augment = None
    try:
        args.phase = "prepare"  # (the synthetic JPEGs)
        root = prepare(args.data, args.images, args.size)
        attempt(args, "checks", checks, args, root)
        args.phase = "bounds"
        torch.backends.cudnn.benchmark = True  # the bound at its best; the kit's fit sets it from configs/gpu.yaml
        bounds(args, 4, bound)
        torch.backends.cudnn.benchmark = False  # what a new process starts with
        print("plain-loop bounds:", {k: round(v) for k, v in bound.items()}, flush=True)
        args.phase = "the kit's rows"
        augment = measure_kit(args, root, modes, bound, kit)
    except Stopped as stopped:
        args.phase = None  # (a second SIGTERM must not cost the table either)
        args.problems.append(f"{stopped} (SIGTERM, {time.perf_counter() - start:.0f} s in): rows missing above were "
                             "not measured")
        print(args.problems[-1], flush=True)
    args.phase = None  # from here on a SIGTERM waits for the table
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    table = report(args, name, bound, kit, augment)
    print("\n" + table + f"\ntotal {time.perf_counter() - start:.0f} s")
    if not args.no_write and args.device == "cuda":
        with open(RESULTS, "a", encoding="utf-8") as fh:
            fh.write("\n" + table)


def measure_kit(args, root: Path, modes: list[str], bound: dict[str, float], kit: dict) -> float | None:
    """The kit's rows into ``kit``, each as it is measured; returns the augmentation's ms per batch
    (None where it failed)."""
    runs = [(mode, mode, ()) for mode in ("frozen", "partial", "full") if mode in modes]
    if args.pipeline == "device" and "loaders" in modes:
        runs.append(("partial, loader processes", "partial", ("--data.pixels_on_device", "false")))
    if "variants" in modes and args.device == "cuda":
        # the default before CUDA graphs, measured beside the new one
        runs.append(("frozen, eager, BatchNorm folded", "frozen", ("--model.cuda_graphs", "false")))
    if "partial-variants" in modes and args.device == "cuda":
        # partial's frozen stem and stages as one CUDA graph (opt-in), and unfolded eagerly
        runs.append(("partial, frozen stages as one CUDA graph", "partial", ("--model.partial_cuda_graph", "true")))
        runs.append(("partial, frozen stages unfolded", "partial", ("--model.fold_batchnorm", "false")))
    if "cached" in modes:
        runs.append((CACHED, "frozen", ()))
    for label, mode, extra in runs:
        measured = attempt(args, f"kit {label}", kit_rate, args, root, mode, extra, label == CACHED)
        if measured is None:
            continue
        kit[label] = measured
        print(f"kit {label}: {kit[label][0]:,.0f} img/s (ratio {kit[label][0] / bound[mode]:.2f}), "
              f"waits per step: {waits_per_step(kit[label][2])} {kit[label][2].get('sites', '')}, "
              f"GPU busy: {gpu_busy(kit[label][2])}", flush=True)
    torch.backends.cudnn.benchmark = False  # Lightning set it for fit; extract runs with the default
    if "extract" in modes:
        measure_extract(args, root, bound, kit)
    augment = attempt(args, "augmentation on the device", augment_ms, args)
    if augment is not None:
        print(f"augmentation on the device: {augment:.2f} ms per batch", flush=True)
    return augment


if __name__ == "__main__":
    main()
