"""Backbone compatibility sweep: one small timm model per family through every user-facing path.

For each family (random init, 64 px, a few synthetic images per class) it runs, in-process
through ``vision_tl.cli.main``:

* ``fit`` in ``frozen`` (weights from a local ``.safetensors``), ``partial`` (from a ``.pth``)
  and ``full`` (``--model.pretrained false``) mode, one epoch; and ``frozen`` at 100 px, which
  windowed models cannot run (they must refuse it in one line, naming sizes that work);
* ``extract`` (pooled, and the last two ``feature_info`` stages + pooled) and ``probe``;
* ``export`` of the partial run (with its parity check) and ``predict-onnx`` of the export;
* ``explain`` (Grad-CAM; the heat map must not be constant) and ``report``.

Each family runs in its own process; a step's result is ``ok``, ``error: <the one line the
command printed>`` (a refusal: read it to judge whether it is clear) or ``crash: <exception>``
(a traceback escaped the command). Writes ``benchmarks/COMPATIBILITY.md`` (a table) and a JSON
file with every message::

    python benchmarks/backbone_compat.py                       # all families, ~10-20 min on 2 cores
    python benchmarks/backbone_compat.py --family deit_tiny_patch16_224 --family swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = 64

# one small variant per family; the family name is what the table shows
FAMILIES = {
    "resnet": "resnet18",
    "convnext": "convnext_atto",
    "regnet": "regnetx_002",
    "mobilenetv3": "mobilenetv3_small_050",
    "efficientnet": "efficientnet_b0",
    "densenet": "densenet121",
    "ghostnet": "ghostnet_050",
    "vit/deit": "deit_tiny_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
    "maxvit": "maxvit_rmlp_pico_rw_256",
    "coatnet": "coatnet_nano_rw_224",
    "levit": "levit_128s",
    "edgenext": "edgenext_xx_small",
    "repvit": "repvit_m0_9",
    "fastvit": "fastvit_t8",
    "mobilevit": "mobilevitv2_050",
    "efficientvit": "efficientvit_b0",
}
STEPS = ("weights", "fit frozen", "fit partial", "fit full", "fit 100 px", "extract", "extract stages", "probe",
         "export", "predict-onnx", "explain", "report")


def _cli(argv: list[str]) -> tuple[str, str]:
    """Run ``vision-tl ARGV`` in this process: ``(status, the last lines it printed)``."""
    from vision_tl.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            rc = main(argv)
    except Exception as exc:  # noqa: BLE001 - a traceback that escaped the command is the finding
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return "crash", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} " \
                        f"(at {where})"
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    if rc == 0:
        return "ok", ""
    errors = [line for line in lines if line.startswith("error")]
    return "error", (errors[-1] if errors else (lines[-1] if lines else f"exit {rc}"))


def _trainable_share(ckpt: Path) -> str:
    """Share of backbone parameters a run's mode trains (partial: should be well under 1)."""
    from vision_tl.backbones import backbone_stages
    from vision_tl.tasks.checkpoint import load_classifier

    model, _ = load_classifier(ckpt)
    backbone = model.net.backbone
    stages = backbone_stages(backbone)
    total = sum(p.numel() for p in backbone.parameters())
    last = {id(p) for stage in stages[-2:] for m in stage for p in m.parameters()}
    share = sum(p.numel() for p in backbone.parameters() if id(p) in last) / total
    return f"{len(stages)} stages, last 2 = {share:.0%} of params"


