"""Other scores and aggregations on the same per-token NLLs, judged out of source (issue: the score lever).

    python bench/lso/score_variants.py out/lso/fold-a/RECIPE/eval [--ratio 0.2]

Reads the eval-refs run's tokens and both references' per-token NLL (`run.ShardFiles`), and the rows' families and
labels from its eval-refs.json. For each variant of the token score it applies the same rule as `filter` (the exact
global top-k at the ratio, `select.rules.choose_unsafe`) and reports the AUROC of the per-row masked share and of
the per-row mean score, harmful rows of unseen families against each benign group's unseen rows:

- `toss`: S = nll_u − nll_s (the paper; the default);
- `per-role-position`: each reference's NLL minus its own median NLL at that response position (positions bucketed
  0, 1, 2, 3, 4–7, 8–15, 16–31, 32–63, 64+), divided by its own median absolute deviation there, then u − s: each
  reference relative to how surprised it typically is at that point of an answer;
- `per-role-rank`: each reference's NLL as its percentile among all scored tokens, then u − s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.eval_refs import auroc
from toss_filter.run import RunDir, ShardFiles
from toss_filter.select.rules import choose_unsafe, positions_in_rows

BUCKETS = np.array([0, 1, 2, 3, 4, 8, 16, 32, 64])
BENIGN = ("benign_unsafe_sounding", "benign_general")


def per_role_position(nll: np.ndarray, position: np.ndarray) -> np.ndarray:
    bucket = np.searchsorted(BUCKETS, position, side="right") - 1
    out = np.empty_like(nll, dtype=np.float64)
    for b in np.unique(bucket):
        chosen = bucket == b
        median = np.median(nll[chosen])
        spread = np.median(np.abs(nll[chosen] - median)) or 1.0
        out[chosen] = (nll[chosen] - median) / spread
    return out


def per_role_rank(nll: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(nll, kind="stable"), kind="stable") / max(len(nll) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", type=Path)
    parser.add_argument("--ratio", type=float, default=0.2)
    args = parser.parse_args()
    report = json.loads((args.eval_dir / "eval-refs.json").read_text())
    run = RunDir(args.eval_dir / "run")
    files = ShardFiles.current(run)
    shards = [files.scored(shard) for shard in range(run.read_json("run.json")["shards"])]
    row_ids = np.concatenate([s.row_ids for s in shards])
    responses = [(s.labels != IGNORE_INDEX) & ~np.isnan(s.nll_safety) for s in shards]
    nll_s = np.concatenate([s.nll_safety[r] for s, r in zip(shards, responses)]).astype(np.float64)
    nll_u = np.concatenate([s.nll_utility[r] for s, r in zip(shards, responses)]).astype(np.float64)
    per_row = np.concatenate([np.bincount(s.token_row[r], minlength=len(s.row_ids)) for s, r in zip(shards, responses)])
    position = positions_in_rows(per_row)
    variants = {
        "toss": nll_u - nll_s,
        "per-role-position": per_role_position(nll_u, position) - per_role_position(nll_s, position),
        "per-role-rank": per_role_rank(nll_u) - per_role_rank(nll_s),
    }
    rows = {row["row"]: row for row in report["rows"]}  # by row in its file: one file, so the input row
    labels = np.array([rows[i]["label"] for i in row_ids])
    unseen = np.array([rows[i]["in_source"] is False for i in row_ids])
    token_row = np.repeat(np.arange(len(per_row)), per_row)
    print(f"{args.eval_dir}: {len(row_ids)} rows, {len(nll_s)} scored tokens, ratio {args.ratio}")
    print("| score | AUROC masked share vs unsafe-sounding | vs general | AUROC mean score vs unsafe-sounding | vs general |")
    print("|---|---:|---:|---:|---:|")
    for name, score in variants.items():
        unsafe = choose_unsafe(score.astype(np.float32), per_row, args.ratio)
        with np.errstate(invalid="ignore"):
            share = np.bincount(token_row, weights=unsafe, minlength=len(per_row)) / per_row
            mean = np.bincount(token_row, weights=score, minlength=len(per_row)) / per_row
        scored = per_row > 0
        cells = []
        for values in (share, mean):
            harm = values[scored & unseen & (labels == "harmful")]
            cells += [f"{auroc(harm, values[scored & unseen & (labels == group)]):.3f}" for group in BENIGN]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
