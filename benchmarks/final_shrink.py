"""s2d with and without "shrink and perturb" before its last training phase (``final_shrink``),
next to the final architecture trained from scratch: does it close the warm-start gap?

    .venv/bin/python benchmarks/final_shrink.py mnist1d-mlp --seeds 10 --shrink none 0.3 0.5
    .venv/bin/python benchmarks/final_shrink.py digits-cnn --seeds 5 --shrink none 0.3

Prints, per λ, s2d's and scratch's test accuracy (mean ± std over seeds) and s2d's paired
difference from its own run without the shrink, with two standard errors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from compare import SETTINGS

from splitgrow.compare import CompareConfig, run_compare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("setting", choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--shrink", nargs="+", default=["none", "0.3"])
    args = p.parse_args()
    fields = {k: v for k, v in SETTINGS[args.setting].items() if k not in ("nas_trials",)}
    acc: dict[str, dict[str, dict[int, float]]] = {}
    for text in args.shrink:
        lam = None if text == "none" else float(text)
        cfg = CompareConfig(
            **fields, seeds=args.seeds, methods=["s2d", "scratch"], final_shrink=lam
        )
        records = run_compare(cfg, Path("runs") / f"final-shrink-{args.setting}-{text}")
        acc[text] = {
            m: {r["seed"]: 100 * r["test_acc"] for r in records if r["method"] == m}
            for m in ("s2d", "scratch")
        }
    print(f"{args.setting}, {args.seeds} seeds: {' '.join(sys.argv[1:])}\n")
    print("| λ | s2d test acc % | scratch (s2d's final widths) | s2d − s2d without | 2·SE |")
    print("|---|---|---|---|---|")
    base = acc.get("none", {}).get("s2d")
    for text, by in acc.items():
        s2d, scratch = by["s2d"], by["scratch"]
        diff, se = "", ""
        if base is not None and text != "none":
            d = [s2d[s] - base[s] for s in s2d]
            diff = f"{statistics.mean(d):+.2f}"
            se = f"{2 * statistics.stdev(d) / len(d) ** 0.5:.2f}" if len(d) > 1 else ""
        print(f"| {text} | {_mean_std(s2d)} | {_mean_std(scratch)} | {diff} | {se} |")


def _mean_std(values: dict[int, float]) -> str:
    v = list(values.values())
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


if __name__ == "__main__":
    main()
