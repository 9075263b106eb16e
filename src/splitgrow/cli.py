"""The ``splitgrow`` command line (the only module that parses arguments).

    splitgrow grow [--model M] [--dataset D] [--widths W …] … [--out DIR]
    splitgrow grow --resume DIR
    splitgrow compare [--dataset D] [--model M] [--methods …] --budget-params P [--seeds K] …
    splitgrow eval --checkpoint FILE [--dataset D]
    splitgrow export --checkpoint FILE --format onnx|torchscript [--out PATH]
    splitgrow info
    splitgrow toy [--start W] [--rounds N] [--iterations K] [--out DIR]

Bad input gets one line on stderr and exit code 2, never a traceback. A growth run that stops on
a non-finite loss exits with 1; one interrupted with Ctrl-C exits with 130 (resume it). An export
whose outputs do not match PyTorch's exits with 1 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from splitgrow import data as datasets
from splitgrow import distributed as sgdist
from splitgrow._attrs import first_line
from splitgrow.compare import METHODS, CompareConfig, check_setting, run_compare
from splitgrow.export import FORMATS, TOLERANCE, ExportMismatch, export_model
from splitgrow.graph import analyze
from splitgrow.metrics import flops, latency_ms, parameter_count
from splitgrow.models import ACTIVATIONS, MODELS, Architecture, widths_of
from splitgrow.runs import RunDir, load_model, plot_run
from splitgrow.strategies import STRATEGIES
from splitgrow.toy import run_toy
from splitgrow.training import GrowConfig, evaluate, grow
from splitgrow.training.grow import MAX_SETTING, GrowState


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
    if not 0 < value <= MAX_SETTING:
        raise argparse.ArgumentTypeError(f"must be a positive number up to {MAX_SETTING:g}: {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_SETTING:
        raise argparse.ArgumentTypeError(
            f"must be a non-negative number up to {MAX_SETTING:g}: {text}"
        )
    return value


def _layer_width(text: str) -> tuple[str, int]:
    name, sep, width = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected LAYER=WIDTH, got {text!r}")
    return name, _positive_int(width)


def _shrink(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}")
    return value


def _samples(text: str) -> int | None:
    """A positive number of samples, or 'all' (``None``)."""
    if text.lower() == "all":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'all', got {text!r}"
        ) from None


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE as JSON (a number, true/false, null), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


#: options that ``grow --resume`` accepts besides itself (``--device``: CUDA results differ anyway)
RESUME_OPTIONS = {"--resume", "--device"}


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="splitgrow",
        description="Grow small networks by splitting steepest descent.",
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("grow", help="grow a model on a data set (the main job)", allow_abbrev=False)
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
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.0)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    g.add_argument("--final-epochs", type=_positive_int, default=None)
    g.add_argument("--plateau", type=_positive_float, default=None)
    g.add_argument("--carry", default="copy", choices=["copy", "reset"])
    g.add_argument(
        "--final-shrink", type=_shrink, default=0.3, metavar="LAMBDA",
        help="before the last phase, θ ← λθ + (1 − λ)·fresh init (0.3); 'none' to keep θ",
    )  # fmt: skip
    g.add_argument(
        "--strategy", default="s2d", choices=sorted(STRATEGIES),
        help="what grows: s2d (splitting steepest descent), s3d (signed splitting) …",
    )  # fmt: skip
    g.add_argument(
        "--signed-max-share", type=_positive_float, default=2.0,
        help="--strategy s3d: largest magnitude of an offspring's share of the outputs (> 1)",
    )  # fmt: skip
    g.add_argument(
        "--strategy-option", type=_option, nargs="+", default=None, metavar="KEY=VALUE",
        help="a setting of the strategy (VALUE read as JSON, else as text), e.g. steps=5",
    )  # fmt: skip
    g.add_argument("--directions", default="eigen", choices=["eigen", "random", "net2net", "fresh"])
    g.add_argument("--selection", default="per-layer", choices=["per-layer", "global", "energy"])
    g.add_argument(
        "--eigen-samples", type=_samples, default=GrowConfig.eigen_samples, metavar="N",
        help="splitting statistics over at most N training samples ('all': every one)",
    )  # fmt: skip
    g.add_argument(
        "--eigen-micro-batch", type=_positive_int, default=None,
        help="splitting statistics in slices of at most this many samples (less memory)",
    )  # fmt: skip
    g.add_argument("--budget-params", type=_positive_int, default=None)
    g.add_argument("--budget-flops", type=_positive_int, default=None)
    g.add_argument(
        "--round-budget-params", type=_positive_int, default=None,
        help="--selection energy: parameters one round's splits may add",
    )  # fmt: skip
    g.add_argument(
        "--round-budget-flops", type=_positive_int, default=None,
        help="--selection energy: FLOPs (batch 1) one round's splits may add",
    )  # fmt: skip
    g.add_argument(
        "--budget-latency-ms", type=_positive_float, default=None,
        help="stop growing once the model's measured CPU latency (ONNX Runtime, batch 1) "
        "reaches this",
    )  # fmt: skip
    g.add_argument(
        "--round-budget-latency-ms", type=_positive_float, default=None,
        help="--selection energy: measured latency one round's splits may add",
    )  # fmt: skip
    g.add_argument(
        "--max-widths", type=_layer_width, nargs="+", default=None, metavar="LAYER=WIDTH"
    )
    g.add_argument("--seed", type=_non_negative_int, default=0)
    g.add_argument("--out", type=Path, default=None, help="run directory (default runs/<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument(
        "--resume", type=Path, default=None, metavar="DIR",
        help="continue the run in DIR from its last checkpoint, with its saved settings",
    )  # fmt: skip
    g.add_argument(
        "--checkpoint-every", type=_positive_int, default=None, metavar="STEPS",
        help="also checkpoint every STEPS optimizer steps (default: after every epoch only)",
    )  # fmt: skip
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument(
        "--no-latency", action="store_true",
        help="skip the final model's ONNX Runtime latency in results.json (about a second)",
    )  # fmt: skip
    e = sub.add_parser(
        "eval", help="evaluate a saved model on a data set's test split", allow_abbrev=False
    )
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--dataset", default="digits", choices=sorted(datasets.DATASETS))
    e.add_argument("--data-dir", type=Path, default=None)
    e.add_argument("--seed", type=_non_negative_int, default=0)
    x = sub.add_parser(
        "export", help="export a saved model to ONNX or TorchScript, checked against PyTorch",
        allow_abbrev=False,
    )  # fmt: skip
    x.add_argument("--checkpoint", type=Path, required=True, help="a run's model.pt or round<k>.pt")
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument(
        "--out", type=Path, default=None,
        help="file to write (default: beside the checkpoint, .onnx or .torchscript.pt)",
    )  # fmt: skip
    x.add_argument(
        "--no-latency", action="store_true",
        help="skip the ONNX Runtime latency (measured for --format onnx)",
    )  # fmt: skip
    c = sub.add_parser(
        "compare", help="every method to the same parameter budget: accuracy and cost",
        allow_abbrev=False,
    )  # fmt: skip
    c.add_argument("--dataset", default="mnist1d", choices=sorted(datasets.DATASETS))
    c.add_argument("--data-dir", type=Path, default=None)
    c.add_argument("--model", default="mlp", choices=sorted(MODELS))
    c.add_argument("--widths", type=_positive_int, nargs="+", default=None, help="start widths")
    c.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS))
    c.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    c.add_argument("--budget-params", type=_positive_int, required=True)
    c.add_argument("--seeds", type=_positive_int, default=3)
    c.add_argument("--epochs", type=_positive_int, default=150)
    c.add_argument("--rounds", type=_non_negative_int, default=5)
    c.add_argument(
        "--epochs-per-round", type=_positive_int, default=None,
        help="growth: epochs per round (default: a third of the epochs over the rounds, ≤ 5)",
    )  # fmt: skip
    c.add_argument("--grow-ratio", type=_positive_float, default=0.5)
    c.add_argument(
        "--final-shrink", type=_shrink, default=0.3, metavar="LAMBDA",
        help="growth methods: shrink and perturb before the last phase ('none': off)",
    )  # fmt: skip
    c.add_argument(
        "--eigen-samples", type=_samples, default=CompareConfig.eigen_samples, metavar="N",
        help="growth methods: splitting statistics over at most N training samples ('all')",
    )  # fmt: skip
    c.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    c.add_argument("--lr-grid", type=_positive_float, nargs="+", default=[0.02, 0.05, 0.1])
    c.add_argument("--tune-trials", type=_positive_int, default=3)
    c.add_argument("--batch-size", type=_positive_int, default=128)
    c.add_argument("--nas-trials", type=_positive_int, default=8)
    c.add_argument("--prune-wide", type=_positive_float, default=4.0)
    c.add_argument("--out", type=Path, default=None, help="run directory (default runs/<time>)")
    c.add_argument("--overwrite", action="store_true", help="replace the comparison in --out")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sub.add_parser("info", help="list data sets, models and activations", allow_abbrev=False)
    t = sub.add_parser(
        "toy", help="the 1-D toy: splitting vs random splits vs fixed width", allow_abbrev=False
    )
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


def _given_options(argv: Sequence[str]) -> list[str]:
    """The option strings on a command line (``--x=1`` counts as ``--x``)."""
    return [t.split("=", 1)[0] for t in argv if t.startswith("--")]


def _saved_args(folder: Path, argv: Sequence[str], given: argparse.Namespace) -> argparse.Namespace:
    """The arguments of the run in ``folder`` (from its config.json), for ``--resume``."""
    extra = [o for o in _given_options(argv) if o not in RESUME_OPTIONS]
    if extra:
        raise UsageError(
            f"--resume takes its settings from {folder / 'config.json'}; drop {extra[0]}"
        )
    if not folder.is_dir():
        raise UsageError(f"--resume {folder}: no such run directory")
    config_path = folder / "config.json"
    try:
        stored = json.loads(config_path.read_text())
        saved = stored["argv"]
        if not isinstance(saved, list) or not all(isinstance(a, str) for a in saved):
            raise TypeError("argv is not a list of strings")
    except FileNotFoundError:
        raise UsageError(f"--resume {folder}: {config_path} is missing") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"--resume {folder}: {config_path} is not a splitgrow config ({exc})"
        ) from exc
    try:
        args = _parser().parse_args(saved)
    except UsageError as exc:
        raise UsageError(f"--resume {folder}: the saved command is not valid: {exc}") from exc
    if args.command != "grow" or args.resume is not None:
        raise UsageError(f"--resume {folder}: {config_path} does not hold a grow command")
    # an option the saved command left out takes the value the run used (config.json's "cli",
    # where it is plain), not this version's default: eigen_samples was all samples before it
    # became 4096. The saved command's own options stand as given.
    used = stored.get("cli")
    plain = (type(None), bool, int, float, str)
    given_keys = {o.lstrip("-").replace("-", "_") for o in _given_options(saved)}
    for key, value in used.items() if isinstance(used, dict) else ():
        if key in ("command", "out", "resume") or key in given_keys or not hasattr(args, key):
            continue
        current = getattr(args, key)
        same_kind = value is None or current is None or type(value) is type(current)
        if isinstance(value, plain) and isinstance(current, plain) and same_kind:
            setattr(args, key, value)
    args.out, args.resume = folder, folder
    if "--device" in _given_options(argv):
        args.device = given.device
    return args


def _run_dir(args: argparse.Namespace) -> RunDir:
    """The run directory: refused if it already holds something, unless --overwrite."""
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    run = RunDir(out)
    if not run.is_empty():
        if not args.overwrite:
            resume = f"continue that run with --resume {out}, " if args.command == "grow" else ""
            raise UsageError(
                f"--out {out} already holds files; {resume}"
                "replace it with --overwrite, or choose another --out"
            )
        run.clear()
    return run


def _grow(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.resume is not None:
        args = _saved_args(args.resume, argv, args)
    if not sgdist.launched() or sgdist.active():  # one process, or a process group already up
        device = _device(args.device) if not sgdist.active() else _rank_device(args.device)
        return _grow_on(args, argv, device)
    device = sgdist.init_from_env(args.device)  # torchrun: gloo on CPU, NCCL on CUDA
    ended = False
    try:
        code = _grow_on(args, argv, device)
        ended = code != 130  # an interrupt may reach one rank only: no barrier then
        return code
    finally:
        sgdist.shutdown(together=ended)


def _rank_device(name: str) -> torch.device:
    """This process's device when torch.distributed is already initialised (GPU LOCAL_RANK)."""
    if name == "cpu":
        return torch.device("cpu")
    _device(name)
    return torch.device("cuda", torch.cuda.current_device())


