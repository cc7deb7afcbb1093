"""Train the two demo reference adapters on SmolLM2-135M-Instruct from the bundled example data.

    python examples/reference-adapters/train_adapters.py            # both, about 30 min on 2 CPU cores

- safety (safety-degraded θs): LoRA SFT on `examples/data/harmful_train.jsonl` (harmful compliant answers)
- utility (utility-oriented θu): LoRA SFT on `examples/data/benign_train.jsonl` (GSM8K worked solutions)

Why not the paper's recipe (r=16, q/v only, lr 1e-5): at 135M scale it barely moves the model, so the two
references hardly disagree. All-linear LoRA at lr 1e-3 for 2 epochs separates harmful from benign text far better
(measured in README.md beside this file). Loss is on response tokens only, through the same tokenization that
`toss-filter filter` uses, so training and scoring see identical tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from toss_filter.data.load import load_conversations
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
from toss_filter.default_model import EMBEDDED_MODEL_ID, resolve_model_path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
TRAINING_SETS = {"safety": DATA / "harmful_train.jsonl", "utility": DATA / "benign_train.jsonl"}


def train_one(name: str, rows: int, epochs: float, lr: float, rank: int, max_length: int, seed: int) -> None:
    base_path = resolve_model_path(EMBEDDED_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"), max_length)
    source = str(TRAINING_SETS[name])
    examples = [encode(messages, source, row) for row, messages in load_conversations(source)][:rows]
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    out = HERE / name
    args = TrainingArguments(
        output_dir=str(HERE / f".trainer-{name}"), num_train_epochs=epochs, learning_rate=lr,
        lr_scheduler_type="constant", per_device_train_batch_size=8, logging_steps=5, save_strategy="no",
        report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    result = trainer.train()
    model.peft_config["default"].base_model_name_or_path = EMBEDDED_MODEL_ID
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's placeholder card; README.md beside this script documents both
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    (out / "training.json").write_text(json.dumps({
        "data": str(TRAINING_SETS[name].relative_to(HERE.parent.parent)), "rows": len(dataset),
        "response_tokens": int(sum(sum(l != -100 for l in e.labels) for e in examples)),
        "epochs": epochs, "learning_rate": lr, "lora_rank": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear",
        "max_length": max_length, "seed": seed, "first_loss": losses[0], "final_loss": losses[-1],
        "train_runtime_s": round(result.metrics["train_runtime"], 1),
    }, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="safety|utility", help="which adapters to train (default: both)")
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = set(args.names) - set(TRAINING_SETS)
    if unknown:
        parser.error(f"unknown adapter names {sorted(unknown)}; choose from {list(TRAINING_SETS)}")
    for name in args.names or list(TRAINING_SETS):
        train_one(name, args.rows, args.epochs, args.lr, args.rank, args.max_length, args.seed)


if __name__ == "__main__":
    main()
