#!/usr/bin/env python3
"""Build the bundled example datasets in ``examples/data/``.

CONTENT WARNING: the harmful files contain real harmful model completions.
They are for safety research only.

Inputs (read-only), from the offline data folder (``--shared``):

* ``jailbreakbench/artifacts/**/*.json`` (MIT): real model responses to
  jailbreak prompts. Only entries judged ``jailbroken`` with a non-empty
  ``response`` are used; the plain JBB ``goal`` is the user prompt (not the
  jailbreak ``prompt``). Behaviour indices 0-69 are for training, 70-99 are
  held out.
* ``gsm8k/{train,test}.jsonl`` (MIT): benign maths word problems.
* ``harmbench/harmbench_behaviors_text_test.csv`` (MIT): harmful prompts for
  the reproduction's refusal test; behaviours close to a JBB goal are left out.
* ``llms-finetuning-safety/databricks-dolly-15k-safety-only.jsonl`` (Dolly,
  CC BY-SA 3.0): benign answers to prompts that a safety keyword filter
  caught, i.e. benign text that sounds unsafe.

Outputs (JSONL, one object per line: ``messages``, ``source``, ``label``):

* ``harmful_train.jsonl``    harmful, behaviour indices 0-69
* ``benign_train.jsonl``     gsm8k train rows 0-399
* ``custom_mix.jsonl``       gsm8k train rows 4000-4159 + 40 held-out harmful rows, shuffled
* ``harmful_heldout.jsonl``  harmful, indices 70-99, minus those in custom_mix
* ``benign_heldout.jsonl``   gsm8k test rows 0-99
* ``benign_safety_adjacent.jsonl``  100 Dolly safety-only rows without context
* ``harmful_prompts_eval.jsonl``    HarmBench test "standard" prompts, no JBB near-duplicates

Standard library only and deterministic (sorted inputs, fixed seeds), so
rerunning it gives byte-identical files. Usage::

    python examples/data/build.py [--shared PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"

SEED = 0
TRAIN_INDICES = range(0, 70)  # JBB behaviour ids used for the harmful reference
HELDOUT_INDICES = range(70, 100)  # JBB behaviour ids kept out of training
BENIGN_TRAIN_ROWS = range(0, 400)  # gsm8k train
CUSTOM_BENIGN_ROWS = range(4000, 4160)  # gsm8k train (160 rows, disjoint from the above)
CUSTOM_N_HARMFUL = 40
CUSTOM_MAX_PER_BEHAVIOUR = 2
BENIGN_HELDOUT_ROWS = range(0, 100)  # gsm8k test
SAFETY_ADJACENT_ROWS = 100  # Dolly safety-only rows without context, seeded sample
# A HarmBench behaviour this similar to a JBB goal (difflib ratio, lower case) counts as the same request: the
# reproduction's custom set holds JBB goals, so such prompts would not be held out.
NEAR_DUPLICATE_RATIO = 0.8


def _is_true(value) -> bool:
    """``jailbroken`` is stored as a bool or as the string 'True'/'False'."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return False


def _row(user: str, assistant: str, source: str, label: str) -> dict:
    user, assistant = user.strip(), assistant.strip()
    if not user or not assistant:
        raise ValueError(f"empty content in {source}")
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ],
        "source": source,
        "label": label,
    }