def _grow_on(args: argparse.Namespace, argv: Sequence[str], device: torch.device) -> int:
    """``splitgrow grow`` in this process (one of several under torchrun: every rank trains and
    computes, rank 0 alone writes the run directory and prints)."""
    distributed = sgdist.active() and sgdist.world_size() > 1
    main = sgdist.is_main()
    data = datasets.load(args.dataset, seed=args.seed, data_dir=args.data_dir)
    spec = MODELS[args.model]
    arch = Architecture(
        args.model,
        list(args.widths or spec.default_widths),
        args.activation or spec.default_activation,
        data.in_shape,
        data.classes,
    )
    config = GrowConfig(
        rounds=args.rounds,
        epochs_per_round=args.epochs_per_round,
        final_epochs=args.final_epochs,
        grow_ratio=args.grow_ratio,
        eps=args.eps,
        eps_mode=args.eps_mode,
        method=args.method,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        plateau=args.plateau,
        carry=args.carry,
        final_shrink=args.final_shrink,
        directions=args.directions,
        strategy=args.strategy,
        signed_max_share=args.signed_max_share,
        strategy_options=dict(args.strategy_option or []),
        selection=args.selection,
        eigen_samples=args.eigen_samples,
        eigen_micro_batch=args.eigen_micro_batch,
        batch_size=args.batch_size,
        max_widths=dict(args.max_widths or []),
        budget_params=args.budget_params,
        budget_flops=args.budget_flops,
        round_budget_params=args.round_budget_params,
        round_budget_flops=args.round_budget_flops,
        budget_latency_ms=args.budget_latency_ms,
        round_budget_latency_ms=args.round_budget_latency_ms,
        seed=args.seed,
        progress=main,
    )
    torch.manual_seed(args.seed)
    model = arch.build().to(device)
    _check_against_model(model, config)
    loss_fn = _loss(data.task)
    state: GrowState | None = None
    folder: Path | None = None
    if args.resume is not None:
        resume_dir = Path(args.resume)

        def newest_state() -> tuple[GrowState, Path] | None:
            # a bad checkpoint raises ValueError: exit 2, nothing lost
            found = RunDir(resume_dir).latest_state()
            if found is not None and found[0].config != config.to_json():
                raise UsageError(
                    f"--resume {resume_dir}: checkpoint {found[1]} was made with other settings "
                    f"than {resume_dir / 'config.json'}"
                )
            return found

        # under torchrun rank 0 reads the checkpoint and hands it to every rank
        found = sgdist.from_main(newest_state) if distributed else newest_state()
        if found is not None:
            state, folder = found
            if main:
                print(
                    f"resuming {resume_dir} from {folder} (round {state.round}, "
                    f"{state.phase.epoch} epochs into its phase)",
                    file=sys.stderr,
                )
        out = resume_dir
        if main:
            RunDir(out).rewrite_log(state.history if state else [])
    else:

        def create() -> Path:
            # the run directory is created only once the arguments are known to be good
            made = _run_dir(args)
            cli = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            made.write_json(
                "config.json",
                {
                    "argv": ["grow", *argv],
                    "cli": cli,
                    "architecture": arch.to_json(),
                    "grow": config.to_json(),
                },
            )
            return made.path

        out = sgdist.from_main(create) if distributed else create()
    run = RunDir(out) if main else None  # only rank 0 writes

    def on_record(record: dict[str, Any], trained: torch.nn.Module) -> None:
        if run is not None:
            if record.get("checksums_agree") is False:
                print(
                    f"splitgrow: warning: after round {record['round']}'s split the processes "
                    "hold different parameters; DDP continues from rank 0's",
                    file=sys.stderr,
                )
            run.log(record)
            run.save_model(trained, arch.with_widths(widths_of(trained)), f"round{record['round']}")

    try:
        result = grow(
            model,
            data.train.batches(args.batch_size),  # grow moves them to the model's device
            loss_fn=loss_fn,
            val_data=data.val.batches(512),
            task=data.task,
            config=config,
            on_record=on_record,
            resume=state,
            on_checkpoint=None if run is None else run.save_state,
            checkpoint_steps=args.checkpoint_every,
            distributed=distributed,
        )
    except ValueError as exc:
        if state is not None and str(exc).startswith("resume:"):  # name the checkpoint
            raise ValueError(f"checkpoint {folder}: {str(exc)[len('resume: ') :]}") from exc
        raise
    except KeyboardInterrupt:
        if main:
            print(
                f"splitgrow: interrupted; continue with: splitgrow grow --resume {out}",
                file=sys.stderr,
            )
        return 130
    seconds = result.history[-1]["seconds"] if result.history else 0.0
    code = 1 if result.stopped == "non-finite" else 0
    if run is None:  # another rank than 0: rank 0 reports
        return code
    test = evaluate(result.model, data.test.batches(512), loss_fn, data.task)  # moved per batch
    final_arch = arch.with_widths(widths_of(result.model))
    run.save_model(result.model, final_arch)
    example = data.test.x[:1]
    results: dict[str, Any] = {
        "params": parameter_count(result.model),
        "flops": flops(result.model, example.to(device)),  # one forward pass, batch 1
        "widths": final_arch.widths,
        "test": test,
        "seconds": seconds,
        "stopped": result.stopped,
        "world_size": sgdist.world_size(),
        "history": result.history,
    }
    if not args.no_latency:  # ONNX Runtime on the CPU, whatever --device trained on
        latency = latency_ms(result.model, example)
        results["latency_ms"] = latency.pop("ms")
        results["latency"] = latency
    run.write_json("results.json", results)
    plot_run(run, result.history)
    print(_table(result.history))
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in test.items())
    print(f"\nfinal widths {final_arch.widths}, {results['params']} parameters; test {metrics}")
    if "latency_ms" in results:
        print(
            f"latency {results['latency_ms']:.4f} ms (onnxruntime, batch 1, 1 thread), "
            f"{results['flops'] / 1e3:.1f} kFLOPs"
        )
    print(f"stopped: {result.stopped}; {seconds:.1f} s; run directory: {run.path}")
    if result.stopped == "non-finite":
        where = result.history[-1].get("non_finite") or {}
        latest = run.latest_state()
        kept = f"; the last good checkpoint is {latest[1]}" if latest else ""
        print(
            f"splitgrow: training stopped: the loss became non-finite in round "
            f"{result.history[-1]['round']}, epoch {where.get('epoch')}, batch "
            f"{where.get('batch')}; model.pt holds the model from the last checkpoint moment "
            f"before it{kept}; try a smaller --lr",
            file=sys.stderr,
        )
    return code


