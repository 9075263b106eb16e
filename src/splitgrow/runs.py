"""The run directory: config, JSONL log, checkpoints, results and plots, written atomically.

run/
  config.json      the command's settings
  log.jsonl        one JSON line per training phase (and its split)
  model.pt         the final model's state_dict (tensors only; loaded with weights_only=True)
  model.json       its architecture, so that it is rebuilt without pickle
  results.json     final parameters, FLOPs, test metrics, wall time and the history
  loss.png         training loss per epoch, splits marked, validation accuracy per phase
  growth.png       validation accuracy against parameters along the growth
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitgrow.models import Architecture


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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

    def save_model(self, model: nn.Module, arch: Architecture, name: str = "model") -> Path:
        """``name.pt`` (the state_dict) and ``name.json`` (the architecture), both atomic."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        target = self.path / f"{name}.pt"
        _atomic_write(target, lambda f: torch.save(state, f))
        self.write_json(f"{name}.json", arch.to_json())
        return target


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError …
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path} cannot be read safely: {first}") from exc
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
