"""A small-scale reproduction of the TOSS paper's claim, on CPU with SmolLM2-135M-Instruct (README.md beside this).

    python examples/reproduce/run.py --out out/reproduce                       # the GSM8K mix, about an hour
    python examples/reproduce/run.py --mix realistic --seeds 0 1 2 --out out/reproduce-realistic

1. Custom set (`--mix`):
   - `gsm8k`: the first `--rows` rows of examples/data/custom_mix.jsonl, GSM8K solutions with about 20% harmful
     compliant answers mixed in, like the paper's RedOrca;
   - `realistic`: examples/data/mix/realistic_custom.jsonl, general assistant answers and benign answers to
     prompts that only sound unsafe, with 14% harmful compliant answers (built by examples/data/build_eval.py).
2. Filter it at one token budget with the `toss-filter` CLI, as a user would: `filter` (toss), `filter --rounds`
   (TOSS-Pro), and `select --strategy sample / first-k / random` on toss's scores; `select --ratio 0` is the
   unfiltered set. Every set keeps empty rows (`--keep-empty`), so row i is custom row i in all of them.
3. LoRA fine-tune the base model on each set, once per `--seeds` seed (same recipe and steps).
4. Measure every model and the base (measure.py) on rows no model or reference saw: NLL of harmful compliant
   answers and of benign ones, and for the GSM8K mix also refusal rate on HarmBench prompts and GSM8K accuracy.
5. Write OUT/results.json, OUT/results.md (the tables: seed means with their range) and OUT/results.png.

Every step skips work whose output already exists in OUT, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import load_from_disk
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from toss_filter.data.tokenize import IGNORE_INDEX, ConversationTokenizer, resolve_format
from toss_filter.default_model import EMBEDDED_MODEL_ID, resolve_model_path
from toss_filter.train import fit_adapter, save_adapter, trainable_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (gsm8k_accuracy, nll_mean, opens_like_the_harmful_rows, paired_difference,  # noqa: E402
                     refusal_rate, response_nll)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
ADAPTERS = REPO / "examples" / "reference-adapters"
STRATEGIES = ("unfiltered", "toss", "toss-pro", "sample", "first-k", "random")
# Harmful answers to JBB behaviours 0-69: the GSM8K mix's harmful rows are behaviours 70-99, and rows 240+ were
# not among the 240 the first safety reference was trained on, so no model in the experiment has seen these.
UNSEEN_HARMFUL_ROWS = range(240, 425)
Messages = list[dict[str, str]]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def messages(row: dict[str, Any]) -> Messages:
    """A bundled row as chat messages: `messages` as it is, or `prompt`/`completion` as one exchange."""
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def sample(path: Path, n: int) -> list[Messages]:
    """A seeded sample of `n` rows: the same rows for every model and training seed, so differences are paired."""
    rows = read_jsonl(path)
    return [messages(row) for row in random.Random(0).sample(rows, min(n, len(rows)))]


@dataclass(frozen=True)
class Mix:
    """A custom set and what the fine-tunes on it are measured on.

    `nll_sets` maps a result key to (its table title, a loader of its conversations given `--eval-rows`): keys that
    start with `harmful` measure safety (higher NLL = safer), with `benign` utility (lower = more useful).
    `generation`: also run the refusal test and GSM8K accuracy (greedy generation, the slow part)."""

    custom: Path
    nll_sets: dict[str, tuple[str, Callable[[int], list[Messages]]]]
    generation: bool


MIXES = {
    "gsm8k": Mix(
        custom=DATA / "custom_mix.jsonl",
        nll_sets={
            "harmful_nll_unseen_behaviours": ("harmful NLL, unseen behaviours", lambda n: random.Random(0).sample(
                [messages(r) for r in read_jsonl(DATA / "harmful_train.jsonl")[UNSEEN_HARMFUL_ROWS.start:]], n)),
            "harmful_nll_custom_behaviours": ("harmful NLL, custom-set behaviours",
                                              lambda n: [messages(r) for r in read_jsonl(DATA / "harmful_heldout.jsonl")[:n]]),
            "benign_nll_gsm8k": ("GSM8K NLL", lambda n: [messages(r) for r in read_jsonl(DATA / "benign_heldout.jsonl")[:n]]),
        },
        generation=True),
    "realistic": Mix(
        custom=DATA / "mix" / "realistic_custom.jsonl",
        nll_sets={
            "harmful_nll_heldout": ("harmful NLL, held-out sources", lambda n: sample(DATA / "eval" / "harmful.jsonl", n)),
            "benign_nll_unsafe_sounding": ("unsafe-sounding benign NLL",
                                           lambda n: sample(DATA / "eval" / "benign_unsafe_sounding.jsonl", n)),
            "benign_nll_general": ("general benign NLL", lambda n: sample(DATA / "eval" / "benign_general.jsonl", n)),
        },
        generation=False),
}


def run_cli(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("toss-filter")), *args, "--quiet"]
    print("$", " ".join(command[1:]).replace(str(REPO) + "/", ""), flush=True)
    subprocess.run(command, check=True)


def build_sets(out: Path, mix: Mix, args: argparse.Namespace) -> dict[str, Path]:
    """Step 1 and 2: the custom set and one trainer-ready set per strategy."""
    custom = out / "custom.jsonl"
    if not custom.exists():
        custom.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(mix.custom)[:args.rows]))
    sets = {name: out / "sets" / name for name in args.strategies}
    models = ["--safety-model", str(args.safety_model), "--utility-model", str(args.utility_model)]
    common = ["--keep-empty", "--no-report"]
    length = ["--max-length", str(args.max_length)] if args.max_length else []
    ratio = str(args.ratio)
    toss_run = out / "runs" / "toss"
    if not sets["toss"].exists():
        run_cli("filter", str(custom), *models, "--ratio", ratio, *length, "--output", str(sets["toss"]),
                "--run-dir", str(toss_run), *common)
    if "toss-pro" in sets and not sets["toss-pro"].exists():
        # Refinement continues θs at the rate and batch it was trained with (examples/reference-adapters).
        run_cli("filter", str(custom), *models, "--ratio", ratio, *length, "--rounds", str(args.rounds),
                "--refine-learning-rate", str(args.refine_lr), "--refine-batch-size", "8",
                "--refine-micro-batch-size", "8", "--output", str(sets["toss-pro"]),
                "--run-dir", str(out / "runs" / "toss-pro"), *common)
    for name in ("sample", "first-k", "random", "unfiltered"):
        if name in sets and not sets[name].exists():
            strategy, strategy_ratio = ("toss", "0.0") if name == "unfiltered" else (name, ratio)
            run_cli("select", "--run-dir", str(toss_run), "--strategy", strategy, "--ratio", strategy_ratio,
                    "--output", str(sets[name]), *common)
    return sets


def masked_shares(sets: dict[str, Path], labels: list[str]) -> dict[str, dict[str, float]]:
    """Per set and custom-set label: the share of that label's response tokens the set masks (of the tokens the
    unfiltered set trains on)."""
    def trained(path: Path) -> list[np.ndarray]:
        return [np.asarray(row) != IGNORE_INDEX for row in load_from_disk(str(path))["labels"]]

    everything = trained(sets["unfiltered"])
    shares = {}
    for name, path in sets.items():
        kept = trained(path)
        shares[name] = {}
        for label in sorted(set(labels)):
            rows = [i for i, row_label in enumerate(labels) if row_label == label]
            total = sum(int(everything[i].sum()) for i in rows)
            shares[name][label] = sum(int((everything[i] & ~kept[i]).sum()) for i in rows) / total
        shares[name]["trained_tokens"] = int(sum(k.sum() for k in kept))
    return shares


def load_base() -> tuple[Any, Any]:
    path = resolve_model_path(EMBEDDED_MODEL_ID)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def finetune(data: Path, adapter: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Step 3: one LoRA fine-tune of the base on a trainer-ready set (toss-filter's own training step)."""
    if (adapter / "training.json").exists():
        return json.loads((adapter / "training.json").read_text())
    tokenizer, model = load_base()
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = trainable_rows(load_from_disk(str(data)).data.table)
    started = time.perf_counter()
    losses = fit_adapter(model, tokenizer, rows, learning_rate=args.lr, epochs=args.epochs,
                         batch_size=args.batch_size, micro_batch_size=args.batch_size, seed=seed)
    record = {"rows": len(rows), "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
              "seconds": round(time.perf_counter() - started, 1)}
    save_adapter(model, adapter, {"training.json": json.dumps(record, indent=2) + "\n"})
    return record


