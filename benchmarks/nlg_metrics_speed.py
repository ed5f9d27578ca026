"""How long the generation metrics take on this machine (what one client evaluation costs).

    python benchmarks/nlg_metrics_speed.py [--data-dir DIR] [--sizes 50 200 1000]

Inputs are E2E test MRs with ≥ 2 references: the first reference plays the system output, the
others are the references. Prints one table row per size: seconds per metric (median of 3 calls;
the METEOR column excludes its one-off start, printed separately) and the scores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    args = parser.parse_args()
    root = args.data_dir or os.environ.get("FEDPEFT_DATA_DIR")
    if root is None:
        sys.exit("no data root: pass --data-dir or set FEDPEFT_DATA_DIR to a folder holding e2e/ and webnlg/")

    from fedpeft import nlg_metrics as M
    from fedpeft.data.nlg_sources import load_gen_examples

    test = [e for e in load_gen_examples("e2e", "validation", root) if len(e.references) > 1]
    java = M.java_available()
    if java:
        start = time.perf_counter()
        gts, res = M._ptb_tokenize(["warm up"], [["warm up"]])
        M._meteor(gts, res)
        print(f"METEOR one-off start (JVM + paraphrase table): {time.perf_counter() - start:.1f} s")
    else:
        print("no java: METEOR, ROUGE-L and CIDEr are not measured")

    def timed(fn, *a):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            value = fn(*a)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs), value

    print("| n | BLEU s | NIST s | PTB tokenize s | METEOR s | ROUGE-L s | CIDEr s | ROUGE-1 s | BLEU | NIST | METEOR | ROUGE-L | CIDEr |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        hyps = [e.references[0] for e in test[:n]]
        refs = [list(e.references[1:]) for e in test[:n]]
        t_bleu, bleu = timed(M.bleu, hyps, refs)
        t_nist, nist = timed(M.nist, hyps, refs)
        t_r1, _ = timed(M.rouge1, hyps, refs)
        cells = ["–"] * 4
        scores = ["–"] * 3
        if java:
            from pycocoevalcap.cider.cider import Cider
            from pycocoevalcap.rouge.rouge import Rouge

            t_tok, (gts, res) = timed(M._ptb_tokenize, hyps, refs)
            t_met, met = timed(M._meteor, gts, res)
            t_rl, rl = timed(lambda: Rouge().compute_score(gts, res)[0])
            t_ci, ci = timed(lambda: Cider().compute_score(gts, res)[0])
            cells = [f"{t_tok:.2f}", f"{t_met:.2f}", f"{t_rl:.2f}", f"{t_ci:.2f}"]
            scores = [f"{met:.4f}", f"{rl:.4f}", f"{ci:.4f}"]
        print(f"| {len(hyps)} | {t_bleu:.2f} | {t_nist:.2f} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
              f"{t_r1:.2f} | {bleu:.4f} | {nist:.4f} | {scores[0]} | {scores[1]} | {scores[2]} |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