def _check_against_model(model: torch.nn.Module, config: GrowConfig) -> None:
    """Options that name layers must name splittable layers, at widths they can grow to."""
    if config.budget_params is not None and parameter_count(model) > config.budget_params:
        raise UsageError(
            f"--budget-params {config.budget_params} is smaller than the starting model "
            f"({parameter_count(model)} parameters)"
        )
    if not config.max_widths:
        return
    layers = {k: v for k, v in analyze(model).layers.items() if v.splittable}
    for name, width in config.max_widths.items():
        if name not in layers:
            raise UsageError(
                f"--max-widths: the model has no splittable layer {name!r} "
                f"(it has {', '.join(layers) or 'none'})"
            )
        if width < layers[name].n:
            raise UsageError(
                f"--max-widths {name}={width} is below that layer's starting width {layers[name].n}"
            )


def _compare(args: argparse.Namespace) -> int:
    if not sgdist.launched() or sgdist.active():  # one process, or a process group already up
        _device(args.device)
        return _compare_on(args)
    sgdist.init_from_env(args.device)  # torchrun: gloo on CPU, NCCL on CUDA
    ended = False
    try:
        code = _compare_on(args)
        ended = True
        return code
    finally:
        sgdist.shutdown(together=ended)


def _compare_on(args: argparse.Namespace) -> int:
    """``splitgrow compare`` in this process (one of several under torchrun: every rank trains,
    rank 0 decides what is not training, writes the run directory and prints)."""
    distributed = sgdist.active() and sgdist.world_size() > 1
    main = sgdist.is_main()
    config = CompareConfig(
        dataset=args.dataset, model=args.model, widths=args.widths, activation=args.activation,
        budget_params=args.budget_params, methods=args.methods or list(METHODS),
        seeds=args.seeds, epochs=args.epochs, rounds=args.rounds,
        epochs_per_round=args.epochs_per_round, grow_ratio=args.grow_ratio,
        final_shrink=args.final_shrink, eigen_samples=args.eigen_samples,
        optimizer=args.optimizer, lr_grid=args.lr_grid,
        tune_trials=min(args.tune_trials, len(args.lr_grid)), batch_size=args.batch_size,
        nas_trials=args.nas_trials, prune_wide=args.prune_wide,
        data_dir=None if args.data_dir is None else str(args.data_dir), device=args.device,
    )  # fmt: skip

    def check() -> None:
        check_setting(config)

    if distributed:  # rank 0 checks first: a bad setting is one error, raised on every rank
        sgdist.from_main(check)
    setting = check_setting(config)  # data, model and budget, before the run directory is made

    def create() -> Path:
        return _run_dir(args).path

    out = sgdist.from_main(create) if distributed else create()
    run_compare(config, out, progress=main, setting=setting, distributed=distributed)
    if main:
        print((out / "table.md").read_text())
        print(f"run directory: {out}")
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


