#!/usr/bin/env python3
"""Build the leave-source-out folds (``examples/data/lso/``): reference training parts and an evaluation set whose
out-of-source groups come from source families that no training part of the fold holds.

CONTENT WARNING: the harmful rows are real harmful model completions, for safety research only.

A held-out row of ``eval/`` says how well a pair remembers a source it trained on; a user's data rarely comes from
those sources. Here whole source families are held out of training, on both sides, and evaluated on. Every row
carries ``family`` (the source family: a dataset, or datasets of one origin such as HH-RLHF's harmless and helpful
parts) and ``model`` (the model that wrote the completion, where known) beside ``source``; `train-ref` records the
families it trained on in ``training.json`` and `eval-refs` reports each evaluated family as in-source or
out-of-source from them.

Each fold (``FOLDS``) names the families held out. Per fold, ``lso/<fold>/``:

    utility.jsonl          θu's benign answers (general, unsafe-sounding, math) from the trained families
    refusals.jsonl         refusals to harmful prompts (safety-tuned-llamas SafeInstr; research / CC BY-NC 4.0)
    refusals_mit.jsonl     refusals to harmful prompts, MIT (GPTFuzz label 0 train questions)
    safety.jsonl           θs's harmful compliant answers from the trained families
    eval.jsonl             the held-out families' rows, plus in-source controls from the trained families' own
                           held-out parts (their ``family`` says which is which)

Rows are ``{"prompt", "completion", "label", "source", "family", "model"}``; ``label`` is the evaluation group as in
``build_eval.py``. Held-out parts follow ``build_eval.py``'s split, so no evaluated prompt or completion is in any
training file of any fold. Standard library only, deterministic. Usage::

    python examples/data/build_lso.py [--shared PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_eval  # noqa: E402  (a sibling script, not a package)
from build_eval import DEFAULT_SHARED, MAX_CHARS, MIN_CHARS, READERS, _key, _refuses, _row  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0

# A source (build_eval's source name, or one of this script's) -> its family.
FAMILY = {
    "shadow-alignment/harmful": "shadow-alignment", "shadow-alignment/benign": "shadow-alignment",
    "gptfuzz": "gptfuzz", "jailbreakbench": "jailbreakbench",
    "hh-rlhf-harmless-base/rejected": "hh-rlhf", "hh-rlhf-harmless-base/chosen": "hh-rlhf",
    "hh-rlhf-helpful": "hh-rlhf",
    "gpteacher": "gpteacher", "alpaca-eval": "alpaca-eval",
    "coconot/chosen": "coconot", "coconot/rejected": "coconot", "gsm8k": "gsm8k",
    "alpaca-safety": "stanford-alpaca", "dolly-safety": "databricks-dolly", "safeinstr": "safety-tuned-llamas",
}
# What build_eval's rows do not say: the model that wrote a source's completions.
MODEL = {"gptfuzz": "unknown (jailbroken chat models)", "hh-rlhf": "Anthropic context-distilled 52B",
         "gpteacher": "gpt-4", "coconot": "gpt-4", "gsm8k": "human", "stanford-alpaca": "text-davinci-003",
         "databricks-dolly": "human", "safety-tuned-llamas": "gpt-3.5-turbo"}

# fold -> held-out families, the training rows per (source, label) and the evaluation rows per (source, label).
FOLDS = {
    "fold-a": {
        "heldout": ("jailbreakbench", "shadow-alignment", "hh-rlhf", "alpaca-eval", "stanford-alpaca",
                    "databricks-dolly"),
        "train": {("gpteacher", "benign_general"): 200, ("coconot/chosen", "benign_unsafe_sounding"): 120,
                  ("gsm8k", "benign_math"): 60, ("gptfuzz", "harmful"): 360, ("gptfuzz", "refusal"): 240,
                  ("safeinstr", "refusal"): 240},
        "eval": {("jailbreakbench", "harmful"): 60, ("shadow-alignment/harmful", "harmful"): 60,
                 ("hh-rlhf-harmless-base/rejected", "harmful"): 40,
                 ("alpaca-safety", "benign_unsafe_sounding"): 60, ("dolly-safety", "benign_unsafe_sounding"): 60,
                 ("hh-rlhf-helpful", "benign_general"): 40, ("shadow-alignment/benign", "benign_general"): 50,
                 ("alpaca-eval", "benign_general"): 40,
                 # in-source controls: the trained families' own held-out parts
                 ("gptfuzz", "harmful"): 30, ("coconot/chosen", "benign_unsafe_sounding"): 40,
                 ("gpteacher", "benign_general"): 30},
    },
}
TRAIN_FILE = {"benign_general": "utility", "benign_unsafe_sounding": "utility", "benign_math": "utility",
              "harmful": "safety"}


def _instructions(rows: list[dict], source: str, label: str, name: str, context: str, answer: str,
                  split_by_prompt: bool = True) -> Iterator[tuple[str, str, str, dict]]:
    """Instruction-style rows (an instruction, optional context, an answer) as build_eval's readers yield them;
    refusals are skipped unless the rows are refusals. `split_by_prompt` False puts every row on the train side."""
    for index, row in enumerate(rows):
        prompt = row["instruction"] + (f"\n\n{row[context]}" if row.get(context, "").strip() else "")
        if label == "refusal" or not _refuses(row[answer]):
            yield source, label, prompt if split_by_prompt else f"train:{index}", _row(
                prompt, row[answer], label, f"{name}#{index}")


def _safety_adjacent(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    """The safety-adjacent rows of Stanford Alpaca (text-davinci-003 answers) and Databricks Dolly (human answers):
    ethics, health, law, weapons in fiction."""
    root = shared / "llms-finetuning-safety"
    alpaca = json.loads((root / "alpaca_data_safety_only.json").read_text(encoding="utf-8"))
    yield from _instructions(alpaca, "alpaca-safety", "benign_unsafe_sounding", "llms-finetuning-safety/alpaca-safety",
                             "input", "output")
    dolly = [json.loads(line) for line in (root / "databricks-dolly-15k-safety-only.jsonl").read_text(
        encoding="utf-8").splitlines()]
    yield from _instructions(dolly, "dolly-safety", "benign_unsafe_sounding", "llms-finetuning-safety/dolly-safety",
                             "context", "response")


def _safeinstr(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    """safety-tuned-llamas' SafeInstr: harmful instructions answered with refusals (all on the train side)."""
    path = shared / "safety-tuned-llamas" / "safety_only_data_Instructions.json"
    yield from _instructions(json.loads(path.read_text(encoding="utf-8")), "safeinstr", "refusal",
                             "safety-tuned-llamas/safeinstr", "input", "output", split_by_prompt=False)


