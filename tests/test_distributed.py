"""torch.distributed: 2 processes with gloo on CPU against the single-process computation.

* splitting eigenpairs of every registry model (exact and fast) from per-rank shares of the data
  equal those of the whole data in one process (float64, 1e-8);
* ``grow(distributed=True)`` on 2 processes ends with the model, history and decisions of the
  single-process run (same global batches: DDP averages the shares' weighted gradients), every
  rank holding bit-identical parameters after each split and at the end;
* a single-process checkpoint resumes on 2 processes to the same end;
* ``splitgrow grow`` under torchrun: only rank 0 writes, results.json records the world size;
* ``run_compare(distributed=True)`` on 2 processes (growth, pruning, search) gives the records of
  one process, and only rank 0 writes; ``splitgrow compare`` runs under torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _distributed import COMPARE, CONFIGS, compare_run, grow_run, spawn
from _models import REGISTRY, build, loss_fn

import splitgrow
from splitgrow import cli, splitting_eigen
from splitgrow import distributed as sgdist
from splitgrow.splitting import eigen as eigen_module
from splitgrow.splitting.solvers import BlockSubspace

TOL = 1e-8


def test_shards_cover_the_data_exactly() -> None:
    batches = [(torch.arange(n) + 100 * i, torch.arange(n)) for i, n in enumerate([4, 4, 3])]
    for world in (1, 2, 3, 5, 11):
        shares = [sgdist.shard_samples(batches, r, world) for r in range(world)]
        joined = torch.cat([x for share in shares for x, _ in share])
        assert torch.equal(joined, torch.cat([x for x, _ in batches]))
        sizes = [sum(len(y) for _, y in share) for share in shares]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="11 samples cannot be shared among 12"):
        sgdist.shard_samples(batches, 0, 12)
    assert [sgdist.shard_bounds(5, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert sgdist.shard_bounds(1, 2, 1) == (1, 1)  # empty: that rank runs the batch at weight 0


def test_distributed_flags_need_a_process_group() -> None:
    model, batches = build("mlp")
    assert not sgdist.active() and sgdist.world_size() == 1 and sgdist.is_main()
    with pytest.raises(ValueError, match="splitting_eigen: distributed=True needs"):
        splitting_eigen(model, loss_fn, batches, distributed=True)
    with pytest.raises(ValueError, match="grow: distributed=True needs"):
        splitgrow.grow(model, batches, loss_fn=loss_fn, distributed=True)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        sgdist.backend_for("tpu")
    assert sgdist.backend_for("cpu") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            sgdist.backend_for("cuda")
    else:
        assert sgdist.backend_for("cuda") == "nccl"


def test_compare_under_a_bad_torchrun_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["compare", "--budget-params", "1000"]) == 2
    assert "start the processes with torchrun" in capsys.readouterr().err


@pytest.fixture(scope="module")
def eigen_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn("eigen_all", 2, tmp_path_factory.mktemp("eigen"))


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_eigenpairs_equal_the_single_process_ones(
    eigen_ranks: list[dict[str, Any]], name: str, method: str
) -> None:
    model, batches = build(name)
    ref = splitting_eigen(model, loss_fn, batches, method=method, which="both", tol=1e-6)
    for got in eigen_ranks:
        layers = got[f"{name}/{method}"]
        assert list(layers) == list(ref)
        for layer, (values, vectors, max_values, samples, passes) in layers.items():
            e = ref[layer]
            assert samples == e.samples == sum(len(y) for _, y in batches)
            torch.testing.assert_close(values, e.values, rtol=0, atol=TOL)
            torch.testing.assert_close(max_values, e.max_values, rtol=0, atol=TOL)
            # the eigenvectors too, where λ_min is well separated (the sign is canonical)
            if method == "exact":
                torch.testing.assert_close(vectors, e.vectors, rtol=0, atol=1e-6)
            else:
                assert passes == e.passes
    # both ranks computed bit-identical eigenpairs
    for key, layers in eigen_ranks[0].items():
        if key != "empty":
            for layer, pair in layers.items():
                assert torch.equal(pair[0], eigen_ranks[1][key][layer][0])


def test_a_rank_without_samples_fails_on_every_rank(eigen_ranks: list[dict[str, Any]]) -> None:
    assert [r["empty"] for r in eigen_ranks] == [
        "process 1 of 2 has no samples: give every process at least one batch"
    ] * 2


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return {name: grow_run(False, name) for name in CONFIGS}


@pytest.fixture(scope="module")
def grow_ranks(
    tmp_path_factory: pytest.TempPathFactory, single: dict[str, Any]
) -> list[dict[str, Any]]:
    resume = single["fast"][3][0]  # the single-process run's checkpoint after its first split
    return spawn("grow_all", 2, tmp_path_factory.mktemp("grow"), resume)


def _same_history(got: list[dict[str, Any]], ref: list[dict[str, Any]]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.get("split") == r.get("split") and g["params"] == r["params"]
        assert g.get("eigen_samples") == r.get("eigen_samples")
        assert (g.get("eps") is None) == (r.get("eps") is None)
        assert g.get("eps", 0.0) == pytest.approx(r.get("eps", 0.0), rel=1e-9)
        assert g["epoch_losses"] == pytest.approx(r["epoch_losses"], rel=1e-9)
        if "lambda_min" in r:
            for layer, stats in r["lambda_min"].items():
                assert g["lambda_min"][layer]["min"] == pytest.approx(stats["min"], abs=TOL)
                assert g["lambda_min"][layer]["negative"] == stats["negative"]
        assert ("checksums_agree" in g) == bool(g.get("split"))
        assert g.get("checksums_agree", True) is True


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grow_on_two_processes_equals_one(
    single: dict[str, Any], grow_ranks: list[dict[str, Any]], name: str
) -> None:
    ref_state, ref_history, _, _ = single[name]
    assert sum(1 for r in ref_history if r.get("split")) == 2  # both rounds split
    subset = {"exact": 97, "fast": 61}[name]  # fast: a drawn subset, shared out among the ranks
    assert [r["eigen_samples"] for r in ref_history if "split" in r] == [subset, subset]
    sums = set()
    for ranks in grow_ranks:
        state, history, checksum, _ = ranks[name]
        sums.add(checksum)
        assert list(state) == list(ref_state)
        for k, v in state.items():
            torch.testing.assert_close(v, ref_state[k], rtol=1e-9, atol=1e-10)
        _same_history(history, ref_history)
    assert len(sums) == 1  # every rank ends with the same bits


def test_single_process_checkpoint_resumes_on_two(
    single: dict[str, Any], grow_ranks: list[dict[str, Any]]
) -> None:
    ref_state, ref_history, _, _ = single["fast"]
    for ranks in grow_ranks:
        state, history, _, _ = ranks["resumed"]
        for k, v in state.items():
            torch.testing.assert_close(v, ref_state[k], rtol=1e-9, atol=1e-10)
        assert [r["params"] for r in history] == [r["params"] for r in ref_history]


def test_batchnorm_model_stays_identical_on_every_rank(grow_ranks: list[dict[str, Any]]) -> None:
    (sum0, history0), (sum1, history1) = (r["bn"] for r in grow_ranks)
    assert sum0 == sum1
    assert history0[0]["split"] and history0[0]["checksums_agree"] is True
    assert [r["params"] for r in history0] == [r["params"] for r in history1]


def test_fewer_samples_than_processes_fails_on_every_rank(
    grow_ranks: list[dict[str, Any]],
) -> None:
    assert [r["too_few"] for r in grow_ranks] == [
        "train_data has 1 samples, fewer than the 2 processes"
    ] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_under_torchrun(tmp_path: Path) -> None:
    src = str(Path(splitgrow.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "splitgrow.cli", "grow", "--model", "mlp", "--dataset", "toy1d", "--widths", "3",
        "--activation", "tanh", "--rounds", "1", "--epochs-per-round", "2", "--batch-size", "64",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["history"][0]["split"] and results["history"][0]["checksums_agree"] is True
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # one line per phase, once
    # a second run into the same folder is refused on every rank: exit code 2, no hang
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode != 0 and "already holds files" in again.stderr


def test_compare_on_two_processes_equals_one(tmp_path: Path) -> None:
    ranks = spawn("compare_all", 2, tmp_path, str(tmp_path))
    ref = compare_run(tmp_path / "single", False)
    assert [r["method"] for r in ref] == COMPARE.methods
    assert ranks[0] == ranks[1]  # every rank returns rank 0's records
    for got, want in zip(ranks[0], ref, strict=True):
        assert got["world_size"] == 2 and want["world_size"] == 1
        assert got["checksums_agree"] is True and "checksums_agree" not in want
        for key in ("method", "params", "widths", "flops", "gradient_passes", "lr"):
            assert got[key] == want[key], key
        for key in ("test_acc", "val_acc"):
            assert got[key] == want[key], key
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-9)
        for key in ("wide_widths", "wide_params", "candidates"):
            assert got.get(key) == want.get(key), key
        for (p, a), (q, b) in zip(got["trajectory"], want["trajectory"], strict=True):
            assert p == q and a == b
    # rank 0 wrote the run directory once; rank 1 wrote nothing
    run = tmp_path / "run0"
    assert not (tmp_path / "run1").exists()
    assert json.loads((run / "results.json").read_text()) == json.loads(json.dumps(ranks[0]))
    assert len((run / "log.jsonl").read_text().splitlines()) == len(ref)
    assert {p.name for p in run.iterdir()} == {
        "config.json", "tuning.json", "log.jsonl", "results.json", "table.md", "pareto.png"
    }  # fmt: skip


def test_compare_cli_under_torchrun(tmp_path: Path) -> None:
    src = str(Path(splitgrow.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "splitgrow.cli", "compare", "--dataset", "digits", "--model", "mlp",
        "--widths", "4", "4", "--budget-params", "600", "--methods", "s2d", "uniform",
        "--seeds", "1", "--epochs", "2", "--rounds", "1", "--epochs-per-round", "1",
        "--lr-grid", "0.05", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["world_size"], r["checksums_agree"]) for r in records] == [
        ("s2d", 2, True), ("uniform", 2, True)
    ]  # fmt: skip
    assert (out / "table.md").read_text().count("| s2d |") == 1


def test_solvers_that_disagree_across_processes_stop_with_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step's state (converged, columns) goes through one all-gather; processes whose
    solvers took different steps get an error, not a hang at the next collective."""
    gen = torch.Generator().manual_seed(0)
    solvers = [BlockSubspace(4, 6, "min", 1, 1e-2, gen, torch.device("cpu")) for _ in range(2)]
    seen: list[str] = []

    def agree(text: str) -> bool:
        seen.append(text)
        return len(set(seen)) == 1  # as if every process had sent the first state

    monkeypatch.setattr(sgdist, "all_agree", agree)
    eigen_module._check_solvers_agree({"a": solvers[0]})
    eigen_module._check_solvers_agree({"a": solvers[1]})  # the same state: agreed
    solvers[1].update(torch.randn(4, 6, 1, dtype=torch.float64, generator=gen))
    with pytest.raises(RuntimeError, match="disagree on whether they have converged"):
        eigen_module._check_solvers_agree({"a": solvers[1]})
