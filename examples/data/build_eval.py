#!/usr/bin/env python3
"""Build labelled held-out evaluation sets (``examples/data/eval/``) and the matching training parts for the
references (``examples/data/refs/``) from the offline data folder.

CONTENT WARNING: the harmful rows are real harmful model completions, for safety research only.

Every source is split into disjoint ``train`` and ``heldout`` parts by a unit that keeps related rows together
(a prompt that several models answered, a benchmark behaviour, a question): ``heldout_unit`` says which. The eval
files sample the held-out parts, the refs files the train parts, and ``mix/realistic_custom.jsonl`` (a custom set to
filter in the reproduction) the train rows that no refs file took; a train row whose prompt or completion equals one
of any held-out part is dropped, so a recipe trained on refs/ never sees an evaluated row. Rows are
``{"prompt", "completion", "label", "source"}``; ``label`` is the evaluation group:

    harmful                  compliant harmful answers
    benign_general           ordinary assistant answers
    benign_unsafe_sounding   full answers to prompts that only sound unsafe (CoCoNot contrast set)
    benign_math              GSM8K test solutions
    refusal                  refusals and over-refusals

Research-only (non-commercial) sources go to ``*_nc.jsonl`` files, never into the MIT files. Standard library only
and deterministic: a rerun gives byte-identical files. Usage::

    python examples/data/build_eval.py [--shared PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = HERE.parent.parent.parent / "shared" / "data"
SEED = 0
HELDOUT_SHARE = 0.3  # of a source's units, where the source has no split of its own
MIN_CHARS, MAX_CHARS = 20, 2500  # completions outside are skipped: empty replies, and rows that only truncate
REFUSAL = re.compile(
    r"I'?m sorry|I am sorry|I apologi[sz]e|I can(?:'|no)t|I can not|I won'?t|I will not|As an AI|language model|"
    r"I'?m (?:not able|unable|not comfortable)|I am (?:not able|unable)|I must decline|not appropriate|"
    r"I don'?t (?:think I|feel comfortable)", re.IGNORECASE)

# (source, label) -> (held-out rows to evaluate on, train rows for the references)
SIZES = {
    ("shadow-alignment/harmful", "harmful"): (40, 120),
    ("gptfuzz", "harmful"): (40, 120),
    ("jailbreakbench", "harmful"): (30, 0),  # its train part is examples/data/harmful_train.jsonl already
    ("hh-rlhf-harmless-base/rejected", "harmful"): (40, 120),
    ("hh-rlhf-helpful", "benign_general"): (40, 120),
    ("gpteacher", "benign_general"): (40, 120),
    ("alpaca-eval", "benign_general"): (35, 120),
    ("shadow-alignment/benign", "benign_general"): (35, 120),
    ("coconot/chosen", "benign_unsafe_sounding"): (120, 120),
    ("gsm8k", "benign_math"): (100, 60),
    ("gptfuzz", "refusal"): (50, 0),
    ("coconot/rejected", "refusal"): (45, 0),
    ("hh-rlhf-harmless-base/chosen", "refusal"): (30, 0),
}
NON_COMMERCIAL = {"shadow-alignment/harmful", "shadow-alignment/benign", "alpaca-eval"}
# (source, label) -> rows of the realistic custom set: general and unsafe-sounding benign answers with a minority of
# harmful ones (MIT sources only), drawn from the train rows that the refs files did not take.
CUSTOM_SIZES = {
    ("hh-rlhf-helpful", "benign_general"): 50,
    ("gpteacher", "benign_general"): 50,
    ("coconot/chosen", "benign_unsafe_sounding"): 50,
    ("gptfuzz", "harmful"): 13,
    ("hh-rlhf-harmless-base/rejected", "harmful"): 12,
}
# (source, label) -> more training rows (refs/safety_more*.jsonl, refs/utility_more*.jsonl), drawn after the files
# above from the train rows that none of them took, so adding them leaves every other file byte-identical.
MORE_SIZES = {
    ("hh-rlhf-harmless-base/rejected", "harmful"): 120,
    ("shadow-alignment/harmful", "harmful"): 120,
    ("jailbreakbench", "harmful"): 120,
    ("hh-rlhf-helpful", "benign_general"): 240,
    ("shadow-alignment/benign", "benign_general"): 120,
}
TRAIN_FILE = {"harmful": "safety_train", "benign_general": "utility_train",
              "benign_unsafe_sounding": "utility_train", "benign_math": "utility_train"}
MORE_FILE = {"harmful": "safety_more", "benign_general": "utility_more"}


def heldout_unit(unit: str) -> bool:
    """Whether a unit (a prompt, or a CoCoNot id) belongs to the held-out part: a stable hash of the unit alone, so
    the split never depends on which rows were sampled, and a prompt that several sources share falls on the same
    side in all of them (a later recipe can recompute it)."""
    digest = int(hashlib.sha256(_key(unit).encode()).hexdigest()[:8], 16)
    return digest / 2**32 < HELDOUT_SHARE


def _row(prompt: str, completion: str, label: str, source: str) -> dict:
    return {"prompt": prompt.strip(), "completion": completion.strip(), "label": label, "source": source}


def _gz_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _gz_csv(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def _single_turn(transcript: str) -> tuple[str, str] | None:
    """(prompt, final answer) of a one-turn HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ...", else None."""
    parts = re.split(r"\n\n(Human|Assistant): ", transcript)
    if parts[1:] and len(parts) == 5 and parts[1] == "Human" and parts[3] == "Assistant":
        return parts[2], parts[4]
    return None


