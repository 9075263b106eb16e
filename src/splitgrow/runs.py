"""The run directory: config, JSONL log, checkpoints, results and plots, written atomically.

run/
  config.json      the command's settings
  log.jsonl        one JSON line per training phase (and its split)
  model.pt         the final model's state_dict (tensors only; loaded with weights_only=True)
  model.json       its architecture, so that it is rebuilt without pickle
  results.json     final parameters, FLOPs, test metrics, wall time and the history
  loss.png         training loss per epoch, splits marked, validation accuracy per phase
  growth.png       validation accuracy against parameters along the growth
  round<k>.pt/.json  the model as round k's training phase left it (before its split)
  checkpoints/<n>/ the run's state for ``--resume`` (state.pt: tensors; state.json: the rest);
                   the newest two are kept, each written into a hidden folder then renamed
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitgrow import faults
from splitgrow._attrs import first_line
from splitgrow.models import Architecture
from splitgrow.training.grow import GrowState

KEEP_CHECKPOINTS = 2
#: what a run writes at its top level (``RunDir.clear`` removes exactly these)
RUN_FILES = ("config.json", "log.jsonl", "model.pt", "model.json", "results.json", "loss.png",
             "growth.png", "tuning.json", "table.md", "pareto.png")  # fmt: skip


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class RunDir:
    """A run directory (created if needed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        text = json.dumps(_jsonable(obj), indent=2, sort_keys=True).encode()
        _atomic_write(target, lambda f: f.write(text))
        return target

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``log.jsonl`` (flushed and fsynced)."""
        with (self.path / "log.jsonl").open("a") as f:
            f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_log(self, records: Sequence[dict[str, Any]]) -> None:
        """Replace ``log.jsonl`` by these records (atomically; used when a run resumes)."""
        text = "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in records).encode()
        _atomic_write(self.path / "log.jsonl", lambda f: f.write(text))

    def is_empty(self) -> bool:
        return not any(self.path.iterdir())

    def clear(self) -> None:
        """Remove what a run writes here (and nothing else)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for pattern in ("round*.pt", "round*.json"):
            for f in self.path.glob(pattern):
                f.unlink()
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def save_state(self, state: GrowState) -> Path:
        """Write ``checkpoints/<n>/`` (``n`` one more than the newest) and keep the newest two.

        The files are written and fsynced in a hidden folder that is then renamed, so a
        checkpoint folder is either complete or absent, whenever the process dies.
        """
        root = self.path / "checkpoints"
        root.mkdir(exist_ok=True)
        for leftover in root.glob(".*.tmp"):  # from a process that died while writing
            shutil.rmtree(leftover, ignore_errors=True)
        done = _checkpoint_dirs(root)
        seq = int(done[-1].name) + 1 if done else 0
        tmp = root / f".{seq:06d}.tmp"
        tmp.mkdir()
        for name, data in (
            ("state.pt", lambda f: torch.save(state.tensors(), f)),
            ("state.json", lambda f: f.write(json.dumps(state.meta()).encode())),
        ):
            with (tmp / name).open("wb") as f:
                data(f)
                f.flush()
                os.fsync(f.fileno())
            faults.reached("checkpoint")
        _fsync_dir(tmp)
        final = root / f"{seq:06d}"
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in _checkpoint_dirs(root)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_state(self) -> tuple[GrowState, Path] | None:
        """The newest checkpoint of this run (``None`` if it has none). See :func:`load_state`."""
        done = _checkpoint_dirs(self.path / "checkpoints")
        return (load_state(done[-1]), done[-1]) if done else None

    def save_model(self, model: nn.Module, arch: Architecture, name: str = "model") -> Path:
        """``name.pt`` (the state_dict) and ``name.json`` (the architecture), both atomic."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        target = self.path / f"{name}.pt"
        _atomic_write(target, lambda f: torch.save(state, f))
        self.write_json(f"{name}.json", arch.to_json())
        return target


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        (d for d in root.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)
    )


def load_state(folder: str | Path) -> GrowState:
    """Read a checkpoint folder written by :meth:`RunDir.save_state`, without unpickling.

    Raises:
        ValueError: naming the file and the reason: a missing file, JSON that does not parse, a
            ``state.pt`` that holds anything but tensors and plain containers, or parts of the
            wrong form.
    """
    folder = Path(folder)
    meta_path, tensor_path = folder / "state.json", folder / "state.pt"
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise ValueError(f"checkpoint {path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint {meta_path} is not valid JSON: {exc}") from exc
    tensors = _safe_load(tensor_path)
    try:
        return GrowState.from_parts(meta, tensors)
    except ValueError as exc:
        raise ValueError(f"checkpoint {folder} is not a splitgrow run state: {exc}") from exc


def _safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, nothing executed."""
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of files it refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError …
        raise ValueError(f"checkpoint {path} cannot be read safely: {first_line(exc)}") from exc


def load_model(checkpoint: str | Path) -> tuple[nn.Module, Architecture]:
    """Rebuild a model saved by :meth:`RunDir.save_model` without unpickling anything.

    Raises:
        ValueError: naming the file and the reason: a missing or foreign file, a missing or bad
            architecture, a file that holds more than tensors, a checkpoint of another shape.
    """
    path = Path(checkpoint)
    arch_path = path.with_suffix(".json")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if not arch_path.is_file():
        raise ValueError(f"checkpoint {path} has no architecture file {arch_path.name} beside it")
    try:
        arch = Architecture.from_json(json.loads(arch_path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"architecture {arch_path} is not valid: {exc}") from exc
    state = _safe_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a state_dict of tensors")
    model = arch.build()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit architecture {arch_path.name}") from exc
    return model, arch


def plot_run(run: RunDir, history: Sequence[dict[str, Any]]) -> list[Path]:
    """``loss.png`` and ``growth.png`` from the history of :func:`splitgrow.grow`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epoch = 0
    ends, accs = [], []
    for record in history:
        losses = record.get("epoch_losses", [])
        ax.plot(range(epoch + 1, epoch + 1 + len(losses)), losses, color="C0")
        epoch += len(losses)
        ends.append(epoch)
        accs.append(float(record.get("val_accuracy", math.nan)))
        if record.get("split"):
            ax.axvline(epoch + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch (dotted: split)")
    ax.set_ylabel("training loss", color="C0")
    ax.set_yscale("log")
    if any(math.isfinite(a) for a in accs):
        ax2 = ax.twinx()
        ax2.plot(ends, accs, "o-", color="C1")
        ax2.set_ylabel("validation accuracy", color="C1")
    ax.set_title("training loss and validation accuracy")
    fig.tight_layout()
    loss_png = run.path / "loss.png"
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    params = [r["params"] for r in history]
    metric = "val_accuracy" if any("val_accuracy" in r for r in history) else "train_loss"
    values = [float(r.get(metric, math.nan)) for r in history]
    ax.plot(params, values, "o-")
    for r, v in zip(history, values, strict=True):
        ax.annotate(str(r["round"]), (r["params"], v), fontsize=8)
    ax.set_xlabel("parameters")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("growth (labels: round)")
    fig.tight_layout()
    growth_png = run.path / "growth.png"
    fig.savefig(growth_png, dpi=100)
    plt.close(fig)
    return [loss_png, growth_png]