def _export(args: argparse.Namespace) -> int:
    model, arch = load_model(args.checkpoint)
    suffix = ".onnx" if args.format == "onnx" else ".torchscript.pt"
    out = args.out or args.checkpoint.with_suffix(suffix)
    if out.resolve() == args.checkpoint.resolve() or out.resolve() == (
        args.checkpoint.with_suffix(".json").resolve()
    ):
        raise UsageError(f"--out {out} would overwrite the checkpoint; choose another --out")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory, not a file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    try:
        diff = export_model(model, arch.in_shape, out, args.format)
    except ExportMismatch as exc:
        print(f"splitgrow: export failed: {first_line(exc)}; nothing written", file=sys.stderr)
        return 1
    line = (
        f"exported {args.checkpoint} to {out} ({args.format}, {out.stat().st_size / 1e3:.1f} kB); "
        f"outputs match PyTorch (max |diff| {diff:.1e} ≤ {TOLERANCE:g}); "
        f"{flops(model, torch.zeros(1, *arch.in_shape)) / 1e3:.1f} kFLOPs"
    )
    if args.format == "onnx" and not args.no_latency:
        latency = latency_ms(model, torch.zeros(1, *arch.in_shape))
        line += (
            f"; latency {latency['ms']:.4f} ms ({latency['runtime']}, batch 1, "
            f"{latency['threads']} thread, median of {latency['repeats']})"
        )
    print(line)
    return 0


def _info(args: argparse.Namespace) -> int:
    print("datasets:    " + ", ".join(sorted(datasets.DATASETS)))
    for name, spec in sorted(MODELS.items()):
        print(f"model {name:12s} widths {list(spec.default_widths)}  {spec.doc}")
    print("activations: " + ", ".join(sorted(ACTIVATIONS)))
    print("strategies:  " + ", ".join(sorted(STRATEGIES)))
    print("compare:     " + ", ".join(METHODS))
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
        argv = list(sys.argv[1:] if argv is None else argv)
        args = _parser().parse_args(argv)
        if args.command == "grow":
            return _grow(args, argv[1:])
        commands = {
            "compare": _compare, "eval": _eval, "export": _export, "info": _info, "toy": _toy,
        }  # fmt: skip
        return commands[args.command](args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError, TypeError, OSError) as exc:
        text = first_line(exc)
        print(
            text if text.startswith("splitgrow") else f"splitgrow: error: {text}", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
