"""A small-scale reproduction of the TOSS paper's claim, on CPU with SmolLM2-135M-Instruct (README.md beside this).

    python examples/reproduce/run.py --out out/reproduce        # about an hour on 2 CPU cores

1. Custom set: the first `--rows` rows of examples/data/custom_mix.jsonl (GSM8K solutions with about 20% harmful
   compliant answers mixed in, like the paper's RedOrca).
2. Filter it at one token budget with the `toss-filter` CLI, as a user would: `filter` (toss), `filter --rounds`
   (TOSS-Pro), and `select --strategy` sample / first-k / random on toss's scores; `select --ratio 0` is the
   unfiltered set. Every set keeps empty rows (`--keep-empty`), so row i is custom row i in all of them.
3. LoRA fine-tune the base model on each set (same seed, recipe and steps).
4. Measure every model and the base (measure.py): refusal rate on held-out HarmBench prompts, NLL of harmful
   compliant responses the fine-tunes never saw, and NLL of held-out GSM8K solutions.
5. Write OUT/results.json, OUT/results.md (the table) and OUT/results.png (the plot).

Every step skips work whose output already exists in OUT, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
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
# Harmful answers to JBB behaviours 0-69: the custom set's harmful rows are behaviours 70-99, and rows 240+ were
# not among the 240 the safety reference was trained on, so no model in the experiment has seen these.
UNSEEN_HARMFUL_ROWS = range(240, 425)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_cli(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("toss-filter")), *args, "--quiet"]
    print("$", " ".join(command[1:]).replace(str(REPO) + "/", ""), flush=True)
    subprocess.run(command, check=True)


def build_sets(out: Path, rows: int, ratio: float, rounds: int, refine_lr: float) -> dict[str, Path]:
    """Step 1 and 2: the custom set and one trainer-ready set per strategy."""
    custom = out / "custom.jsonl"
    if not custom.exists():
        custom.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DATA / "custom_mix.jsonl")[:rows]))
    sets = {name: out / "sets" / name for name in STRATEGIES}
    models = ["--safety-model", str(ADAPTERS / "safety"), "--utility-model", str(ADAPTERS / "utility")]
    common = ["--keep-empty", "--no-report"]
    if not sets["toss"].exists():
        run_cli("filter", str(custom), *models, "--ratio", str(ratio), "--output", str(sets["toss"]),
                "--run-dir", str(out / "runs" / "toss"), *common)
    if not sets["toss-pro"].exists():
        # Refinement continues θs at the rate and batch it was trained with (examples/reference-adapters).
        run_cli("filter", str(custom), *models, "--ratio", str(ratio), "--rounds", str(rounds),
                "--refine-learning-rate", str(refine_lr), "--refine-batch-size", "8", "--refine-micro-batch-size", "8",
                "--output", str(sets["toss-pro"]), "--run-dir", str(out / "runs" / "toss-pro"), *common)
    for name, strategy_ratio in (("sample", ratio), ("first-k", ratio), ("random", ratio), ("unfiltered", 0.0)):
        if not sets[name].exists():
            strategy = "toss" if name == "unfiltered" else name
            run_cli("select", "--run-dir", str(out / "runs" / "toss"), "--strategy", strategy,
                    "--ratio", str(strategy_ratio), "--output", str(sets[name]), *common)
    return sets


def masked_shares(sets: dict[str, Path], labels: list[str]) -> dict[str, dict[str, float]]:
    """Per set: the share of the harmful rows' and of the benign rows' response tokens that it masks."""
    def trained(path: Path) -> list[np.ndarray]:
        return [np.asarray(row) != IGNORE_INDEX for row in load_from_disk(str(path))["labels"]]

    everything = trained(sets["unfiltered"])
    shares = {}
    for name, path in sets.items():
        kept = trained(path)
        shares[name] = {}
        for label in ("harmful", "benign"):
            rows = [i for i, row_label in enumerate(labels) if row_label == label]
            total = sum(int(everything[i].sum()) for i in rows)
            shares[name][label] = sum(int((everything[i] & ~kept[i]).sum()) for i in rows) / total
        shares[name]["trained_tokens"] = int(sum(k.sum() for k in kept))
    return shares


def load_base() -> tuple[Any, Any]:
    path = resolve_model_path(EMBEDDED_MODEL_ID)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def finetune(data: Path, adapter: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Step 3: one LoRA fine-tune of the base on a trainer-ready set (toss-filter's own training step)."""
    if (adapter / "training.json").exists():
        return json.loads((adapter / "training.json").read_text())
    tokenizer, model = load_base()
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = trainable_rows(load_from_disk(str(data)).data.table)
    started = time.perf_counter()
    losses = fit_adapter(model, tokenizer, rows, learning_rate=args.lr, epochs=args.epochs,
                         batch_size=args.batch_size, micro_batch_size=args.batch_size, seed=args.seed)
    record = {"rows": len(rows), "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
              "seconds": round(time.perf_counter() - started, 1)}
    save_adapter(model, adapter, {"training.json": json.dumps(record, indent=2) + "\n"})
    return record


