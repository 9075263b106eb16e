"""Registered data sets, all offline, with train/validation/test splits fixed by the seed.

* ``toy1d``: 1-D regression, sin(2x) + 0.5·sin(5x + 1) + exp(−4(x − 1)²) on 300 points in [−3, 3].
* ``digits``: scikit-learn's bundled 8×8 digits (1797 images, 10 classes).
* ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package (never its download helper).
* ``cifar10`` / ``cifar100``: read from ``data_dir`` in the standard python-pickle layout
  (``cifar-10-batches-py`` / ``cifar-100-python``). The pickles are read with an unpickler that
  accepts only NumPy arrays, lists, dicts, strings and numbers: a file holding anything else is
  refused, never executed.

Inputs are standardised with the training split's mean and standard deviation.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """One split: inputs ``(N, *in_shape)`` (float32) and targets ``(N,)`` (long or float)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(
        self, size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """The split as a list of ``(input, target)`` batches (the last one may be shorter)."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"batch size must be a positive integer, got {size!r}")
        order = (
            torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        )
        return [(self.x[i], self.y[i]) for i in order.split(size)]


@dataclass(frozen=True)
class Dataset:
    """A data set's splits and what a model needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    task: str  # "classification" or "regression"
    classes: int  # number of outputs (1 for regression)

    @property
    def in_shape(self) -> list[int]:
        return list(self.train.x.shape[1:])


Loader = Callable[[int, Path | None], Dataset]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register a loader ``(seed, data_dir) -> Dataset`` (decorator)."""

    def deco(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return deco


def load(name: str, *, seed: int = 0, data_dir: str | Path | None = None) -> Dataset:
    """Load a registered data set.

    Raises:
        ValueError: an unknown name, or a missing or malformed data folder (naming it).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name](seed, None if data_dir is None else Path(data_dir))


def _finish(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    val_fraction: float,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    test_fraction: float = 0.2,
    task: str = "classification",
    classes: int,
) -> Dataset:
    """Shuffle by the seed, cut the splits, standardise with the training statistics."""
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    yt = torch.as_tensor(np.ascontiguousarray(y))
    yt = yt.long() if task == "classification" else yt.float()
    if not bool(torch.isfinite(xt).all()):
        raise ValueError(f"dataset {name!r} contains NaN or infinite inputs")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(yt), generator=gen)
    xt, yt = xt[order], yt[order]
    if test is None:
        n_test = round(test_fraction * len(yt))
        test_x, test_y = xt[:n_test], yt[:n_test]
        xt, yt = xt[n_test:], yt[n_test:]
    else:
        test_x = torch.as_tensor(np.ascontiguousarray(test[0]), dtype=torch.float32)
        test_y = torch.as_tensor(np.ascontiguousarray(test[1]))
        test_y = test_y.long() if task == "classification" else test_y.float()
    n_val = round(val_fraction * len(yt))
    val_x, val_y, train_x, train_y = xt[:n_val], yt[:n_val], xt[n_val:], yt[n_val:]
    if task == "classification":
        mean, std = train_x.mean(), train_x.std().clamp_min(1e-8)
    else:
        mean, std = torch.zeros(()), torch.ones(())
    norm = lambda t: (t - mean) / std  # noqa: E731
    return Dataset(
        name,
        Split(norm(train_x), train_y),
        Split(norm(val_x), val_y),
        Split(norm(test_x), test_y),
        task,
        classes,
    )


def toy_target(x: Tensor) -> Tensor:
    """sin(2x) + 0.5·sin(5x + 1) + exp(−4(x − 1)²)."""
    return torch.sin(2 * x) + 0.5 * torch.sin(5 * x + 1) + torch.exp(-4 * (x - 1) ** 2)


@register_dataset("toy1d")
def _toy1d(seed: int, data_dir: Path | None) -> Dataset:
    x = torch.linspace(-3, 3, 300).unsqueeze(1)
    y = toy_target(x[:, 0])
    # every point trains (the toy studies optimisation); validation and test are the same points
    split = Split(x, y)
    return Dataset("toy1d", split, split, split, "regression", 1)


@register_dataset("digits")
def _digits(seed: int, data_dir: Path | None) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _finish(
        "digits", d.images[:, None] / 16.0, d.target, seed=seed, val_fraction=0.1, classes=10
    )


@register_dataset("mnist1d")
def _mnist1d(seed: int, data_dir: Path | None) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42 + seed  # the package's generator seed: the data themselves
    data = make_dataset(args)  # generated locally; the download helper is never called
    return _finish(
        "mnist1d",
        data["x"][:, None, :],
        data["y"],
        seed=seed,
        val_fraction=0.125,
        test=(data["x_test"][:, None, :], data["y_test"]),
        classes=10,
    )


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers only; anything else is refused."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only arrays are allowed")


def _read_batch(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"CIFAR file {path} is missing")
    try:
        with path.open("rb") as f:
            data = _ArraysOnly(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"CIFAR file {path} is not a CIFAR python batch ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"CIFAR file {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in data.items()}


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_batch(path)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"CIFAR file {path} lacks 'data' or '{label_key}'")
    x = np.asarray(batch["data"])
    y = np.asarray(batch[label_key])
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise ValueError(f"CIFAR file {path} has data of shape {x.shape}, expected (N, 3072)")
    return x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, y.astype(np.int64)


def _cifar(name: str, seed: int, data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise ValueError(
            f"dataset {name!r} needs --data-dir, the folder holding its python batches"
        )
    if name == "cifar10":
        root = (
            data_dir / "cifar-10-batches-py"
            if (data_dir / "cifar-10-batches-py").is_dir()
            else data_dir
        )
        train_files, test_file, key, classes = (
            [root / f"data_batch_{i}" for i in range(1, 6)],
            root / "test_batch",
            "labels",
            10,
        )
    else:
        root = (
            data_dir / "cifar-100-python" if (data_dir / "cifar-100-python").is_dir() else data_dir
        )
        train_files, test_file, key, classes = [root / "train"], root / "test", "fine_labels", 100
    if not root.is_dir():
        raise ValueError(f"CIFAR folder {root} does not exist")
    parts = [_cifar_arrays(p, key) for p in train_files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    test = _cifar_arrays(test_file, key)
    if y.min() < 0 or y.max() >= classes or test[1].min() < 0 or test[1].max() >= classes:
        raise ValueError(f"CIFAR labels in {root} are outside [0, {classes})")
    return _finish(name, x, y, seed=seed, val_fraction=0.1, test=test, classes=classes)


register_dataset("cifar10")(lambda seed, data_dir: _cifar("cifar10", seed, data_dir))
register_dataset("cifar100")(lambda seed, data_dir: _cifar("cifar100", seed, data_dir))
