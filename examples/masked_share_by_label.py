"""Where did the masking land? Masked share of response tokens per row, grouped by the input's `label` column.

    python examples/masked_share_by_label.py examples/data/custom_mix.jsonl out/demo-run
    python examples/masked_share_by_label.py a.jsonl b.jsonl out/ab-run     # the run filtered `cat a.jsonl b.jsonl`

Reads the run directory's per-token sidecar (`token_scores/`: row, score, unsafe) and the input rows' `label`
(e.g. harmful / benign). With several inputs (concatenated in that order, as filtered) a group is a label within
one file. Prints the masked share of each group and the AUROC of the per-row masked share for telling `--positive`
rows from every other group, and from all the rest (0.5 = no separation, 1.0 = every positive row is masked more).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from datasets import load_from_disk


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+", help="the JSONL that was filtered (or its parts, in order); "
                                                              "needs a `label` column")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--positive", default="harmful")
    args = parser.parse_args()

    labels, groups = [], []
    for path in args.inputs:
        for line in path.read_text().splitlines():
            if line.strip():
                labels.append(json.loads(line)["label"])
                groups.append(labels[-1] if len(args.inputs) == 1 else f"{labels[-1]} ({path.name})")
    sidecar = load_from_disk(str(args.run_dir / "token_scores"))
    share = {}
    for row, scores, unsafe in zip(sidecar["row"], sidecar["score"], sidecar["unsafe"]):
        response = ~np.isnan(np.array(scores, dtype=np.float64))
        share[row] = np.array(unsafe)[response].mean() if response.any() else 0.0
    if len(share) != len(labels):
        parser.error(f"{args.run_dir} scored {len(share)} rows but the inputs hold {len(labels)}")
    width = max(len(group) for group in groups) + 2
    print(f"{'group':<{width}} {'rows':>5} {'masked share of response tokens (mean per row)':>48}")
    by_group = {group: np.array([share[row] for row, g in enumerate(groups) if g == group]) for group in sorted(set(groups))}
    for group, values in by_group.items():
        print(f"{group:<{width}} {len(values):>5} {values.mean():>48.1%}")
    positive = np.array([share[row] for row, label in enumerate(labels) if label == args.positive])
    label_of = dict(zip(groups, labels))
    negatives = {group: values for group, values in by_group.items() if label_of[group] != args.positive}
    if len(negatives) > 1:
        for group, values in negatives.items():
            print(f"AUROC of per-row masked share, {args.positive} vs {group}: {auroc(positive, values):.3f}")
    rest = np.array([share[row] for row, label in enumerate(labels) if label != args.positive])
    if len(positive) and len(rest):
        print(f"AUROC of per-row masked share, {args.positive} vs rest: {auroc(positive, rest):.3f}")


if __name__ == "__main__":
    main()
