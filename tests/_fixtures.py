"""Data fixtures written by the tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar(root: Path, classes: int, n: int = 20) -> None:
    """A CIFAR-10 (``classes`` 10) or CIFAR-100 folder in the standard python-pickle layout under
    ``root``: random images and labels, ``n`` per file (5·n training images, n test images)."""
    rng = np.random.default_rng(0)

    def batch(k: int) -> dict:
        key = b"labels" if classes == 10 else b"fine_labels"
        return {
            b"data": rng.integers(0, 256, size=(k, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, size=k).tolist(),
        }

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n)))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(n)))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps(batch(5 * n)))
        (folder / "test").write_bytes(pickle.dumps(batch(n)))