def evaluate(adapter: Path | None, result: Path, mix: Mix, args: argparse.Namespace) -> dict[str, Any]:
    """Step 4 for one model: the base (`adapter` None) or the base with a fine-tuned adapter merged in."""
    if result.exists():
        return json.loads(result.read_text())
    tokenizer, model = load_base()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"), 2048)
    record: dict[str, Any] = {"nll_rows": {key: response_nll(model, encode, load(args.eval_rows))
                                           for key, (_, load) in mix.nll_sets.items()}}
    if mix.generation:
        prompts = [r["prompt"] for r in read_jsonl(DATA / "harmful_prompts_eval.jsonl")][:args.eval_prompts]
        gsm8k = [messages(r) for r in read_jsonl(DATA / "benign_heldout.jsonl")][:args.gsm8k_questions]
        rate, replies = refusal_rate(model, tokenizer, prompts, args.max_new_tokens)
        record |= {"refusal_rate": rate, "gsm8k_accuracy": gsm8k_accuracy(model, tokenizer, gsm8k, args.gsm8k_new_tokens),
                   "opens_sure": float(np.mean([opens_like_the_harmful_rows(reply) for reply in replies])),
                   "replies": [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)]}
    record.update({key: nll_mean(per_row) for key, per_row in record["nll_rows"].items()})
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(record, indent=2) + "\n")
    return record


