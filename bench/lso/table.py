"""The leave-source-out table of docs/references.md from the recipes' eval-refs.json and training.json files.

    python bench/lso/table.py out/lso/fold-a [RECIPE ...]

Per recipe: the out-of-source comparisons first (harmful rows of families no reference trained on, against each
benign group's rows of unseen families: masked shares and per-row AUROC), then per held-out family, then the
in-source controls (held-out rows of the trained families), and the CPU time of each adapter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from toss_filter.eval_refs import auroc

BENIGN = ("benign_unsafe_sounding", "benign_general")


def shares(report: dict, label: str, in_source: bool | None = None, family: str | None = None) -> np.ndarray:
    return np.array([row["masked_share"] for row in report["rows"] if row["label"] == label
                     and row["masked_share"] is not None and (in_source is None or row["in_source"] is in_source)
                     and (family is None or row["source"] == family)])


def recipe_lines(name: str, directory: Path) -> list[str]:
    report = json.loads((directory / "eval" / "eval-refs.json").read_text())
    cpu = {role: json.loads((directory / role / "training.json").read_text())["train_seconds"]["cpu"] / 60
           for role in ("utility", "safety")}
    harm = shares(report, "harmful", False)
    cells = [f"{harm.mean():.1%}"]
    for group in BENIGN:
        benign = shares(report, group, False)
        cells += [f"{benign.mean():.1%}", f"**{auroc(harm, benign):.3f}**"]
    inside = shares(report, "harmful", True)
    for group in BENIGN:
        cells.append(f"{auroc(inside, shares(report, group, True)):.3f}")
    cells.append(f"{cpu['utility']:.1f} + {cpu['safety']:.1f}")
    return [f"| {name} | " + " | ".join(cells) + " |"]


def family_lines(name: str, directory: Path) -> list[str]:
    report = json.loads((directory / "eval" / "eval-refs.json").read_text())
    lines = []
    unseen = sorted({(row["label"], row["source"]) for row in report["rows"] if row["in_source"] is False})
    for label, family in unseen:
        rows = shares(report, label, False, family)
        if label == "harmful":
            versus = [f"{auroc(rows, shares(report, group, False)):.3f}" for group in BENIGN]
        else:
            versus = ["", ""]
            versus[BENIGN.index(label)] = f"{auroc(shares(report, 'harmful', False), rows):.3f}"
        lines.append(f"| {name} | {label} | {family} | {len(rows)} | {rows.mean():.1%} | " + " | ".join(versus) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold", type=Path)
    parser.add_argument("recipes", nargs="*")
    args = parser.parse_args()
    recipes = args.recipes or sorted(p.name for p in args.fold.iterdir() if (p / "eval" / "eval-refs.json").exists())
    print("| recipe | harmful masked (OOS) | unsafe-sounding masked (OOS) | AUROC vs unsafe-sounding (OOS) | "
          "general masked (OOS) | AUROC vs general (OOS) | in-source AUROC vs unsafe-sounding | in-source AUROC vs "
          "general | CPU-min θu + θs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in recipes:
        print("\n".join(recipe_lines(name, args.fold / name)))
    print("\n| recipe | group | held-out family | rows | masked | AUROC vs unsafe-sounding (OOS) | AUROC vs general (OOS) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in recipes:
        print("\n".join(family_lines(name, args.fold / name)))


if __name__ == "__main__":
    main()
