"""Re-measure an `eval-refs` run on some of its input files, without some rows, at a shorter --max-length and/or
another --ratio (ρ), without scoring again.

    python examples/eval_refs_subset.py out/r12/eval --files harmful.jsonl benign_unsafe_sounding.jsonl --max-length 256
    python examples/eval_refs_subset.py out/r12/eval --ratio 0.1
    python examples/eval_refs_subset.py out/r12/eval --exclude examples/data/audit/*_not_harmful.jsonl

Exact, not an estimate: a token's score depends only on the tokens before it (so truncating a row at N tokens keeps
the first N scores), and `filter`'s budget is one global top-k over the rows filtered together (so it is
recomputed over the chosen rows alone, ties at the threshold all masked, as `select` ranks them; a tie that
straddles the budget is the only possible difference). Prints the groups and comparisons as `eval-refs` does,
from `toss_filter.eval_refs.separation`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from datasets import load_from_disk

from toss_filter.eval_refs import separation


def subset_metrics(run_dir: Path, chosen: list[int], max_length: int | None, ratio: float) -> dict[str, np.ndarray]:
    """`row_metrics` for the `chosen` input rows (in this order), each cut at `max_length` tokens, masked by a
    global top-`ratio` of their scored tokens."""
    sidecar = load_from_disk(str(run_dir / "token_scores"))
    by_row = dict(zip(sidecar["row"], sidecar["score"]))
    scores = [np.asarray(by_row[i], dtype=np.float64)[:max_length] for i in chosen]
    scored = [s[~np.isnan(s)] for s in scores]
    pooled = np.sort(np.concatenate(scored))[::-1]
    budget = int(ratio * len(pooled))
    threshold = pooled[budget - 1] if budget else np.inf  # no budget: nothing masked
    count = np.array([len(s) for s in scored])
    with np.errstate(invalid="ignore"):
        return {"response_tokens": count,
                "masked_share": np.array([(s >= threshold).mean() if len(s) else np.nan for s in scored]),
                "mean_score": np.array([s.mean() if len(s) else np.nan for s in scored])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", type=Path, help="an eval-refs --output directory")
    parser.add_argument("--files", nargs="+", help="input file names to keep (default: all)")
    parser.add_argument("--max-length", type=int, default=None, help="cut rows at N tokens (at most the run's)")
    parser.add_argument("--ratio", type=float, default=None, help="the share of tokens to mask (default: the run's)")
    parser.add_argument("--exclude", type=Path, nargs="+", default=[],
                        help="JSONL files: leave out the input rows whose `source` is one of their rows' `source`")
    args = parser.parse_args()

    report = json.loads((args.eval_dir / "eval-refs.json").read_text(encoding="utf-8"))
    run_max = report["config"]["max_length"]
    if args.max_length and run_max and args.max_length > run_max:
        parser.error(f"--max-length {args.max_length} is longer than the run's {run_max}")
    chosen = [i for i, row in enumerate(report["rows"]) if not args.files or Path(row["file"]).name in args.files]
    if args.exclude:
        sources = [json.loads(line).get("source") for line in
                   (args.eval_dir / "input.jsonl").read_text(encoding="utf-8").splitlines()]
        excluded = set()
        for path in args.exclude:
            listed = {json.loads(line)["source"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
            unknown = listed - set(sources)
            if unknown:
                parser.error(f"{path}: no input row of {args.eval_dir} has source {sorted(unknown)[0]!r}")
            excluded |= listed
        chosen = [i for i in chosen if sources[i] not in excluded]
    if not chosen:
        parser.error(f"no row of {args.eval_dir} is left with --files {' '.join(args.files or ['(all)'])} and "
                     f"--exclude {' '.join(map(str, args.exclude)) or '(none)'}")
    ratio = report["config"]["ratio"] if args.ratio is None else args.ratio
    if not 0 <= ratio <= 1:
        parser.error(f"--ratio {ratio} is not between 0 and 1")
    metrics = subset_metrics(args.eval_dir / "run", chosen, args.max_length, ratio)
    result = separation([report["rows"][i]["label"] for i in chosen], metrics, report["positive"])
    for group, stats in result["groups"].items():
        versus = result["comparisons"].get(group, {})
        auroc = versus.get("auroc_masked_share")
        print(f"{group:<26} rows {stats['rows']:>4}  masked {stats['masked_share_mean']:.1%}"
              + (f"  AUROC masked share {auroc:.3f}, mean score {versus['auroc_mean_score']:.3f}" if auroc else ""))


if __name__ == "__main__":
    main()