def load_harmful(shared: Path) -> list[tuple[int, str, dict]]:
    """Return (behaviour index, artifact file id, row) for every usable jailbroken entry.

    Sorted by (index, file id); identical (goal, response) pairs are kept once.
    """
    root = shared / "jailbreakbench" / "artifacts"
    files = sorted(root.rglob("*.json"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise SystemExit(f"no artifact files under {root}")
    found = []
    for path in files:
        file_id = path.relative_to(root).with_suffix("").as_posix()  # e.g. PAIR/black_box/vicuna-13b-v1.5
        data = json.loads(path.read_text(encoding="utf-8"))
        for entry in data["jailbreaks"]:
            if not _is_true(entry.get("jailbroken")):
                continue
            response, goal = entry.get("response"), entry.get("goal")
            if not isinstance(response, str) or not response.strip():
                continue
            if not isinstance(goal, str) or not goal.strip():
                continue
            index = int(entry["index"])
            source = f"jailbreakbench/{file_id}#{index}"
            found.append((index, file_id, _row(goal, response, source, "harmful")))
    found.sort(key=lambda t: (t[0], t[1]))
    seen, unique = set(), []
    for index, file_id, row in found:
        key = (row["messages"][0]["content"], row["messages"][1]["content"])
        if key in seen:
            continue
        seen.add(key)
        unique.append((index, file_id, row))
    return unique


def load_gsm8k(shared: Path, split: str, rows: range) -> list[dict]:
    path = shared / "gsm8k" / f"{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    for i in rows:
        item = json.loads(lines[i])
        out.append(_row(item["question"], item["answer"], f"gsm8k/{split}#{i}", "benign"))
    return out


def load_safety_adjacent(shared: Path, n: int, seed: int) -> list[dict]:
    """``n`` Dolly rows that Qi et al.'s safety keyword filter removed, context-free ones only (the user turn
    is then the whole instruction), in seeded random order."""
    path = shared / "llms-finetuning-safety" / "databricks-dolly-15k-safety-only.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    candidates = [i for i, record in enumerate(records) if not record["context"].strip()]
    picked = random.Random(seed).sample(candidates, n)
    return [_row(records[i]["instruction"], records[i]["response"], f"dolly-safety-only#{i}", "benign")
            for i in sorted(picked)]


def load_eval_prompts(shared: Path, jbb_goals: list[str]) -> list[dict]:
    """HarmBench test behaviours of the "standard" kind (no context string, no copyright), minus those that
    repeat a JBB goal."""
    path = shared / "harmbench" / "harmbench_behaviors_text_test.csv"
    with path.open(encoding="utf-8", newline="") as f:
        behaviours = [b for b in csv.DictReader(f) if b["FunctionalCategory"] == "standard"]
    goals = [goal.lower() for goal in jbb_goals]

    def repeats_a_goal(text: str) -> bool:
        return any(difflib.SequenceMatcher(None, text.lower(), goal).ratio() >= NEAR_DUPLICATE_RATIO
                   for goal in goals)

    return [{"prompt": b["Behavior"].strip(), "source": f"harmbench/test#{b['BehaviorID']}",
             "category": b["SemanticCategory"]} for b in behaviours if not repeats_a_goal(b["Behavior"])]


def pick_custom_harmful(heldout: list[tuple[int, str, dict]], n: int, max_per: int, seed: int) -> list[dict]:
    """Pick ``n`` held-out harmful rows, at most ``max_per`` per behaviour, spreading
    the picks over artifact files (least-used file first, never the same file twice
    for one behaviour when another is available). Seeded, so deterministic."""
    rng = random.Random(seed)
    by_index: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for index, file_id, row in heldout:
        by_index[index].append((file_id, row))
    order = sorted(by_index)
    rng.shuffle(order)
    for index in sorted(by_index):  # tie-break order among candidates, seeded
        rng.shuffle(by_index[index])

    file_use: dict[str, int] = defaultdict(int)
    taken: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    picked: list[dict] = []
    for _round in range(max_per):
        for index in order:
            if len(picked) >= n:
                break
            used_files = {f for f, _ in taken[index]}
            cands = [c for c in by_index[index] if c not in taken[index]]
            if not cands:
                continue
            # prefer a file not yet used for this behaviour, then the least-used file overall;
            # min() keeps the (seeded) shuffled order for ties
            best = min(cands, key=lambda c: (c[0] in used_files, file_use[c[0]]))
            taken[index].append(best)
            file_use[best[0]] += 1
            picked.append(best[1])
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} held-out harmful rows available, need {n}")
    return picked


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help=f"offline data folder (default: {DEFAULT_SHARED})")
    ap.add_argument("--out", type=Path, default=HERE, help=f"output folder (default: {HERE})")
    args = ap.parse_args(argv)
    shared, out = args.shared.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    harmful = load_harmful(shared)
    harmful_train = [row for i, _, row in harmful if i in TRAIN_INDICES]
    heldout = [(i, f, row) for i, f, row in harmful if i in HELDOUT_INDICES]
    unknown = [row["source"] for i, _, row in harmful if i not in TRAIN_INDICES and i not in HELDOUT_INDICES]
    if unknown:
        raise SystemExit(f"behaviour index outside 0-99: {unknown[:5]}")

    custom_harmful = pick_custom_harmful(heldout, CUSTOM_N_HARMFUL, CUSTOM_MAX_PER_BEHAVIOUR, SEED)
    custom_sources = {row["source"] for row in custom_harmful}
    harmful_heldout = [row for _, _, row in heldout if row["source"] not in custom_sources]

    custom_mix = load_gsm8k(shared, "train", CUSTOM_BENIGN_ROWS) + custom_harmful
    random.Random(SEED).shuffle(custom_mix)

    outputs = {
        "harmful_train.jsonl": harmful_train,
        "benign_train.jsonl": load_gsm8k(shared, "train", BENIGN_TRAIN_ROWS),
        "custom_mix.jsonl": custom_mix,
        "harmful_heldout.jsonl": harmful_heldout,
        "benign_heldout.jsonl": load_gsm8k(shared, "test", BENIGN_HELDOUT_ROWS),
        "benign_safety_adjacent.jsonl": load_safety_adjacent(shared, SAFETY_ADJACENT_ROWS, SEED),
    }
    for name, rows in outputs.items():
        write_jsonl(out / name, rows)
        n_harm = sum(r["label"] == "harmful" for r in rows)
        print(f"{name:28s} {len(rows):4d} rows ({n_harm} harmful, {len(rows) - n_harm} benign)")
    jbb_goals = sorted({row["messages"][0]["content"] for _, _, row in harmful})
    prompts = load_eval_prompts(shared, jbb_goals)
    write_jsonl(out / "harmful_prompts_eval.jsonl", prompts)
    print(f"{'harmful_prompts_eval.jsonl':28s} {len(prompts):4d} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
