"""Cost of ``splitting_eigen`` against one training epoch, and fast-vs-exact agreement.

R = time(splitting_eigen over N samples, all splittable layers) / time(one training epoch: forward,
backward and SGD step over the same N samples), measured in one process, alternated, median of
``--repeats`` runs. Agreement: the fraction of neurons whose λ_min is within 2% of the layer's
largest |λ| of the exact value. Peak memory: the largest resident-set growth during each call.

    .venv/bin/python benchmarks/eigen_cost.py              # MobileNet-style, width 32, N = 512
    .venv/bin/python benchmarks/eigen_cost.py --width 8 --samples 64 --repeats 1   # quick
    .venv/bin/python benchmarks/eigen_cost.py --methods exact --subsets 64,128  # subset estimates
    .venv/bin/python benchmarks/eigen_cost.py --model resnet20 --methods auto,fast  # residual units

``exact@k`` rows: exact matrices from a random subset of k of the N samples; their R is still
against one training epoch over all N, and their agreement against exact over all N.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import splitgrow
from splitgrow.models import MODELS, Architecture


class MobileNetV1Style(nn.Module):
    """A 3×3 conv then ``blocks`` depthwise-separable blocks, BatchNorm + ReLU, 10 classes."""

    def __init__(self, width: int = 32, blocks: int = 6, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        for i in range(blocks):
            stride = 2 if i in (1, 3) else 1
            layers += [
                nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=width),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        choices=["mobilenet", "cnn", "resnet20"],
        default="mobilenet",
        help="MobileNetV1-style (sized by --width), the registry's VGG-style cnn with four 3×3 "
        "convs of --width channels (d = 9·width: above 1000 from width 112), or ResNet-20",
    )
    p.add_argument("--image", type=int, default=32, help="input height and width")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="exact,fast,auto")
    p.add_argument(
        "--subsets", default="", help="also exact on random subsets of these sizes, e.g. 64,128"
    )
    args = p.parse_args()

    torch.manual_seed(0)
    model: nn.Module = MobileNetV1Style(args.width)
    shape = [3, args.image, args.image]
    if args.model == "resnet20":
        model = Architecture("resnet", list(MODELS["resnet"].default_widths), "relu", shape).build()
    elif args.model == "cnn":
        model = Architecture("cnn", [args.width] * 4, "relu", shape).build()
    x = torch.randn(args.samples, *shape)
    y = torch.randint(0, 10, (args.samples,))
    batches = [
        (x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, args.samples, args.batch)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def epoch() -> None:
        model.train()
        for xb, yb in batches:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()

    # a few epochs so that BatchNorm statistics and weights are those of a trained-ish model
    for _ in range(2):
        epoch()
    model.eval()
    methods = args.methods.split(",")
    subsets = [int(k) for k in args.subsets.split(",") if k]
    for k in subsets:
        methods.append(f"exact@{k}")
    order = torch.randperm(args.samples, generator=torch.Generator().manual_seed(1))
    results: dict[str, dict[str, splitgrow.SplitEigen]] = {}
    times: dict[str, list[float]] = {m: [] for m in ["epoch", *methods]}

    def run(label: str) -> None:
        method, _, size = label.partition("@")
        data = batches
        if size:  # exact on a random subset: R falls, and so may the agreement with all data
            pick = order[: int(size)]
            data = [(x[pick], y[pick])]
        results[label] = splitgrow.splitting_eigen(model, F.cross_entropy, data, method=method)

    for _ in range(args.repeats):
        times["epoch"].append(_timed(epoch))
        model.eval()
        for m in methods:
            times[m].append(_timed(lambda m=m: run(m)))
    t_epoch = statistics.median(times["epoch"])
    exact = results.get("exact") or splitgrow.splitting_eigen(model, F.cross_entropy, batches)
    size = (
        "ResNet-20 (16/32/64)" if args.model == "resnet20" else f"{args.model}, width {args.width}"
    )
    size += f", {args.image}×{args.image} inputs"
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; {size}, N = {args.samples}, "
        f"batch {args.batch}, median of {args.repeats}"
    )
    print(f"one training epoch: {t_epoch:.3f} s")
    print("| method | time s | R | within 2% | routes (per layer) | passes |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        t = statistics.median(times[m])
        good = total = 0
        for layer, e in results[m].items():
            ref = exact[layer].values
            scale = float(ref.abs().max())
            good += int(((e.values - ref).abs() <= 0.02 * scale).sum())
            total += ref.numel()
        routes = ",".join(sorted({e.route for e in results[m].values()}))
        passes = max(e.passes for e in results[m].values())
        print(f"| {m} | {t:.3f} | {t / t_epoch:.2f} | {good}/{total} | {routes} | {passes} |")
    print(f"peak RSS: {_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
