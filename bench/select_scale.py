"""Selection at scale: toss-filter's vectorised global top-k vs the authors' Python sort of (score, row, pos) tuples.

    .venv/bin/python bench/select_scale.py [--tokens 100000000] [--authors-tokens 2000000]

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. The scores are random float32
values laid out as rows of 200 response tokens. toss-filter's number includes generating the scores, which is the
memory floor (4 bytes per score); the authors' tuple list is measured at a smaller size and its per-token time and
memory are scaled linearly to the large size (a sort is n log n, so the time figure is optimistic for them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ROW_TOKENS = 200


def measure_ours(n: int) -> dict[str, float]:
    import numpy as np

    from toss_filter.select.rules import budget_of, global_top_k

    scores = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    mask = global_top_k(scores, 0.2)
    seconds = time.perf_counter() - start
    assert mask.sum() == budget_of(0.2, n)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": n, "seconds": seconds, "peak_mib": peak / 1024, "scores_mib": scores.nbytes / 2**20,
            "peak_before_select_mib": baseline / 1024}


def measure_authors(n: int) -> dict[str, float]:
    import random

    random.seed(0)
    scores = [[random.gauss(0, 1) for _ in range(ROW_TOKENS)] for _ in range(n // ROW_TOKENS)]
    start = time.perf_counter()
    pool = [(s, i, j) for i, row in enumerate(scores) for j, s in enumerate(row)]
    ranked = sorted(pool, key=lambda t: t[0], reverse=True)
    selected = {(i, j) for _, i, j in ranked[: int(0.2 * len(pool))]}
    seconds = time.perf_counter() - start
    assert len(selected) == int(0.2 * len(pool))
    return {"tokens": len(pool), "seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--authors-tokens", type=int, default=2_000_000)
    parser.add_argument("--one", choices=["ours", "authors"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measure = measure_ours if args.one == "ours" else measure_authors
        print(json.dumps(measure(args.tokens if args.one == "ours" else args.authors_tokens)))
        return

    def child(which: str) -> dict[str, float]:
        out = subprocess.run([sys.executable, __file__, "--one", which, "--tokens", str(args.tokens),
                              "--authors-tokens", str(args.authors_tokens)], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    ours, authors = child("ours"), child("authors")
    scale = args.tokens / authors["tokens"]
    print(json.dumps({
        "toss_filter": ours,
        "authors_measured": authors,
        "authors_scaled_to_tokens": {"tokens": args.tokens, "seconds": authors["seconds"] * scale,
                                     "peak_gib": authors["peak_mib"] * scale / 1024},
    }, indent=2))


if __name__ == "__main__":
    main()
