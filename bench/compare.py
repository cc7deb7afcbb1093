"""End-to-end benchmark: `toss-filter filter` vs the authors' loop, same data, same models, same machine, one run.

    .venv/bin/python bench/compare.py [--rows 64] [--pairs 3]

Both score the first `--rows` rows of the bundled custom set under the bundled reference adapters on
SmolLM2-135M-Instruct. toss-filter runs with `--template paper`, so both tokenise the same text (toss-filter
scores one more token per row: the first response token the authors' mask skips). The two commands alternate
(A B A B ...), each timed as a whole process by GNU time (wall seconds, peak RSS); ratios are taken pair by pair
so that drift in machine speed cancels. Also measured: the bare batched forward rate of the two references
(bench/forward_rate.py), the ceiling for any scorer on this CPU.

Results are printed and written to bench/results/compare.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADAPTERS = REPO / "examples" / "reference-adapters"


def timed(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) of one whole process, by GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", report.name, *command], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall, peak_kib = report.read().split()[-2:]
    return {"wall_s": float(wall), "peak_mib": int(peak_kib) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from toss_filter.default_model import EMBEDDED_MODEL_ID, resolve_model_path

    base = resolve_model_path(EMBEDDED_MODEL_ID)
    work = Path(tempfile.mkdtemp(prefix="toss-bench-"))
    data = work / "data.jsonl"
    lines = (REPO / "examples" / "data" / "custom_mix.jsonl").read_text().splitlines()[: args.rows]
    data.write_text("\n".join(lines) + "\n")
    models = ["--safety-model", str(ADAPTERS / "safety"), "--utility-model", str(ADAPTERS / "utility"),
              "--base-model", base]
    ours = [str(BIN / "toss-filter"), "filter", str(data), *models, "--template", "paper", "--quiet",
            "--output", str(work / "out"), "--run-dir", str(work / "run")]
    theirs = [str(BIN / "python"), str(REPO / "bench" / "authors_loop.py"), str(data), *models,
              "--output", str(work / "authors.json")]

    runs: dict[str, list[dict[str, float]]] = {"toss-filter": [], "authors": []}
    for _ in range(args.pairs):
        subprocess.run(["rm", "-rf", str(work / "out"), str(work / "run"), str(work / "out-rejected")], check=True)
        runs["toss-filter"].append(timed(ours))
        runs["authors"].append(timed(theirs))

    stats = json.loads((work / "run" / "stats.json").read_text())
    authors = json.loads((work / "authors.json").read_text())
    tokens = sum(len(ids) for ids in _token_rows(work / "run"))
    forward = [json.loads(subprocess.run(
        [str(BIN / "python"), str(REPO / "bench" / "forward_rate.py"), str(ADAPTERS / role), "--base-model", base],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]) for role in ("safety", "utility")]
    bare_rate = statistics.mean(f["tokens_per_s"] for f in forward)

    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["authors"], runs["toss-filter"])]
    memory = [b["peak_mib"] / a["peak_mib"] for a, b in zip(runs["authors"], runs["toss-filter"])]
    ours_wall = statistics.median(r["wall_s"] for r in runs["toss-filter"])
    score_s = stats["timings"]["score_s"]  # both references, model loading excluded
    result = {
        "rows": args.rows, "pairs": args.pairs, "tokens_per_model": tokens,
        "response_tokens": {"toss-filter": stats["scored_tokens"], "authors": authors["n_response_tokens"]},
        "runs": runs,
        "speedup_authors_over_ours_wall": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "peak_memory_ours_over_authors": {"median": statistics.median(memory), "min": min(memory), "max": max(memory)},
        "ours_end_to_end_model_tokens_per_s": 2 * tokens / ours_wall,
        "ours_scoring_model_tokens_per_s": 2 * tokens / score_s,
        "bare_forward_tokens_per_s": bare_rate,
        "scoring_share_of_bare_forward_rate": (2 * tokens / score_s) / bare_rate,
    }
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def _token_rows(run_dir: Path) -> list[list[int]]:
    from toss_filter.run import RunDir

    return RunDir(run_dir).read_tokens().column("input_ids").to_pylist()


if __name__ == "__main__":
    main()
