"""CPU: what channels-last memory format and BatchNorm folding buy, measured in one run.

EfficientNet-Lite0 (the default backbone) at 224 px, batch 32, torch's own thread count,
on the same random batches:

- inference, the forward that ``extract``, ``probe`` and a ``frozen`` fit run: NCHW (the
  kit before), channels-last, and channels-last with BatchNorm folded into the convolutions
  (``vision_tl.backbones.fold_batchnorm``, the kit now);
- a training step (forward, loss, backward, AdamW) in ``partial`` and ``full`` mode: NCHW
  (the kit on a CPU before) against channels-last (now).

Variants alternate within each round; the script prints each round and the medians of the
per-round ratios (this machine is noisy).

    python benchmarks/cpu_layout.py --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _throughput import plain_net  # noqa: E402

from vision_tl.backbones import create_backbone, fold_batchnorm  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"
CL = torch.channels_last


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call of a shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_variants(x: torch.Tensor) -> dict[str, callable]:
    net = create_backbone(BACKBONE, pretrained=False).eval().requires_grad_(False)
    cl = copy.deepcopy(net).to(memory_format=CL)
    folded = fold_batchnorm(cl, x[:2].contiguous(memory_format=CL))
    assert folded is not None, "Lite0's BatchNorm should fold"
    x_cl = x.contiguous(memory_format=CL)

    def run(model, inp):
        def go():
            with torch.inference_mode():
                model(inp)
        return go
    return {"NCHW": run(net, x), "channels-last": run(cl, x_cl), "channels-last + folded": run(folded, x_cl)}


def training_variants(mode: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, callable]:
    out = {}
    for name, layout in (("NCHW", None), ("channels-last", CL)):
        net = plain_net(BACKBONE, int(y.max()) + 1, mode, "cpu", channels_last=layout is not None).train()
        inp = x if layout is None else x.contiguous(memory_format=layout)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

        def step(net=net, inp=inp, opt=opt):
            loss = nn.functional.cross_entropy(net(inp), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[name] = step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant and round (median)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 6, (args.batch,), generator=g)
    groups = {"inference": inference_variants(x),
              "partial training step": training_variants("partial", x, y),
              "full training step": training_variants("full", x, y)}
    ratios: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for group, variants in groups.items():
            secs = {name: _seconds(fn, args.repeats) for name, fn in variants.items()}
            base = secs["NCHW"]
            line = []
            for name, s in secs.items():
                rates.setdefault((group, name), []).append(args.batch / s)
                ratios.setdefault((group, name), []).append(base / s)
                line.append(f"{name} {args.batch / s:.1f} img/s ({base / s:.2f}x)")
            print(f"round {r} {group}: " + ", ".join(line), flush=True)
    print(f"\n{BACKBONE}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} rounds:\n")
    print("| work | layout | img/s | speed-up over NCHW |\n|---|---|---|---|")
    for (group, name), values in ratios.items():
        print(f"| {group} | {name} | {statistics.median(rates[group, name]):.1f} | "
              f"**{statistics.median(values):.2f}x** |")


if __name__ == "__main__":
    main()
