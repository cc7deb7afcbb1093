"""Where did the masking land? Masked share of response tokens per row, grouped by the input's `label` column.

    python examples/masked_share_by_label.py examples/data/custom_mix.jsonl out/demo-run
    python examples/masked_share_by_label.py a.jsonl b.jsonl out/ab-run     # the run filtered `cat a.jsonl b.jsonl`

Reads the run directory's per-token sidecar (`token_scores/`: row, score, unsafe) and the input rows' `label`
(e.g. harmful / benign). With several inputs (concatenated in that order, as filtered) a group is a label within
one file, except the `--positive` rows, which form one group. Prints the masked share of each group and the AUROC
of the per-row masked share for telling `--positive` rows from every other group, and from all the rest (0.5 = no
separation, 1.0 = every positive row is masked more). The computation is `toss_filter.eval_refs`'s, which
`toss-filter eval-refs` runs end to end (filtering included).

`--held-out EVAL_REFS_JSON ...` also prints what `eval-refs` runs measured for the same references (`make demo`
passes the bundled references' files): the demo's custom set comes from sources the references trained on, so its
figure is in-source. Out-of-source figures (families no reference trained on) come first; an in-source one is
labelled so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toss_filter.eval_refs import in_source, read_labels, reference_families, row_metrics, separation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+", help="the JSONL that was filtered (or its parts, in order); "
                                                              "needs a `label` column")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--positive", default="harmful")
    parser.add_argument("--held-out", type=Path, nargs="*", default=[],
                        help="eval-refs.json files of the same references, to quote")
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
    print(f"This set ({standing(rows, args.run_dir)}):")
    print(f"{'group':<{width}} {'rows':>5} {'masked share of response tokens (mean per row)':>48}")
    for group, stats in result["groups"].items():
        print(f"{group:<{width}} {stats['rows']:>5} {stats['masked_share_mean']:>48.1%}")
    comparisons = result["comparisons"]
    for group, comparison in comparisons.items():
        if comparison["auroc_masked_share"] is not None and (group == "rest" or len(comparisons) > 2):
            print(f"AUROC of per-row masked share, {args.positive} vs {group}: {comparison['auroc_masked_share']:.3f}")
    reports = [(path, json.loads(path.read_text(encoding="utf-8"))) for path in args.held_out]
    for path, report in sorted(reports, key=lambda item: item[1].get("out_of_source") is None):
        print_held_out(report, path)


def standing(rows: list, run_dir: Path) -> str:
    """Whether the references trained on this set's sources, from their training.json (`eval_refs.in_source`)."""
    models = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["models"]
    by_role = reference_families(models["safety"]["path"], models["utility"]["path"])
    trained = {family: 1 for counts in by_role.values() for family in counts}
    states = {in_source(row.source, trained) for row in rows}
    if None in states:
        return "unknown whether the references trained on its sources"
    return {frozenset({True}): "IN-SOURCE: the references trained on its sources",
            frozenset({False}): "OUT OF SOURCE: no reference trained on its sources"}.get(
        frozenset(states), "MIXED: the references trained on some of its sources")


def print_held_out(report: dict, path: Path) -> None:
    """The out-of-source comparisons of an eval-refs.json where it has them, else its in-source ones, labelled."""
    block = report.get("out_of_source")
    where = ("OUT OF SOURCE: rows of families no reference trained on" if block else
             "IN-SOURCE: held-out rows of the sources the references trained on")
    block = block or report
    rows = sum(group["rows"] for group in block["groups"].values())
    print(f"\n{where}, {rows} rows ({path}, ratio {report['config']['ratio']}):")
    print(f"  {report['positive']:<24} masked {block['groups'][report['positive']]['masked_share_mean']:.1%}")
    for group, comparison in block["comparisons"].items():
        if group != "rest" and comparison["auroc_masked_share"] is not None:
            print(f"  {group:<24} masked {comparison['masked_share_mean']:.1%}, "
                  f"AUROC {report['positive']} vs it {comparison['auroc_masked_share']:.3f}")


if __name__ == "__main__":
    main()