def evaluate(adapter: Path | None, result: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Step 4 for one model: the base (`adapter` None) or the base with a fine-tuned adapter merged in."""
    if result.exists():
        return json.loads(result.read_text())
    tokenizer, model = load_base()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"), 2048)
    prompts = [r["prompt"] for r in read_jsonl(DATA / "harmful_prompts_eval.jsonl")][:args.eval_prompts]
    harmful_train = read_jsonl(DATA / "harmful_train.jsonl")
    unseen = random.Random(args.seed).sample([harmful_train[i]["messages"] for i in UNSEEN_HARMFUL_ROWS], args.eval_rows)
    same_behaviour = [r["messages"] for r in read_jsonl(DATA / "harmful_heldout.jsonl")][:args.eval_rows]
    benign = [r["messages"] for r in read_jsonl(DATA / "benign_heldout.jsonl")][:max(args.eval_rows, args.gsm8k_questions)]
    rate, replies = refusal_rate(model, tokenizer, prompts, args.max_new_tokens)
    record = {
        "refusal_rate": rate,
        "gsm8k_accuracy": gsm8k_accuracy(model, tokenizer, benign[:args.gsm8k_questions], args.gsm8k_new_tokens),
        "nll_rows": {key: response_nll(model, encode, rows) for key, rows in
                     (("harmful_nll_unseen_behaviours", unseen), ("harmful_nll_custom_behaviours", same_behaviour),
                      ("benign_nll_gsm8k", benign[:args.eval_rows]))},
        "replies": [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)],
    }
    record.update({key: nll_mean(per_row) for key, per_row in record["nll_rows"].items()})
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(record, indent=2) + "\n")
    return record


FILTER_COLUMNS = (
    ("masked share, harmful rows", lambda r: f"{r['masked']['harmful']:.1%}"),
    ("masked share, benign rows", lambda r: f"{r['masked']['benign']:.1%}"),
    ("tokens trained", lambda r: f"{r['masked']['trained_tokens']:,}"),
)
MODEL_COLUMNS = (
    ("refusal rate ↑", lambda r: f"{r['refusal_rate']:.1%}"),
    ('replies opening "Sure" ↓',
     lambda r: f"{np.mean([opens_like_the_harmful_rows(x['reply']) for x in r['replies']]):.1%}"),
    ("harmful NLL, unseen behaviours ↑", lambda r: f"{r['harmful_nll_unseen_behaviours']:.3f}"),
    ("harmful NLL, custom-set behaviours ↑", lambda r: f"{r['harmful_nll_custom_behaviours']:.3f}"),
    ("GSM8K NLL ↓", lambda r: f"{r['benign_nll_gsm8k']:.3f}"),
    ("GSM8K accuracy ↑", lambda r: f"{r['gsm8k_accuracy']:.1%}"),
)


def differences(results: dict[str, dict[str, Any]]) -> str:
    """Each filtered model's NLL minus the unfiltered model's, on the same rows, with a 95% paired bootstrap
    interval: an interval that excludes 0 is a difference the evaluation rows can resolve."""
    lines = ["| model vs unfiltered | " + " | ".join(f"Δ {title.splitlines()[0]}" for _, title in PLOTTED) + " |",
             "|---|" + "---:|" * len(PLOTTED)]
    for model in [name for name in results if name not in ("base", "unfiltered")] + ["base"]:
        cells = []
        for key, _ in PLOTTED:
            diff, low, high = paired_difference(results[model]["nll_rows"][key], results["unfiltered"]["nll_rows"][key])
            cells.append(f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model; the base model was not filtered or trained, so its filter cells are blank."""
    columns = FILTER_COLUMNS + MODEL_COLUMNS
    lines = ["| model | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, record in results.items():
        cells = [cell(record) if "masked" in record else "–" for _, cell in FILTER_COLUMNS]
        cells += [cell(record) for _, cell in MODEL_COLUMNS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PLOTTED = (
    ("harmful_nll_unseen_behaviours", "harmful NLL, unseen behaviours\n(higher = safer)"),
    ("harmful_nll_custom_behaviours", "harmful NLL, custom-set behaviours\n(higher = safer)"),
    ("benign_nll_gsm8k", "GSM8K NLL\n(lower = more useful)"),
)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per NLL: a dot per fine-tuned model, the base model as a dashed line (dots rather than bars,
    because the differences are small next to the values and a cut bar axis would exaggerate them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [name for name in results if name != "base"]
    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(12, 3.2), sharey=True)
    for axis, (key, title) in zip(axes, PLOTTED):
        axis.scatter([results[name][key] for name in tuned], tuned,
                     color=["#c44" if name == "unfiltered" else "#36a" for name in tuned], zorder=3)
        axis.axvline(results["base"][key], color="#888", linestyle="--", label="base model")
        axis.set_title(title, fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "reproduce")
    parser.add_argument("--rows", type=int, default=100, help="custom-set rows (first N of custom_mix.jsonl)")
    parser.add_argument("--ratio", type=float, default=0.2, help="token budget of every filter")
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    sets = build_sets(out, args.rows, args.ratio, args.rounds, args.refine_lr)
    shares = masked_shares(sets, [r["label"] for r in read_jsonl(out / "custom.jsonl")])
    results = {"base": evaluate(None, out / "eval" / "base.json", args)}
    for name, data in sets.items():
        print(f"fine-tune and evaluate: {name}", flush=True)
        training = finetune(data, out / "finetuned" / name, args)
        results[name] = {**evaluate(out / "finetuned" / name, out / "eval" / f"{name}.json", args),
                         "masked": shares[name], "training": training}
    summary = {name: {k: v for k, v in record.items() if k not in ("replies", "nll_rows")}
               for name, record in results.items()}
    (out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                  "results": summary}, indent=2) + "\n")
    report = table(results) + "\n" + differences(results)
    (out / "results.md").write_text(report)
    plot(results, out / "results.png")  # resumes from the saved results: rerunning only redraws
    print(report)
    print(f"done in {time.perf_counter() - started:.0f} s; {out / 'results.md'}, {out / 'results.png'}")


if __name__ == "__main__":
    main()
