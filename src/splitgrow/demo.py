"""``make demo``: splitting eigenvalues of a small CNN trained on scikit-learn's bundled digits.

Trains a small convolutional network (BatchNorm, ReLU) on the 8×8 digits for a few epochs, then
computes every neuron's splitting eigenpairs exactly and with the fast route, splits the most
splitting-unstable neurons, and checks the second-order prediction against the real loss change.
Everything runs offline on the CPU in well under a minute.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from tqdm.auto import tqdm

import splitgrow


class DigitsCNN(nn.Module):
    """conv → BN → ReLU → max-pool → conv → BN → ReLU → global average pool → Linear(→10)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def digits(batch: int = 128) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """Train and test batches of the bundled digits, standardised, fixed split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = (x[perm] - 0.3) / 0.4, y[perm]
    cut = 1400

    def batches(xs: Tensor, ys: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, len(ys), batch)]

    return batches(x[:cut], y[:cut]), batches(x[cut:], y[cut:])


def mean_loss(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in data)
    return total / sum(len(y) for _, y in data)


def main() -> None:
    torch.manual_seed(0)
    train, test = digits()
    model = DigitsCNN(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in tqdm(range(15), desc="training"):
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = sum(int((model(x).argmax(1) == y).sum()) for x, y in test) / sum(
            len(y) for _, y in test
        )
    print(f"\nDigitsCNN on scikit-learn digits: test accuracy {acc:.1%}\n")

    for name, info in splitgrow.analyze(model).layers.items():
        state = "splittable" if info.splittable else f"not splittable: {info.reason}"
        print(f"  {name:6s} {info.kind:7s} n={info.n:3d} d={info.d:3d}  {state}")

    t0 = time.perf_counter()
    exact = splitgrow.splitting_eigen(model, F.cross_entropy, train, which="both")
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = splitgrow.splitting_eigen(model, F.cross_entropy, train, which="both", method="fast")
    t_fast = time.perf_counter() - t0
    first = exact["conv1"]
    print(f"\nsplitting eigenvalues over {first.samples} samples ({first.surrogate})")
    print(f"exact {t_exact:.2f} s, fast {t_fast:.2f} s\n")
    print("layer   route        λ_min: min     median   #<0   λ_max: max   fast: max|Δλ_min|")
    for name, e in exact.items():
        assert e.max_values is not None
        diff = float((fast[name].values - e.values).abs().max())
        lo, med = float(e.values.min()), float(e.values.median())
        negative, hi = int((e.values < 0).sum()), float(e.max_values.max())
        row = f"{name:6s}  {e.route:11s}  {lo:11.3e} {med:10.3e} {negative:4d}   {hi:10.3e}"
        print(f"{row}   {diff:.1e}")

    # split the quarter most splitting-unstable neurons of each layer along their eigenvectors
    plan = {}
    for name, e in exact.items():
        k = max(1, e.values.numel() // 4)
        idx = torch.argsort(e.values)[:k]
        plan[name] = (idx, e.vectors[idx])
    base = mean_loss(model, train)
    same = splitgrow.split_neurons(model, plan, eps=0.0)
    print(f"\nsplit at ε = 0: training loss {base:.6f} → {mean_loss(same, train):.6f} (unchanged)")
    predicted = sum(float(exact[n].values[idx].sum()) for n, (idx, _) in plan.items())
    for eps in (0.1, 0.03):
        grown = splitgrow.split_neurons(model, plan, eps=eps)
        real = mean_loss(grown, train) - base
        second = eps**2 / 2 * predicted
        print(f"split at ε = {eps}: real ΔL = {real:+.3e}, second-order ε²/2·Σλ = {second:+.3e}")
    widths = {n: m.weight.shape[0] for n, m in grown.named_modules() if n in plan}
    print(f"grown widths: {widths}")


if __name__ == "__main__":
    main()
