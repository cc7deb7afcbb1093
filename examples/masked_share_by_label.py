"""Where did the masking land? Masked share of response tokens per row, grouped by the input's `label` column.

    python examples/masked_share_by_label.py examples/data/custom_mix.jsonl out/demo-run
    python examples/masked_share_by_label.py a.jsonl b.jsonl out/ab-run     # the run filtered `cat a.jsonl b.jsonl`

Reads the run directory's per-token sidecar (`token_scores/`: row, score, unsafe) and the input rows' `label`
(e.g. harmful / benign). With several inputs (concatenated in that order, as filtered) a group is a label within
one file, except the `--positive` rows, which form one group. Prints the masked share of each group and the AUROC
of the per-row masked share for telling `--positive` rows from every other group, and from all the rest (0.5 = no
separation, 1.0 = every positive row is masked more). The computation is `toss_filter.eval_refs`'s, which
`toss-filter eval-refs` runs end to end (filtering included).

`--held-out EVAL_REFS_JSON` also prints what an `eval-refs` run measured for the same references on held-out rows
of other sources (`make demo` passes examples/reference-adapters/eval-refs.json): the demo's custom set is easy
to separate, and this says how the references do on harder rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toss_filter.eval_refs import read_labels, row_metrics, separation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+", help="the JSONL that was filtered (or its parts, in order); "
                                                              "needs a `label` column")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--positive", default="harmful")
    parser.add_argument("--held-out", type=Path, help="an eval-refs.json of the same references, to quote")
    args = parser.parse_args()

    rows = read_labels([str(path) for path in args.inputs], "label")
    several = len(args.inputs) > 1
    groups = [f"{row.label} ({Path(row.file).name})" if several and row.label != args.positive else row.label
              for row in rows]
    metrics = row_metrics(args.run_dir)
    if len(metrics["masked_share"]) != len(rows):
        parser.error(f"{args.run_dir} scored {len(metrics['masked_share'])} rows but the inputs hold {len(rows)}")
    result = separation(groups, metrics, args.positive)
    width = max(len(group) for group in result["groups"]) + 2
    print(f"{'group':<{width}} {'rows':>5} {'masked share of response tokens (mean per row)':>48}")
    for group, stats in result["groups"].items():
        print(f"{group:<{width}} {stats['rows']:>5} {stats['masked_share_mean']:>48.1%}")
    comparisons = result["comparisons"]
    for group, comparison in comparisons.items():
        if comparison["auroc_masked_share"] is not None and (group == "rest" or len(comparisons) > 2):
            print(f"AUROC of per-row masked share, {args.positive} vs {group}: {comparison['auroc_masked_share']:.3f}")
    if args.held_out:
        print_held_out(json.loads(args.held_out.read_text(encoding="utf-8")), args.held_out)


def print_held_out(report: dict, path: Path) -> None:
    rows = sum(group["rows"] for group in report["groups"].values())
    print(f"\nThe same references on {rows} held-out rows of other sources ({path}, ratio {report['config']['ratio']}):")
    print(f"  {report['positive']:<24} masked {report['groups'][report['positive']]['masked_share_mean']:.1%}")
    for group, comparison in report["comparisons"].items():
        if group != "rest":
            print(f"  {group:<24} masked {comparison['masked_share_mean']:.1%}, "
                  f"AUROC {report['positive']} vs it {comparison['auroc_masked_share']:.3f}")


if __name__ == "__main__":
    main()