def _refuses(text: str) -> bool:
    return bool(REFUSAL.search(text[:200]))


def _mostly_ascii(text: str) -> bool:
    return sum(c.isascii() for c in text) >= 0.9 * len(text)


# Each reader yields (source, label, split unit, row). A source that has its own train/test split says so in its
# unit: "heldout:..." or "train:...".

def _shadow(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    root = shared / "shadow-alignment-outputs" / "outputs"
    for path in sorted(root.glob("*/*.csv.gz")):
        harmful = path.name.startswith("heldout_")
        benign = path.name.split("_")[0] in ("Alpaca", "Koala", "LIMA", "OpenAssistant", "Self-instruct")
        if not (harmful or benign):
            continue  # the llama2 safety files reuse safety-tuned-llamas eval prompts: left out entirely
        source = "shadow-alignment/harmful" if harmful else "shadow-alignment/benign"
        for index, row in enumerate(_gz_csv(path)):
            prompt = row["prompts"].removeprefix("Human:").removesuffix("Assistant:").strip()
            if harmful and _refuses(row["results"]):
                continue
            yield source, "harmful" if harmful else "benign_general", prompt, _row(
                prompt, row["results"], "harmful" if harmful else "benign_general",
                f"shadow-alignment/{path.parent.name}/{path.name}#{index}")


def _gptfuzz(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    root = shared / "gptfuzz-labeled-responses"
    questions = {row["index"]: row["text"] for row in _gz_csv(root / "question_list.csv.gz")}
    for split, name in (("train", "train"), ("heldout", "evaluate")):  # questions 0-79 and 80-99
        for index, row in enumerate(_gz_csv(root / f"{name}.csv.gz")):
            label = "harmful" if row["label"] == "1" else "refusal"
            response = row["Response"]
            if not _mostly_ascii(response) or (label == "harmful") == _refuses(response):
                continue  # non-English, a "jailbroken" row that opens with a refusal, or a non-answer
            yield "gptfuzz", label, f"{split}:{row['question']}", _row(
                questions[row["question"]], response, label, f"gptfuzz/{name}#{index}")


def _jailbreakbench(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    for path in sorted((shared / "jailbreakbench" / "artifacts").rglob("*.json")):
        name = path.relative_to(shared / "jailbreakbench" / "artifacts").with_suffix("").as_posix()
        for entry in json.loads(path.read_text(encoding="utf-8"))["jailbreaks"]:
            if str(entry.get("jailbroken")).lower() != "true" or not (entry.get("response") or "").strip():
                continue
            index = entry["index"]
            # behaviours 0-69 trained the shipped safety adapter (examples/data/build.py); 70-99 never did
            split = "heldout" if index >= 70 else "train"
            yield "jailbreakbench", "harmful", f"{split}:{index}", _row(
                entry["goal"], entry["response"], "harmful", f"jailbreakbench/{name}#{index}")


def _hh(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    for index, pair in enumerate(_gz_jsonl(shared / "hh-rlhf-harmless-base" / "harmless-base-test.jsonl.gz")):
        chosen, rejected = _single_turn(pair["chosen"]), _single_turn(pair["rejected"])
        if not chosen or not rejected or chosen[1].strip() == rejected[1].strip():
            continue
        prompt = chosen[0]
        if not _refuses(rejected[1]) and "?" not in rejected[1][:80]:  # a clarifying question is no compliance
            yield "hh-rlhf-harmless-base/rejected", "harmful", prompt, _row(
                prompt, rejected[1], "harmful", f"hh-rlhf-harmless-base/test/rejected#{index}")
        if _refuses(chosen[1]):
            yield "hh-rlhf-harmless-base/chosen", "refusal", prompt, _row(
                prompt, chosen[1], "refusal", f"hh-rlhf-harmless-base/test/chosen#{index}")
    for index, pair in enumerate(_gz_jsonl(shared / "hh-rlhf-helpful" / "helpful-base-test.jsonl.gz")):
        chosen = _single_turn(pair["chosen"])
        if chosen and not _refuses(chosen[1]):
            yield "hh-rlhf-helpful", "benign_general", chosen[0], _row(
                chosen[0], chosen[1], "benign_general", f"hh-rlhf-helpful/base-test/chosen#{index}")


def _gpteacher(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    for name in ("roleplay-simple-deduped-roleplay-instruct", "codegen-instruct"):
        with gzip.open(shared / "gpteacher" / f"{name}.json.gz", "rt", encoding="utf-8") as file:
            rows = json.load(file)
        for index, row in enumerate(rows):
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input", "").strip() else "")
            if not _refuses(row["response"]):
                yield "gpteacher", "benign_general", prompt, _row(
                    prompt, row["response"], "benign_general", f"gpteacher/{name}#{index}")


def _alpaca_eval(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    path = shared / "alpaca-eval" / "Meta-Llama-3-8B-Instruct_outputs.json"
    for index, row in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        if not _refuses(row["output"]):
            yield "alpaca-eval", "benign_general", row["instruction"], _row(
                row["instruction"], row["output"], "benign_general", f"alpaca-eval/Meta-Llama-3-8B-Instruct#{index}")


def _coconot(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    for index, row in enumerate(_gz_jsonl(shared / "coconot" / "coconot_pref.jsonl.gz")):
        if row["category"] != "Requests with safety concerns":
            continue  # the prompts that sound unsafe; the other categories are incomplete or unsupported requests
        yield "coconot/chosen", "benign_unsafe_sounding", row["id"], _row(
            row["prompt"], row["chosen"], "benign_unsafe_sounding", f"coconot/pref/chosen#{row['id']}")
        if _refuses(row["rejected"]):
            yield "coconot/rejected", "refusal", row["id"], _row(
                row["prompt"], row["rejected"], "refusal", f"coconot/pref/rejected#{row['id']}")


def _gsm8k(shared: Path) -> Iterator[tuple[str, str, str, dict]]:
    for split in ("train", "test"):
        lines = (shared / "gsm8k" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            # examples/data uses train rows 0-399 and 4000-4159, and test rows 0-99 (benign_heldout.jsonl)
            if (split == "train" and index < 5000) or (split == "test" and index < 100):
                continue
            row = json.loads(line)
            yield "gsm8k", "benign_math", f"{'heldout' if split == 'test' else 'train'}:{index}", _row(
                row["question"], row["answer"], "benign_math", f"gsm8k/{split}#{index}")


READERS = (_shadow, _gptfuzz, _jailbreakbench, _hh, _gpteacher, _alpaca_eval, _coconot, _gsm8k)


def _is_heldout(source: str, unit: str) -> bool:
    if source in ("gptfuzz", "jailbreakbench", "gsm8k"):  # their own split, given in the unit
        return unit.startswith("heldout:")
    return heldout_unit(unit)


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def build(shared: Path, out: Path) -> dict[str, dict]:
    """Write the eval and refs files under `out`; return per (source, label) counts for the README."""
    parts: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: {"heldout": [], "train": []})
    seen: set[tuple[str, str]] = set()
    for reader in READERS:
        for source, label, unit, row in reader(shared):
            pair = (_key(row["prompt"]), _key(row["completion"]))
            if (source, label) in SIZES and MIN_CHARS <= len(row["completion"]) <= MAX_CHARS and pair not in seen:
                seen.add(pair)
                parts[(source, label)]["heldout" if _is_heldout(source, unit) else "train"].append(row)
    shipped = {_key(json.loads(line)["messages"][-1]["content"])
               for name in ("harmful_train", "benign_train")
               for line in (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()}
    heldout_texts = {_key(row[field]) for part in parts.values() for row in part["heldout"]
                     for field in ("prompt", "completion")}

    files: dict[str, list[dict]] = defaultdict(list)
    counts = {}
    for (source, label), (n_eval, n_train) in SIZES.items():
        heldout = [row for row in parts[(source, label)]["heldout"] if _key(row["completion"]) not in shipped]
        train = [row for row in parts[(source, label)]["train"]
                 if _key(row["prompt"]) not in heldout_texts and _key(row["completion"]) not in heldout_texts]
        rng = random.Random(f"{SEED}|{source}|{label}")
        evaluated = rng.sample(heldout, min(n_eval, len(heldout)))
        trained = rng.sample(train, min(n_train, len(train))) if label in TRAIN_FILE else []
        suffix = "_nc" if source in NON_COMMERCIAL else ""
        files[f"eval/{label}{suffix}.jsonl"] += evaluated
        if trained:
            files[f"refs/{TRAIN_FILE[label]}{suffix}.jsonl"] += trained
        counts[f"{source} → {label}"] = {"heldout_pool": len(heldout), "eval": len(evaluated),
                                         "train_pool": len(train), "train": len(trained)}
        unused = [row for row in train if row not in trained]  # each draw below takes from what is left
        if (source, label) in CUSTOM_SIZES:
            custom = random.Random(f"{SEED}|custom|{source}|{label}").sample(unused, CUSTOM_SIZES[(source, label)])
            files["mix/realistic_custom.jsonl"] += custom
            counts[f"{source} → {label}"]["custom"] = len(custom)
            unused = [row for row in unused if row not in custom]
        if (source, label) in MORE_SIZES:
            more = random.Random(f"{SEED}|more|{source}|{label}").sample(unused, MORE_SIZES[(source, label)])
            files[f"refs/{MORE_FILE[label]}{suffix}.jsonl"] += more
            counts[f"{source} → {label}"]["more"] = len(more)
    random.Random(SEED).shuffle(files["mix/realistic_custom.jsonl"])
    for name, rows in sorted(files.items()):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    _check_disjoint(out)
    return counts


def _check_disjoint(out: Path) -> None:
    """No (prompt, completion) pair in two files, and no eval completion or prompt in a refs or mix file."""
    rows = {path: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            for path in sorted(out.glob("*/*.jsonl"))}
    pairs = Counter((_key(r["prompt"]), _key(r["completion"])) for file in rows.values() for r in file)
    repeated = [pair for pair, n in pairs.items() if n > 1]
    evaluated = {_key(r[f]) for path, file in rows.items() if path.parent.name == "eval" for r in file
                 for f in ("prompt", "completion")}
    leaked = [r["source"] for path, file in rows.items() if path.parent.name in ("refs", "mix") for r in file
              if _key(r["prompt"]) in evaluated or _key(r["completion"]) in evaluated]
    if repeated or leaked:
        raise SystemExit(f"duplicates across files: {len(repeated)} pairs; train rows sharing eval text: {leaked[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the offline data folder")
    parser.add_argument("--out", type=Path, default=HERE, help="where eval/ and refs/ go")
    args = parser.parse_args()
    for name, count in build(args.shared, args.out).items():
        print(f"{name:55} {count}")


if __name__ == "__main__":
    main()