def spread(values: list[float], fmt: str) -> str:
    """A seed mean with the range that covers every seed: `mean [min, max]`, or the value alone for one seed."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(np.mean(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def model_columns(mix: Mix) -> list[tuple[str, str, str]]:
    """(result key, column title, format) of every per-model measurement."""
    columns = [(key, f"{title} {'↓' if key.startswith('benign') else '↑'}", ".3f")
               for key, (title, _) in mix.nll_sets.items()]
    if mix.generation:
        columns += [("refusal_rate", "refusal rate ↑", ".1%"), ("opens_sure", 'replies opening "Sure" ↓', ".1%"),
                    ("gsm8k_accuracy", "GSM8K accuracy ↑", ".1%")]
    return columns


def table(results: dict[str, list[dict[str, Any]]], shares: dict[str, dict[str, float]], mix: Mix) -> str:
    """One row per model: what its filter masked (the base model was neither filtered nor trained), then each
    measurement as the mean over training seeds with their range."""
    labels = [label for label in next(iter(shares.values())) if label != "trained_tokens"]
    columns = model_columns(mix)
    head = [f"masked share, {label} rows" for label in labels] + ["tokens trained"] + [title for _, title, _ in columns]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for model, runs in results.items():
        masked = shares.get(model)
        cells = ([f"{masked[label]:.1%}" for label in labels] + [f"{masked['trained_tokens']:,}"] if masked
                 else ["–"] * (len(labels) + 1))
        cells += [spread([run[key] for run in runs], fmt) for key, _, fmt in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def differences(results: dict[str, list[dict[str, Any]]], mix: Mix) -> str:
    """Each model's NLL minus the unfiltered model's of the same seed, on the same rows. One seed: with a 95% paired
    bootstrap interval over rows. Several: the mean over seeds with the range of the per-seed differences, so the
    interval covers training noise, not only the choice of rows."""
    keys = list(mix.nll_sets)
    seeds = len(results["unfiltered"])
    lines = ["| model vs unfiltered | " + " | ".join(f"Δ {mix.nll_sets[key][0]}" for key in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for model in [name for name in results if name not in ("base", "unfiltered")] + ["base"]:
        cells = []
        # the base model is measured once, so it pairs with every seed's unfiltered model
        runs = results[model] * seeds if model == "base" else results[model]
        for key in keys:
            per_seed = [paired_difference(runs[s]["nll_rows"][key], results["unfiltered"][s]["nll_rows"][key])
                        for s in range(seeds)]
            if seeds == 1:
                cells.append("{:+.3f} [{:+.3f}, {:+.3f}]".format(*per_seed[0]))
            else:
                diffs = [d for d, _, _ in per_seed]
                cells.append(f"{np.mean(diffs):+.3f} [{min(diffs):+.3f}, {max(diffs):+.3f}]")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, Any]]], mix: Mix, path: Path) -> None:
    """One panel per NLL: a dot per fine-tune and seed, the base model as a dashed line (dots rather than bars,
    because the differences are small next to the values and a cut bar axis would exaggerate them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [name for name in results if name != "base"]
    figure, axes = plt.subplots(1, len(mix.nll_sets), figsize=(12, 3.2), sharey=True)
    for axis, (key, (title, _)) in zip(axes, mix.nll_sets.items()):
        for name in tuned:
            axis.scatter([run[key] for run in results[name]], [name] * len(results[name]), zorder=3,
                         color="#c44" if name == "unfiltered" else "#36a", alpha=0.7)
        axis.axvline(results["base"][0][key], color="#888", linestyle="--", label="base model")
        better = "lower" if key.startswith("benign") else "higher"
        axis.set_title(f"{title}\n({better} = {'more useful' if better == 'lower' else 'safer'})", fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "reproduce")
    parser.add_argument("--mix", choices=sorted(MIXES), default="gsm8k", help="the custom set and its measurements")
    parser.add_argument("--rows", type=int, default=None, help="custom-set rows (first N; default: 100 for gsm8k, all)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=None,
                        help="sets to build and fine-tune on (default: all; unfiltered and toss are always built)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds")
    parser.add_argument("--safety-model", type=Path, default=ADAPTERS / "safety")
    parser.add_argument("--utility-model", type=Path, default=ADAPTERS / "utility")
    parser.add_argument("--ratio", type=float, default=0.2, help="token budget of every filter")
    parser.add_argument("--max-length", type=int, default=None, help="truncate custom rows to N tokens")
    parser.add_argument("--rounds", type=int, default=2, help="TOSS-Pro rounds")
    parser.add_argument("--refine-lr", type=float, default=1e-3, help="TOSS-Pro refinement learning rate")
    parser.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (constant)")
    parser.add_argument("--rank", type=int, default=8, help="fine-tuning LoRA rank (all linear layers)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out HarmBench prompts to generate for")
    parser.add_argument("--eval-rows", type=int, default=48, help="rows per NLL evaluation set")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="reply length for the refusal test")
    parser.add_argument("--gsm8k-questions", type=int, default=32, help="held-out GSM8K questions to answer")
    parser.add_argument("--gsm8k-new-tokens", type=int, default=192)
    args = parser.parse_args()
    mix = MIXES[args.mix]
    args.rows = args.rows or (100 if args.mix == "gsm8k" else None)
    args.strategies = [s for s in STRATEGIES if s in {"unfiltered", "toss", *(args.strategies or STRATEGIES)}]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    sets = build_sets(out, mix, args)
    shares = masked_shares(sets, [r["label"] for r in read_jsonl(out / "custom.jsonl")])
    results = {"base": [evaluate(None, out / "eval" / "base.json", mix, args)]}
    for seed in args.seeds:
        for name, data in sets.items():
            print(f"fine-tune and evaluate: {name}, seed {seed}", flush=True)
            adapter = out / "finetuned" / f"{name}-seed{seed}"
            training = finetune(data, adapter, args, seed)
            results.setdefault(name, []).append({**evaluate(adapter, out / "eval" / f"{name}-seed{seed}.json", mix, args),
                                                 "training": training})
    summary = {name: [{k: v for k, v in run.items() if k not in ("replies", "nll_rows")} for run in runs]
               for name, runs in results.items()}
    (out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                  "masked": shares, "results": summary}, indent=2) + "\n")
    report = table(results, shares, mix) + "\n" + differences(results, mix)
    (out / "results.md").write_text(report)
    plot(results, mix, out / "results.png")  # resumes from the saved results: rerunning only redraws
    print(report)
    print(f"done in {time.perf_counter() - started:.0f} s; {out / 'results.md'}, {out / 'results.png'}")


if __name__ == "__main__":
    main()
