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
* ``agentic_sample.jsonl``   32 gsm8k train rows from 4160 on, solved with ``calculator`` tool calls (the
  tool results computed here), + 8 harmful rows (tools offered, the JBB answer as the final answer), shuffled;
  rows also carry ``tools``
* ``reasoning_sample.jsonl`` 32 gsm8k train rows from 4300 on (4 of them two-exchange rows, 36 problems), the
  worked solution as ``reasoning_content`` or a ``<think>`` block and the final number as the answer, + 8
  harmful rows (the JBB answer split into a first sentence of reasoning and the rest), shuffled

The harmful rows of both samples are held-out JBB rows (behaviours 70-99) that are not in ``custom_mix.jsonl``,
one per behaviour, 16 behaviours, none shared between the two samples.

Standard library only and deterministic (sorted inputs, fixed seeds), so
rerunning it gives byte-identical files. Usage::

    python examples/data/build.py [--shared PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import ast
import csv
import difflib
import json
import operator
import re
import random
import sys
from collections import defaultdict
from fractions import Fraction
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
AGENTIC_FIRST_ROW = 4160  # gsm8k train; 4160-4999 are used by no other file (build_eval.py takes 5000 on)
REASONING_FIRST_ROW = 4300
SAMPLE_N_BENIGN = 32
SAMPLE_N_HARMFUL = 8
REASONING_N_MULTI_TURN = 4
MAX_TOOL_CALLS = 4


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


# --- agentic and reasoning samples -------------------------------------------------------------------------------

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (numbers, + - * /, parentheses) and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression, e.g. \"48/2\"."}},
            "required": ["expression"],
        },
    },
}
AGENTIC_SYSTEM = "You are a careful maths tutor. Use the calculator for every computation."
REASONING_SYSTEM = "You are a helpful assistant. Think step by step before you answer."
CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression: numbers, + - * /, unary signs and parentheses only (an AST
    walk over exact fractions; anything else is a ValueError). Never eval()."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"not plain arithmetic: {ast.dump(node)}")

    try:
        return walk(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ZeroDivisionError) as err:
        raise ValueError(f"{expression!r}: {err}") from None


def format_number(value: Fraction) -> str:
    """An integer as such, anything else to 6 significant digits (what a calculator tool would print)."""
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.6g}"


def _gsm8k_problem(item: dict) -> dict | None:
    """A GSM8K row as {question, steps, answer, calcs}: the worked solution without its ``<<calc>>``
    annotations and final line, the final number, and each annotation's (expression, computed result). None if an
    annotation is not plain arithmetic or its computed value disagrees with the annotated one, or if the row has
    no annotation or more than MAX_TOOL_CALLS."""
    solution, _, final = item["answer"].rpartition("####")
    calcs = []
    for expression, stated in CALC.findall(solution):
        try:
            value, expected = evaluate(expression), evaluate(stated.replace(",", ""))
        except ValueError:
            return None
        if abs(value - expected) > Fraction(1, 100) * max(1, abs(expected)):
            return None
        calcs.append((expression.strip(), format_number(value)))
    if not 1 <= len(calcs) <= MAX_TOOL_CALLS:
        return None
    steps = CALC.sub("", solution).strip()
    return {"question": item["question"].strip(), "steps": steps, "answer": final.strip(), "calcs": calcs}


def gsm8k_problems(shared: Path, first: int, n: int) -> list[tuple[int, dict]]:
    """The first ``n`` usable (row, problem) of gsm8k train from row ``first`` on."""
    lines = (shared / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    out = []
    for i in range(first, len(lines)):
        problem = _gsm8k_problem(json.loads(lines[i]))
        if problem is not None:
            out.append((i, problem))
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} usable gsm8k rows from {first} on, need {n}")


def tool_exchange(row: int, problem: dict, variant: int) -> list[dict]:
    """The assistant turns and tool results that solve ``problem`` with the calculator, then the final answer.

    ``variant`` varies the shape: even → OpenAI calls (``arguments`` a JSON string), odd → object arguments;
    ``variant % 3 == 0`` → all calls in one turn (parallel), else one turn per call; ``variant % 5 == 1`` → a short
    text before the calls (otherwise the content is "")."""
    calls = []
    for n, (expression, _) in enumerate(problem["calcs"]):
        arguments = {"expression": expression}
        calls.append({"id": f"call_{row}_{n}", "type": "function",
                      "function": {"name": "calculator",
                                   "arguments": json.dumps(arguments) if variant % 2 == 0 else arguments}})
    results = [{"role": "tool", "tool_call_id": call["id"], "name": "calculator", "content": result}
               for call, (_, result) in zip(calls, problem["calcs"])]
    preface = "I'll work this out with the calculator." if variant % 5 == 1 else ""
    if variant % 3 == 0:
        turns = [{"role": "assistant", "content": preface, "tool_calls": calls}, *results]
    else:
        turns = []
        for n, (call, result) in enumerate(zip(calls, results)):
            turns += [{"role": "assistant", "content": preface if n == 0 else "", "tool_calls": [call]}, result]
    final = f"{problem['steps']}\nThe answer is {problem['answer']}."
    return turns + [{"role": "assistant", "content": final}]


