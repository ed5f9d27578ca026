#!/usr/bin/env python
"""Does `--encoder-path varlen` (or `--decoder-path varlen`) cost accuracy? Paired per-seed differences of two bench matrices.

    fedpeft bench --suite glue4-mini --methods fedit fedlease --seeds 1 2 3 --threads 1 \\
        --encoder-path padded --out OUT/padded
    fedpeft bench --suite glue4-mini --methods fedit fedlease --seeds 1 2 3 --threads 1 \\
        --encoder-path varlen --out OUT/varlen
    python benchmarks/encoder_path_accuracy.py OUT/padded/glue4-mini OUT/varlen/glue4-mini [--md FILE]

The decoders' path the same way, on a generation suite: `fedpeft bench --suite nlg-cpu --methods fedit
--seeds 1 2 3 --threads 1 --decoder-path padded|varlen --out OUT/padded|varlen`, then this script on
OUT/padded/nlg-cpu and OUT/varlen/nlg-cpu.

Reads each folder's results.csv (written by `fedpeft bench`), pairs the runs by (label, seed) and
prints, per method: the overall score of every seed on both paths, the paired difference
varlen − padded, its mean ± sample std, and the seed noise of each path (the sample std of the
overall score over seeds). The verdict "inside the seed noise" is |mean difference| ≤ the larger
seed std of the two paths. Nothing is hard-coded: every figure comes from the two CSV files.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path


def load(folder: Path) -> dict[tuple[str, int], dict[str, str]]:
    path = folder / "results.csv"
    if not path.is_file():
        raise SystemExit(f"fedpeft: error: no results.csv in {folder} (run `fedpeft bench` into it first)")
    return {(r["label"], int(r["seed"])): r for r in csv.DictReader(path.open())}


def std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def compare(padded: dict, varlen: dict) -> tuple[str, dict]:
    labels = sorted({lbl for lbl, _ in padded} & {lbl for lbl, _ in varlen})
    if not labels:
        raise SystemExit("fedpeft: error: the two folders share no (label, seed) run")
    lines = ["| method | seed | overall padded | overall varlen | varlen − padded | s/round padded | s/round varlen |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for lbl in labels:
        seeds = sorted(s for l, s in padded if l == lbl and (l, s) in varlen)
        p = [float(padded[(lbl, s)]["overall"]) for s in seeds]
        v = [float(varlen[(lbl, s)]["overall"]) for s in seeds]
        d = [b - a for a, b in zip(p, v)]
        for s, a, b, x in zip(seeds, p, v, d):
            lines.append(f"| {lbl} | {s} | {a:.4f} | {b:.4f} | {x:+.4f} | "
                         f"{float(padded[(lbl, s)]['seconds_per_round']):.1f} | {float(varlen[(lbl, s)]['seconds_per_round']):.1f} |")
        noise = max(std(p), std(v))
        mean_d = statistics.mean(d)
        summary[lbl] = {"seeds": seeds, "mean_difference": mean_d, "std_difference": std(d),
                        "seed_std_padded": std(p), "seed_std_varlen": std(v),
                        "inside_seed_noise": abs(mean_d) <= noise}
    lines += ["", "| method | mean ± std of varlen − padded | seed std padded | seed std varlen | inside the seed noise |",
              "|---|---|---|---|---|"]
    for lbl, s in summary.items():
        lines.append(f"| {lbl} | {s['mean_difference']:+.4f} ± {s['std_difference']:.4f} | {s['seed_std_padded']:.4f} | "
                     f"{s['seed_std_varlen']:.4f} | {'yes' if s['inside_seed_noise'] else 'NO'} |")
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("padded", type=Path, help="bench folder of the padded matrix (OUT/SUITE)")
    ap.add_argument("varlen", type=Path, help="bench folder of the varlen matrix (OUT/SUITE)")
    ap.add_argument("--md", type=Path, default=None, help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)
    text, summary = compare(load(args.padded), load(args.varlen))
    print(text)
    verdict = all(s["inside_seed_noise"] for s in summary.values())
    print(f"\nevery method inside the seed noise: {'yes' if verdict else 'NO'}")
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
