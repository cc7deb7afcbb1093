"""The output drops into HF Trainer + DataCollatorForSeq2Seq, and masked tokens contribute nothing to the loss."""

import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from conftest import chat, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset


def test_trainer_loss_equals_cross_entropy_over_kept_labels_only(tmp_path, tiny_models, tokenizer):
    rows = [chat(f"Question {i}?", f"Answer number {i} is a fairly long sentence with words.") for i in range(4)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run = str(tmp_path / "run")
    stats = filter_dataset(ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), run),
                   SelectConfig(run, str(tmp_path / "out"), ratio=0.4), show_progress=False)
    dataset = load_from_disk(str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=4, report_to=[],
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, data_collator=collator, eval_dataset=dataset)
    trainer_loss = trainer.evaluate()["eval_loss"]

    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    kept = shifted_labels != -100
    expected = torch.nn.functional.cross_entropy(shifted_logits[kept], shifted_labels[kept]).item()
    assert abs(trainer_loss - expected) < 1e-5
    assert stats["masked_tokens"] > 0  # so the equality above really excludes masked response tokens
