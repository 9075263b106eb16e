"""The data registry: offline loading, seeded splits, standardisation, CIFAR fixture, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from _fixtures import write_cifar

from splitgrow import data


def test_digits_splits_are_seeded_and_standardised() -> None:
    a = data.load("digits", seed=0)
    b = data.load("digits", seed=0)
    c = data.load("digits", seed=1)
    assert a.in_shape == [1, 8, 8] and a.classes == 10 and a.task == "classification"
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert abs(float(a.train.x.mean())) < 1e-4 and abs(float(a.train.x.std()) - 1) < 1e-3
    batches = a.train.batches(100)
    assert sum(len(y) for _, y in batches) == len(a.train) and len(batches[-1][1]) <= 100


def test_toy1d_is_the_regression_target() -> None:
    d = data.load("toy1d")
    assert d.task == "regression" and d.classes == 1 and len(d.train) == 300
    assert torch.allclose(d.train.y, data.toy_target(d.train.x[:, 0]))


def test_mnist1d_generated_locally() -> None:
    d = data.load("mnist1d", seed=0)
    assert d.in_shape == [1, 40] and d.classes == 10
    assert len(d.train) + len(d.val) == 4000 and len(d.test) == 1000
    assert set(d.train.y.unique().tolist()) == set(range(10))


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_fixture_in_standard_layout(tmp_path: Path, name: str, classes: int) -> None:
    write_cifar(tmp_path, classes)
    d = data.load(name, data_dir=tmp_path)
    assert d.in_shape == [3, 32, 32] and d.classes == classes
    assert len(d.train) + len(d.val) == 100 and len(d.test) == 20


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path("/tmp/splitgrow_pwned").write_text, ("pwned",))


def test_cifar_refuses_pickled_code(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    target = Path("/tmp/splitgrow_pwned")
    target.unlink(missing_ok=True)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({b"data": _Boom(), b"labels": [0]})
    )
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR python batch .*refused"):
        data.load("cifar10", data_dir=tmp_path)
    assert not target.exists()


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (lambda p: None, "data_batch_1 is missing"),
        (lambda p: (p / "cifar-10-batches-py").mkdir(), "data_batch_1 is missing"),
    ],
)
def test_cifar_missing_files(tmp_path: Path, setup, words: str) -> None:  # type: ignore[no-untyped-def]
    setup(tmp_path)
    with pytest.raises(ValueError, match=words):
        data.load("cifar10", data_dir=tmp_path)


def test_cifar_malformed_and_missing_dir(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch is not a CIFAR python batch"):
        data.load("cifar10", data_dir=tmp_path)
    with pytest.raises(ValueError, match="needs --data-dir"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="does not exist"):
        data.load("cifar10", data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
