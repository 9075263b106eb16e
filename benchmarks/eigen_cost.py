"""Cost of ``splitting_eigen`` against one training epoch, and fast-vs-exact agreement.

R = time(splitting_eigen over N samples, all splittable layers or those ``--layers`` names) /
time(one training epoch: forward, backward and SGD step over the same N samples), measured in one
process, alternated, median of ``--repeats`` runs. Agreement: the fraction of neurons whose λ_min
is within 2% of the layer's largest |λ| of the exact value. Peak memory: the resident-set growth
during one call (of each method, and of one training epoch), each in its own process where freed
memory goes back to the system at once (glibc: ``MALLOC_TRIM_THRESHOLD_=0``,
``MALLOC_MMAP_THRESHOLD_=65536``; the peak is reset through ``/proc/self/clear_refs`` before the
call); Linux only.

A method ``m-passes`` is ``m`` with ``cache=False``: a data pass per block of the fast route,
instead of iterating on the statistics kept from the first pass.

    .venv/bin/python benchmarks/eigen_cost.py              # MobileNet-style, width 32, N = 512
    .venv/bin/python benchmarks/eigen_cost.py --width 8 --samples 64 --repeats 1   # quick
    .venv/bin/python benchmarks/eigen_cost.py --methods exact --subsets 64,128  # subset estimates
    .venv/bin/python benchmarks/eigen_cost.py --model resnet20 --methods auto,fast  # residual units
    .venv/bin/python benchmarks/eigen_cost.py --model cnn --width 128 --image 16  # d = 1153
    python benchmarks/eigen_cost.py --device cuda   # on a GPU: CUDA-synchronised times, and the
                                                    # peak of torch's allocated CUDA memory

``exact@k`` rows: exact matrices from a random subset of k of the N samples; their R is still
against one training epoch over all N, and their agreement against exact over all N.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
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


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> float:
    """Peak growth in MB of the CUDA memory that torch allocated while ``fn`` ran."""
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _peak_growth(fn: Callable[[], object]) -> float:
    """Peak resident-set growth in MB while ``fn`` runs (NaN where it cannot be measured)."""
    before = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident set
    except OSError:
        return float("nan")
    fn()
    return _status_mb("VmHWM") - before


def _peak_in_subprocess(label: str) -> float:
    """:func:`_peak_growth` of ``label`` (a method or ``epoch``) in a fresh process."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = [sys.executable, __file__, *sys.argv[1:], "--peak-of", label]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
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
    p.add_argument(
        "--layers",
        default="",
        help="only these layers, e.g. features.0 (default every splittable layer); each call "
        "still runs the data pass over the whole network",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="splitting_eigen's micro_batch: each batch in slices of this many samples",
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"],
        help="where the model and data live; on cuda the peak is torch's allocated CUDA memory",
    )  # fmt: skip
    p.add_argument("--peak-of", default="", help=argparse.SUPPRESS)  # one measurement, internal
    # peaks measured in this process, as on CUDA (less exact on the CPU): for the tests
    p.add_argument("--peaks-in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model: nn.Module = MobileNetV1Style(args.width)
    shape = [3, args.image, args.image]
    if args.model == "resnet20":
        model = Architecture("resnet", list(MODELS["resnet"].default_widths), "relu", shape).build()
    elif args.model == "cnn":
        model = Architecture("cnn", [args.width] * 4, "relu", shape).build()
    model.to(device)
    x = torch.randn(args.samples, *shape).to(device)
    y = torch.randint(0, 10, (args.samples,)).to(device)
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
    layers = [k for k in args.layers.split(",") if k] or None
    order = torch.randperm(args.samples, generator=torch.Generator().manual_seed(1))
    results: dict[str, dict[str, splitgrow.SplitEigen]] = {}
    times: dict[str, list[float]] = {m: [] for m in ["epoch", *methods]}

    def run(label: str) -> None:
        method, _, size = label.partition("@")
        method, _, passes = method.partition("-")
        data = batches
        if size:  # exact on a random subset: R falls, and so may the agreement with all data
            pick = order[: int(size)].to(device)
            data = [(x[pick], y[pick])]
        results[label] = splitgrow.splitting_eigen(
            model,
            F.cross_entropy,
            data,
            method=method,
            cache=False if passes else None,
            micro_batch=args.micro_batch,
            layers=layers,
        )

    if args.peak_of:
        print(_peak_growth(epoch if args.peak_of == "epoch" else lambda: run(args.peak_of)))
        return
    if device.type == "cuda":  # warm-up: kernels chosen and compiled, allocator primed
        epoch()
        model.eval()
        for m in methods:
            run(m)
    for _ in range(args.repeats):
        times["epoch"].append(_timed(epoch, device))
        model.eval()
        for m in methods:
            times[m].append(_timed(lambda m=m: run(m), device))
    if device.type == "cuda" or args.peaks_in_process:
        measure: Callable[[Callable[[], object]], float] = (
            (lambda fn: _cuda_peak(fn, device)) if device.type == "cuda" else _peak_growth
        )
        # the epoch first: it trains, and the agreement below must compare results (these calls
        # overwrite them) with an exact reference on the same weights
        peaks = {"epoch": measure(epoch)}
        model.eval()
        peaks.update({m: measure(lambda m=m: run(m)) for m in methods})
    else:
        peaks = {m: _peak_in_subprocess(m) for m in ["epoch", *methods]}
    t_epoch = statistics.median(times["epoch"])
    m_epoch = peaks["epoch"]
    exact = results.get("exact") or splitgrow.splitting_eigen(
        model, F.cross_entropy, batches, layers=layers
    )
    exact = {k: dataclasses.replace(e, values=e.values.cpu()) for k, e in exact.items()}
    size = (
        "ResNet-20 (16/32/64)" if args.model == "resnet20" else f"{args.model}, width {args.width}"
    )
    size += f", {args.image}×{args.image} inputs"
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"# torch {torch.__version__}, {where}; {size}, N = {args.samples}, "
        f"batch {args.batch}"
        + (f" in slices of {args.micro_batch}" if args.micro_batch else "")
        + (f", layers {','.join(layers)}" if layers else "")
        + f", median of {args.repeats}"
    )
    print(f"one training epoch: {t_epoch:.3f} s, peak memory {m_epoch:.0f} MB")
    print(
        "| method | time s | R | within 2% | routes (per layer) | passes | columns (per layer) "
        "| peak MB | × epoch's |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        t = statistics.median(times[m])
        good = total = 0
        for layer, e in results[m].items():
            ref = exact[layer].values
            scale = float(ref.abs().max())
            good += int(((e.values.cpu() - ref).abs() <= 0.02 * scale).sum())
            total += ref.numel()
        routes = ",".join(sorted({e.route for e in results[m].values()}))
        passes = max(e.passes for e in results[m].values())
        columns = ",".join(
            f"{e.columns}" if e.method == "fast" else "exact" for e in results[m].values()
        )
        peak = peaks[m]
        print(
            f"| {m} | {t:.3f} | {t / t_epoch:.2f} | {good}/{total} | {routes} | {passes} "
            f"| {columns} | {peak:.0f} | {peak / m_epoch if m_epoch > 0 else math.nan:.1f} |"
        )


if __name__ == "__main__":
    main()