def _cam_check(ckpt: Path, images: list[Path]) -> tuple[float, float]:
    """``(smallest max - min of the Grad-CAM maps, gradient reaching the explained layer)``. A
    random-init model may give a flat map (every weighted channel negative); no gradient at the
    layer means the map can never say anything."""
    import torch

    from vision_tl.data.transforms import eval_transform
    from vision_tl.imaging import load_rgb
    from vision_tl.reports.explain import explain_images, target_layer
    from vision_tl.tasks.checkpoint import load_classifier

    model, _ = load_classifier(ckpt)
    spread = min(float(e.cam.max() - e.cam.min()) for e in explain_images(model, images))
    net = model.net.eval()
    layer = target_layer(net.backbone, tuple(model.preprocessing.input_size))
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        x = eval_transform(model.preprocessing)(load_rgb(images[0]))[None].requires_grad_(True)
        logits = net(x)
        (grad,) = torch.autograd.grad(logits[0].max(), seen[-1])
    finally:
        handle.remove()
    return spread, float(grad.abs().sum())


def run_family(name: str, data: Path, work: Path) -> dict:
    """Every path for one backbone; returns {step: [status, message]} plus notes."""
    import torch
    from safetensors.torch import save_file

    from vision_tl.backbones import create_backbone

    results: dict[str, list] = {}
    notes: list[str] = []
    work.mkdir(parents=True, exist_ok=True)
    runs = work / "runs"

    def step(key: str, argv: list[str]) -> bool:
        start = time.perf_counter()
        status, message = _cli(argv)
        results[key] = [status, message, round(time.perf_counter() - start, 1)]
        print(f"  {name:32s} {key:15s} {status} {message[:160]}", flush=True)
        (work / "result.json").write_text(json.dumps({"results": results, "notes": notes}))  # a crash keeps these
        return status == "ok"

    try:
        net = create_backbone(name, pretrained=False, img_size=SIZE)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(work / "w.safetensors"))
        torch.save(state, work / "w.pth")
        results["weights"] = ["ok", "", 0.0]
    except Exception as exc:  # noqa: BLE001
        results["weights"] = ["crash", f"{type(exc).__name__}: {exc}", 0.0]
        return {"results": results, "notes": notes}

    common = ["--data.root", str(data), "--data.num_workers", "0", "--data.batch_size", "8",
              "--model.backbone", name, "--model.image_size", str(SIZE), "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs)]
    sources = {"frozen": ["--model.weights", str(work / "w.safetensors")],
               "partial": ["--model.weights", str(work / "w.pth")],
               "full": ["--model.pretrained", "false"]}
    for mode, source in sources.items():
        step(f"fit {mode}", ["fit", "--config", str(REPO / "configs" / f"{mode}.yaml"), *common, *source])
    # a size that is no multiple of 32: windowed and bias-table models must refuse it with sizes that work
    odd = [a if a != str(SIZE) else "100" for a in common]
    step("fit 100 px", ["fit", "--config", str(REPO / "configs" / "frozen.yaml"), *odd, "--model.pretrained", "false"])
    ckpts = sorted(runs.glob("partial/version_*/checkpoints/best.ckpt"))
    if ckpts:
        with contextlib.suppress(Exception):
            notes.append(f"partial: {_trainable_share(ckpts[0])}")

    feature = ["--backbone", name, "--image-size", str(SIZE), "--device", "cpu", "--no-progress",
               "--cache-dir", str(work / "cache")]
    step("extract", ["extract", str(data), *feature, "--weights", str(work / "w.pth"), "--out", str(work / "e.npz")])
    n = len(net.feature_info)
    step("extract stages", ["extract", str(data), *feature, "--random-init", "--stages", f"{n - 2},{n - 1},pooled",
                            "--out", str(work / "s.npz")])
    step("probe", ["probe", str(data), *feature, "--random-init", "--folds", "2", "--heads", "logreg"])

    if not ckpts:
        for key in ("export", "predict-onnx", "explain", "report"):
            results[key] = ["skipped", "no partial run", 0.0]
        return {"results": results, "notes": notes}
    ckpt, onnx = ckpts[0], work / "model.onnx"
    if step("export", ["export", str(ckpt), "--out", str(onnx)]):
        step("predict-onnx", ["predict-onnx", str(onnx), str(data), "--out", str(work / "pred.csv")])
    else:
        results["predict-onnx"] = ["skipped", "no export", 0.0]
    images = sorted(data.glob("scratch/*.png"))[:2]
    if step("explain", ["explain", str(ckpt), *map(str, images), "--out", str(work / "explain")]):
        try:
            spread, grad = _cam_check(ckpt, images)
        except Exception as exc:  # noqa: BLE001 - the check itself failing is a note, not a result
            spread, grad = float("nan"), float("nan")
            notes.append(f"Grad-CAM check failed: {type(exc).__name__}: {exc}")
        notes.append(f"Grad-CAM: heat map spread {spread:.2f}, gradient at its layer {grad:.1e}")
        if grad == 0:
            results["explain"] = ["error", "no gradient reaches the explained layer: the heat map is blank",
                                  results["explain"][2]]
    step("report", ["report", str(ckpt.parents[1])])
    return {"results": results, "notes": notes}


CELL = {"ok": "ok", "error": "refused", "crash": "CRASH", "skipped": "-"}


def write_table(found: dict[str, dict], path: Path, seconds: float) -> None:
    import onnxruntime
    import timm
    import torch

    head = "| family | model | " + " | ".join(STEPS) + " |"
    lines = ["# Backbone compatibility", "",
             f"`python benchmarks/backbone_compat.py`: each family's small variant, random init, {SIZE} px, "
             f"one epoch on a few synthetic images per class ({seconds / 60:.0f} min on 2 CPU cores; timm "
             f"{timm.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}). "
             "`refused` is a one-line error (listed below), `CRASH` a traceback. A Grad-CAM spread of 0 is a "
             "blank map: on these random weights the weighted channels can sum below 0 everywhere, which "
             "Grad-CAM's ReLU cuts (a gradient of 0 at the layer would be the failure).", "",
             head, "|" + " --- |" * (len(STEPS) + 2)]
    details = []
    for family, model in FAMILIES.items():
        if model not in found:
            continue
        res = found[model]["results"]
        cells = [CELL.get(res.get(s, ["-"])[0], "-") for s in STEPS]
        lines.append(f"| {family} | `{model}` | " + " | ".join(cells) + " |")
        for s in STEPS:
            if res.get(s, ["ok"])[0] in ("error", "crash"):
                details.append(f"- `{model}` {s}: {res[s][1]}")
        details += [f"- `{model}`: {note}" for note in found[model]["notes"]]
    path.write_text("\n".join(lines + ["", "Notes and messages:", "", *details, ""]), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", help="timm model name (repeatable; default: all)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--table", type=Path, default=REPO / "benchmarks" / "COMPATIBILITY.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one model
    args = parser.parse_args()
    if args.one:
        result = run_family(args.one, args.work / "data", args.work / args.one)
        (args.work / args.one / "result.json").write_text(json.dumps(result))
        return
    models = args.family or list(FAMILIES.values())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        from vision_tl.data.synthetic import make_inspection_dataset

        make_inspection_dataset(work / "data", 8, size=SIZE, seed=0, overwrite=True)
        start, found = time.perf_counter(), {}
        for model in models:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--one", model, "--work", str(work)], check=False,
                           env={**__import__("os").environ, "VISION_TL_CACHE": str(work / "cache")})
            result = work / model / "result.json"
            found[model] = (json.loads(result.read_text()) if result.is_file()
                            else {"results": {"weights": ["crash", "child process died", 0.0]}, "notes": []})
            print(f"{model}: {time.perf_counter() - t0:.0f} s", flush=True)
        seconds = time.perf_counter() - start
        (work / "compat.json").write_text(json.dumps(found, indent=1))
        if args.family is None:
            write_table(found, args.table, seconds)
        print(json.dumps({m: {s: r[0] for s, r in v["results"].items()} for m, v in found.items()}, indent=1))
        print(f"total {seconds:.0f} s")


if __name__ == "__main__":
    main()