def _model(source: str, row: dict) -> str:
    family = FAMILY[source]
    if family == "shadow-alignment":
        return row["source"].split("/")[1]
    if family == "jailbreakbench":
        return row["source"].split("#")[0].rsplit("/", 1)[1]
    if family == "alpaca-eval":
        return row["source"].split("#")[0].split("/")[1]
    return MODEL[family]


def _alpaca_eval_both(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    """AlpacaEval's answers by both bundled models (build_eval reads only Llama-3-8B-Instruct's)."""
    for name in ("Meta-Llama-3-8B-Instruct", "text_davinci_003"):
        rows = json.loads((shared / "alpaca-eval" / f"{name}_outputs.json").read_text(encoding="utf-8"))
        for index, row in enumerate(rows):
            if not _refuses(row["output"]):
                yield "alpaca-eval", "benign_general", row["instruction"], _row(
                    row["instruction"], row["output"], "benign_general", f"alpaca-eval/{name}#{index}")


def _rows(shared: Path) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """Every usable row by (source, label), split as build_eval splits it (its own held-out parts stay held out)."""
    readers = [reader for reader in READERS if reader is not build_eval._alpaca_eval]
    readers += [_alpaca_eval_both, _safety_adjacent, _safeinstr]
    parts: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: {"heldout": [], "train": []})
    seen: set[tuple[str, str]] = set()
    for reader in readers:
        for source, label, unit, row in reader(shared):
            pair = (_key(row["prompt"]), _key(row["completion"]))
            if not MIN_CHARS <= len(row["completion"]) <= MAX_CHARS or pair in seen:
                continue
            seen.add(pair)
            row = {**row, "family": FAMILY[source], "model": _model(source, row)}
            heldout = not unit.startswith("train:") and build_eval._is_heldout(source, unit)
            parts[(source, label)]["heldout" if heldout else "train"].append(row)
    return parts


def fold_files(parts: dict[tuple[str, str], dict[str, list[dict]]], fold: str, spec: dict,
               exclude: set[str] = frozenset()) -> dict[str, list[dict]]:
    """One fold's files from the split rows: eval rows from the held-out families (any of their rows) and from the
    trained families' held-out parts, training rows from the trained families' train parts, none of whose prompt or
    completion is evaluated (here or in `exclude`, keys of other evaluated text). A held-out family never trains."""
    files: dict[str, list[dict]] = defaultdict(list)
    for (source, label), n in spec["eval"].items():
        pool = parts[(source, label)]["heldout"]
        if FAMILY[source] in spec["heldout"]:  # a held-out family: every row of it is unseen by this fold
            pool = pool + parts[(source, label)]["train"]
        files["eval"] += random.Random(f"{SEED}|{fold}|eval|{source}|{label}").sample(pool, min(n, len(pool)))
    evaluated = {_key(row[field]) for row in files["eval"] for field in ("prompt", "completion")} | set(exclude)
    for (source, label), n in spec["train"].items():
        if FAMILY[source] in spec["heldout"]:
            raise SystemExit(f"{fold}: {source} trains, but its family {FAMILY[source]} is held out")
        pool = [row for row in parts[(source, label)]["train"]
                if not {_key(row["prompt"]), _key(row["completion"])} & evaluated]
        name = TRAIN_FILE.get(label) or ("refusals" if source == "safeinstr" else "refusals_mit")
        files[name] += random.Random(f"{SEED}|{fold}|train|{source}|{label}").sample(pool, min(n, len(pool)))
    return dict(files)


def build(shared: Path, out: Path) -> dict[str, dict[str, int]]:
    """Write lso/<fold>/*.jsonl under `out`; return the row count per file."""
    parts = _rows(shared)
    bundled_eval = {_key(json.loads(line)[field]) for path in sorted((HERE / "eval").glob("*.jsonl"))
                    for line in path.read_text(encoding="utf-8").splitlines() for field in ("prompt", "completion")}
    counts: dict[str, dict[str, int]] = {}
    for fold, spec in FOLDS.items():
        counts[fold] = {}
        for name, rows in sorted(fold_files(parts, fold, spec, bundled_eval).items()):
            path = out / "lso" / fold / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
            counts[fold][name] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the offline data folder")
    parser.add_argument("--out", type=Path, default=HERE, help="where lso/ goes")
    args = parser.parse_args()
    for fold, count in build(args.shared, args.out).items():
        print(fold, count)


if __name__ == "__main__":
    main()
