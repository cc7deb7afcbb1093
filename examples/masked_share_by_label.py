"""Where did the masking land? Masked share of response tokens per row, grouped by the input's `label` column.

    python examples/masked_share_by_label.py examples/data/custom_mix.jsonl out/demo-run

Reads the run directory's per-token sidecar (`token_scores/`: row, score, unsafe) and the input rows' `label`
(e.g. harmful / benign). Prints the masked share of each group and the AUROC of the per-row masked share for
telling `--positive` rows from the rest (0.5 = no separation, 1.0 = every positive row is masked more).
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
    parser.add_argument("input", type=Path, help="the JSONL that was filtered; needs a `label` column")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--positive", default="harmful")
    args = parser.parse_args()

    labels = [json.loads(line)["label"] for line in args.input.read_text().splitlines() if line.strip()]
    sidecar = load_from_disk(str(args.run_dir / "token_scores"))
    share = {}
    for row, scores, unsafe in zip(sidecar["row"], sidecar["score"], sidecar["unsafe"]):
        response = ~np.isnan(np.array(scores, dtype=np.float64))
        share[row] = np.array(unsafe)[response].mean() if response.any() else 0.0
    print(f"{'label':<10} {'rows':>5} {'masked share of response tokens (mean per row)':>48}")
    for label in sorted(set(labels)):
        values = [share[row] for row, l in enumerate(labels) if l == label]
        print(f"{label:<10} {len(values):>5} {np.mean(values):>48.1%}")
    positive = np.array([share[row] for row, l in enumerate(labels) if l == args.positive])
    negative = np.array([share[row] for row, l in enumerate(labels) if l != args.positive])
    if len(positive) and len(negative):
        print(f"AUROC of per-row masked share, {args.positive} vs rest: {auroc(positive, negative):.3f}")


if __name__ == "__main__":
    main()
