"""The ``splitgrow`` command line (the only module that parses arguments).

    splitgrow grow [--model M] [--dataset D] [--widths W …] … [--out DIR]
    splitgrow eval --checkpoint FILE [--dataset D]
    splitgrow info
    splitgrow toy [--start W] [--rounds N] [--iterations K] [--out DIR]

Bad input gets one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from splitgrow import data as datasets
from splitgrow.metrics import flops, parameter_count
from splitgrow.models import ACTIVATIONS, MODELS, Architecture, widths_of
from splitgrow.runs import RunDir, load_model, plot_run
from splitgrow.toy import run_toy
from splitgrow.training import GrowConfig, evaluate, grow


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ ``minimum``, with a message naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            word = "positive" if minimum == 1 else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {word}: {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number: {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="splitgrow", description="Grow small networks by splitting steepest descent.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("grow", help="grow a model on a data set (the main job)")
    g.add_argument("--model", default="cnn", choices=sorted(MODELS))
    g.add_argument("--dataset", default="digits", choices=sorted(datasets.DATASETS))
    g.add_argument("--data-dir", type=Path, default=None, help="folder of cifar10/cifar100")
    g.add_argument("--widths", type=_positive_int, nargs="+", default=None)
    g.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS))
    g.add_argument("--rounds", type=_non_negative_int, default=3)
    g.add_argument("--epochs-per-round", type=_positive_int, default=5)
    g.add_argument("--grow-ratio", type=_positive_float, default=0.3)
    g.add_argument("--eps", type=_positive_float, default=0.1)
    g.add_argument(
        "--eps-mode", default="line-search", choices=["fixed", "relative", "line-search"]
    )
    g.add_argument("--method", default="auto", choices=["exact", "fast", "auto"])
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    g.add_argument("--lr", type=_positive_float, default=0.05)
    g.add_argument("--batch-size", type=_positive_int, default=128)
    g.add_argument("--budget-params", type=_positive_int, default=None)
    g.add_argument("--seed", type=_non_negative_int, default=0)
    g.add_argument("--out", type=Path, default=None, help="run directory (default runs/<time>)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e = sub.add_parser("eval", help="evaluate a saved model on a data set's test split")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--dataset", default="digits", choices=sorted(datasets.DATASETS))
    e.add_argument("--data-dir", type=Path, default=None)
    e.add_argument("--seed", type=_non_negative_int, default=0)
    sub.add_parser("info", help="list data sets, models and activations")
    t = sub.add_parser("toy", help="the 1-D toy: splitting vs random splits vs fixed width")
    t.add_argument("--start", type=_positive_int, default=2, help="starting number of neurons")
    t.add_argument("--rounds", type=_non_negative_int, default=4)
    t.add_argument("--iterations", type=_positive_int, default=1000, help="per round")
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--out", type=Path, default=None)
    return p


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _on(batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list[Any]:
    return [(x.to(device), y.to(device)) for x, y in batches]


def _loss(task: str) -> Any:
    if task == "classification":
        return F.cross_entropy
    return lambda out, y: F.mse_loss(out.squeeze(-1), y)


def _table(history: list[dict[str, Any]]) -> str:
    columns = ("round", 5), ("params", 8), ("kFLOPs", 8), ("train loss", 10), ("val acc", 8)
    head = " ".join(f"{name:>{width}}" for name, width in columns) + f" {'twins':>5}  split"
    lines = [head]
    for r in history:
        acc = r.get("val_accuracy")
        split = ", ".join(f"{k}+{v}" for k, v in r.get("split", {}).items()) or "-"
        lines.append(
            f"{r['round']:>5} {r['params']:>8} {r['flops'] / 1e3:>8.1f} {r['train_loss']:>10.4f} "
            f"{'-' if acc is None else f'{acc:.3f}':>8} {r['twins']:>5}  {split}"
        )
    return "\n".join(lines)


def _grow(args: argparse.Namespace) -> int:
    device = _device(args.device)
    data = datasets.load(args.dataset, seed=args.seed, data_dir=args.data_dir)
    spec = MODELS[args.model]
    classes = data.classes
    arch = Architecture(
        args.model,
        list(args.widths or spec.default_widths),
        args.activation or spec.default_activation,
        data.in_shape,
        classes,
    )
    config = GrowConfig(
        rounds=args.rounds,
        epochs_per_round=args.epochs_per_round,
        grow_ratio=args.grow_ratio,
        eps=args.eps,
        eps_mode=args.eps_mode,
        method=args.method,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        budget_params=args.budget_params,
        seed=args.seed,
        progress=True,
    )
    torch.manual_seed(args.seed)
    model = arch.build().to(device)
    if config.budget_params is not None and parameter_count(model) > config.budget_params:
        raise UsageError(
            f"--budget-params {config.budget_params} is smaller than the starting model "
            f"({parameter_count(model)} parameters)"
        )
    # the run directory is created only once the arguments are known to be good
    run = RunDir(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    cli = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run.write_json(
        "config.json", {"cli": cli, "architecture": arch.to_json(), "grow": dict(config.__dict__)}
    )
    loss_fn = _loss(data.task)

    def on_record(record: dict[str, Any], trained: torch.nn.Module) -> None:
        run.log(record)
        run.save_model(trained, arch.with_widths(widths_of(trained)), f"round{record['round']}")

    start = time.perf_counter()
    result = grow(
        model,
        _on(data.train.batches(args.batch_size), device),
        loss_fn=loss_fn,
        val_data=_on(data.val.batches(512), device),
        task=data.task,
        config=config,
        on_record=on_record,
    )
    seconds = time.perf_counter() - start
    test = evaluate(result.model, _on(data.test.batches(512), device), loss_fn, data.task)
    final_arch = arch.with_widths(widths_of(result.model))
    run.save_model(result.model, final_arch)
    results = {
        "params": parameter_count(result.model),
        "flops": flops(result.model, data.test.x[:1].to(device)),
        "widths": final_arch.widths,
        "test": test,
        "seconds": seconds,
        "stopped": result.stopped,
        "history": result.history,
    }
    run.write_json("results.json", results)
    plot_run(run, result.history)
    print(_table(result.history))
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in test.items())
    print(f"\nfinal widths {final_arch.widths}, {results['params']} parameters; test {metrics}")
    print(f"stopped: {result.stopped}; {seconds:.1f} s; run directory: {run.path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model, arch = load_model(args.checkpoint)
    data = datasets.load(args.dataset, seed=args.seed, data_dir=args.data_dir)
    if data.in_shape != arch.in_shape or data.classes != arch.classes:
        raise UsageError(
            f"checkpoint {args.checkpoint} expects inputs {arch.in_shape} and {arch.classes} "
            f"outputs; dataset {args.dataset} has {data.in_shape} and {data.classes}"
        )
    result = evaluate(model, data.test.batches(512), _loss(data.task), data.task)
    print(", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return 0


def _info(args: argparse.Namespace) -> int:
    print("datasets:    " + ", ".join(sorted(datasets.DATASETS)))
    for name, spec in sorted(MODELS.items()):
        print(f"model {name:12s} widths {list(spec.default_widths)}  {spec.doc}")
    print("activations: " + ", ".join(sorted(ACTIVATIONS)))
    print("strategies:  s2d")
    return 0


def _toy(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / time.strftime("toy-%Y%m%d-%H%M%S")
    results = run_toy(
        out, start=args.start, rounds=args.rounds, iterations=args.iterations, seed=args.seed
    )
    for name in ("s2d", "random", "fixed"):
        r = results[name]
        print(
            f"{name:7s} final MSE {r['final_loss']:.3e}  width {r['final_width']:3d}  "
            f"{r['seconds']:.1f} s" + (f"  stopped: {r['stopped']}" if "stopped" in r else "")
        )
    print(f"run directory: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, with one line on stderr)."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        commands = {"grow": _grow, "eval": _eval, "info": _info, "toy": _toy}
        return commands[args.command](args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError, TypeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            text if text.startswith("splitgrow") else f"splitgrow: error: {text}", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