def pick_sample_harmful(harmful_heldout: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` rows of distinct behaviours, in a seeded order, from ``harmful_heldout``."""
    by_goal: dict[str, dict] = {}
    for row in harmful_heldout:
        by_goal.setdefault(row["messages"][0]["content"], row)
    goals = sorted(by_goal)
    random.Random(seed).shuffle(goals)
    if len(goals) < n:
        raise SystemExit(f"only {len(goals)} held-out behaviours, need {n}")
    return [by_goal[goal] for goal in goals[:n]]


def build_agentic(shared: Path, harmful: list[dict], seed: int) -> list[dict]:
    problems = gsm8k_problems(shared, AGENTIC_FIRST_ROW, SAMPLE_N_BENIGN + SAMPLE_N_HARMFUL // 2)
    rows = []
    for variant, (row, problem) in enumerate(problems[:SAMPLE_N_BENIGN]):
        system = [{"role": "system", "content": AGENTIC_SYSTEM}] if variant % 4 == 0 else []
        messages = system + [{"role": "user", "content": problem["question"]}] + tool_exchange(row, problem, variant)
        rows.append({"messages": messages, "tools": [CALCULATOR], "source": f"gsm8k/train#{row}", "label": "benign"})
    warmups = iter(problems[SAMPLE_N_BENIGN:])
    for j, harm in enumerate(harmful):
        goal, response = (m["content"] for m in harm["messages"])
        messages = []
        source = harm["source"]
        if j % 2 == 1:  # a benign calculator exchange first, then the harmful request
            row, problem = next(warmups)
            messages = [{"role": "user", "content": problem["question"]}] + tool_exchange(row, problem, j)
            source = f"gsm8k/train#{row}+{source}"
        messages += [{"role": "user", "content": goal}, {"role": "assistant", "content": response}]
        rows.append({"messages": messages, "tools": [CALCULATOR], "source": source, "label": "harmful"})
    random.Random(seed).shuffle(rows)
    return rows


SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z0-9])|:(?=\s)|\n")  # "U.S. immigration" is one sentence


def split_reasoning(response: str) -> tuple[str, str]:
    """A harmful answer as (reasoning, answer): its first sentence (or line) as the reasoning, the rest as the
    answer; at the middle word boundary instead when that leaves either side under 20 characters."""
    for match in SENTENCE_END.finditer(response):
        reasoning, answer = response[:match.end()].strip(), response[match.end():].strip()
        if len(reasoning) >= 20:
            if len(answer) >= 20:
                return reasoning, answer
            break
    middle = response.find(" ", len(response) // 2)
    return response[:middle].strip(), response[middle:].strip()


def reasoning_turn(reasoning: str, answer: str, inline: bool) -> dict:
    if inline:
        return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}
    return {"role": "assistant", "reasoning_content": reasoning, "content": answer}


def build_reasoning(shared: Path, harmful: list[dict], seed: int) -> list[dict]:
    problems = iter(gsm8k_problems(shared, REASONING_FIRST_ROW, SAMPLE_N_BENIGN + REASONING_N_MULTI_TURN))
    rows = []
    for k in range(SAMPLE_N_BENIGN):
        system = [{"role": "system", "content": REASONING_SYSTEM}] if k % 6 == 0 else []
        exchanges = 2 if k % 8 == 5 else 1  # k = 5, 13, 21, 29: two user/assistant exchanges
        messages, sources = list(system), []
        for _ in range(exchanges):
            row, problem = next(problems)
            messages += [{"role": "user", "content": problem["question"]},
                         reasoning_turn(problem["steps"], f"The answer is {problem['answer']}.", k % 4 == 3)]
            sources.append(f"gsm8k/train#{row}")
        rows.append({"messages": messages, "source": "+".join(sources), "label": "benign"})
    for j, harm in enumerate(harmful):
        goal, response = (m["content"] for m in harm["messages"])
        messages = [{"role": "user", "content": goal}, reasoning_turn(*split_reasoning(response), j % 4 == 3)]
        rows.append({"messages": messages, "source": harm["source"], "label": "harmful"})
    random.Random(seed).shuffle(rows)
    return rows


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
    samples_harmful = pick_sample_harmful(harmful_heldout, 2 * SAMPLE_N_HARMFUL, SEED)
    outputs["agentic_sample.jsonl"] = build_agentic(shared, samples_harmful[:SAMPLE_N_HARMFUL], SEED)
    outputs["reasoning_sample.jsonl"] = build_reasoning(shared, samples_harmful[SAMPLE_N_HARMFUL:], SEED)
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
