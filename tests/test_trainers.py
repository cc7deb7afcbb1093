"""toss-filter's output drops into real trainers unchanged, and the masked tokens contribute nothing to the loss.

One filtered output (a tiny random Llama with two random LoRA references, SmolLM2's tokenizer, ratio 0.4) feeds:
- HF `Trainer` + `DataCollatorForSeq2Seq`: the eval loss equals cross-entropy over the kept labels only;
- TRL `SFTTrainer` (the installed release, >= 1.7), without and with packing: the batches of its own train
  dataloader carry our `input_ids` and `labels` unchanged (packed sequences mapped back through `position_ids`), and
  `compute_loss` on them equals cross-entropy over the kept labels, computed row by row on an unpatched model;
- a negative control: transformers' `DataCollatorForLanguageModeling(mlm=False)` overwrites the labels, so the masked
  tokens would be trained.
No training step runs: the batches and the loss are all that is checked. See docs/trainers.md.
"""

from __future__ import annotations

import pytest
import torch
from datasets import load_from_disk
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

from conftest import chat, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset

pytestmark = pytest.mark.slow  # every test trains on the module's filtered output

IGNORE = -100
TOL = 1e-5  # observed gaps are ~1e-6 (float32 forwards); counting the masked tokens moves the loss by ~3e-2
Row = tuple[tuple[int, ...], tuple[int, ...]]  # (input_ids, labels)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, tiny_models) -> dict:
    """The filtered output, its rows as (input_ids, labels) tuples, and the unsafe flags of each output row (from
    the run directory's `token_scores` sidecar, aligned to the output through OUTPUT-rejected's `row` column)."""
    root = tmp_path_factory.mktemp("trainers")
    rows = [chat(f"Question {i}?", f"Answer number {i}: " + "a fairly long sentence with words. " * (1 + i % 3))
            for i in range(6)]
    data = write_jsonl(root / "data.jsonl", rows)
    run, out = str(root / "run"), root / "out"
    stats = filter_dataset(ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), run),
                           SelectConfig(run, str(out), ratio=0.4), show_progress=False)
    dataset = load_from_disk(str(out))
    assert dataset.column_names == ["input_ids", "attention_mask", "labels"]
    rejected = set(load_from_disk(str(out) + "-rejected")["row"])
    sidecar = load_from_disk(str(root / "run" / "token_scores"))
    unsafe = [flags for row, flags in zip(sidecar["row"], sidecar["unsafe"]) if row not in rejected]
    pairs = [(tuple(ids), tuple(labels)) for ids, labels in zip(dataset["input_ids"], dataset["labels"])]
    assert len(unsafe) == len(pairs) >= 4 and all(len(u) == len(ids) for u, (ids, _) in zip(unsafe, pairs))
    assert stats["masked_tokens"] > 0  # so the loss equalities below really exclude masked response tokens
    assert all(labels[0] == IGNORE for _, labels in pairs)  # position 0 is prompt: TRL's padding-free rule is moot
    return {"dataset": dataset, "rows": pairs, "unsafe": {ids: u for u, (ids, _) in zip(unsafe, pairs)},
            "masked_tokens": stats["masked_tokens"]}


def reference_model(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    model.eval()
    return model


def kept_cross_entropy(model, rows: list[Row]) -> float:
    """Mean cross-entropy over the kept labels of `rows`, each row forwarded on its own (no padding, no packing)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            kept = target != IGNORE
            total += torch.nn.functional.cross_entropy(logits[kept], target[kept], reduction="sum").item()
            count += int(kept.sum())
    return total / count


def unmasked(rows: list[Row], filtered: dict) -> list[Row]:
    """`rows` with the label of every unsafe token restored: what a trainer that ignores the masking would train."""
    return [(ids, tuple(token if flag else label for token, label, flag in zip(ids, labels, filtered["unsafe"][ids])))
            for ids, labels in rows]


def sequences(batch: dict) -> list[Row]:
    """The (input_ids, labels) of every sequence in a collated batch: padded rows are cut at their attention mask;
    padding-free rows (no attention mask) are split where `position_ids` restarts at 0, as TRL's collator and
    transformers' packed-sequence mask do."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][b].tolist(), batch["labels"][b].tolist()
        if "attention_mask" in batch:
            n = int(batch["attention_mask"][b].sum())
            assert batch["attention_mask"][b, :n].all() and set(labels[n:]) <= {IGNORE}  # right padding, ignored
            out.append((tuple(ids[:n]), tuple(labels[:n])))
        else:
            starts = (batch["position_ids"][b] == 0).nonzero().flatten().tolist() + [len(ids)]
            out += [(tuple(ids[s:e]), tuple(labels[s:e])) for s, e in zip(starts, starts[1:])]
    return out


def assert_masking_survives(seen: list[Row], filtered: dict) -> None:
    """Every output row appears exactly once, with its labels unchanged: -100 stays -100 (prompt and masked tokens),
    every kept label survives, and in particular every unsafe token (from the sidecar) has label -100."""
    assert sorted(seen) == sorted(filtered["rows"])
    unsafe_seen = 0
    for ids, labels in seen:
        flags = filtered["unsafe"][ids]
        assert all(label == IGNORE for label, flag in zip(labels, flags) if flag)
        unsafe_seen += sum(flags)
    assert unsafe_seen == filtered["masked_tokens"]


def test_hf_trainer_seq2seq_loss_equals_cross_entropy_over_kept_labels_only(tmp_path, filtered, tiny_models,
                                                                            tokenizer):
    dataset = filtered["dataset"]
    model = reference_model(tiny_models)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=len(dataset),
                             report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, data_collator=collator, eval_dataset=dataset)
    trainer_loss = trainer.evaluate()["eval_loss"]

    batch = collator([dataset[i] for i in range(len(dataset))])
    assert_masking_survives(sequences(batch), filtered)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    kept = shifted_labels != IGNORE
    expected = torch.nn.functional.cross_entropy(shifted_logits[kept], shifted_labels[kept]).item()
    assert trainer_loss == pytest.approx(expected, abs=TOL)
    assert trainer_loss == pytest.approx(kept_cross_entropy(model, filtered["rows"]), abs=TOL)
    assert abs(trainer_loss - kept_cross_entropy(model, unmasked(filtered["rows"], filtered))) > 100 * TOL


@pytest.mark.parametrize("packing", [False, True], ids=["no-packing", "packing-bfd"])
def test_trl_sft_trainer_uses_input_ids_and_labels_as_is(tmp_path, filtered, tiny_models, tokenizer, packing):
    dataset, rows = filtered["dataset"], filtered["rows"]
    longest = max(len(ids) for ids, _ in rows)
    # Without packing, max_length stays above every row (no truncation). With packing, bins of twice the longest row
    # force several bins that each hold several of our rows.
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=len(rows), max_steps=1,
                     packing=packing, max_length=2 * longest if packing else 1024)
    assert longest <= 1024 and args.packing_strategy == "bfd"
    trainer = SFTTrainer(model=reference_model(tiny_models), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    assert trainer.padding_free is packing  # bfd packing switches TRL to its padding-free collator

    # The dataset TRL prepared still carries our tokens and labels: nothing was re-tokenized or re-labelled.
    prepared = trainer.train_dataset
    if packing:
        assert prepared.column_names == ["input_ids", "labels", "seq_lengths"]
        assert 1 < prepared.num_rows < len(rows) and max(len(s) for s in prepared["seq_lengths"]) > 1
        packed = []
        for ids, labels, lengths in zip(prepared["input_ids"], prepared["labels"], prepared["seq_lengths"]):
            ends = torch.tensor(lengths).cumsum(0).tolist()
            packed += [(tuple(ids[s:e]), tuple(labels[s:e])) for s, e in zip([0] + ends, ends)]
        assert sorted(packed) == sorted(rows)
    else:
        assert {"input_ids", "labels"} <= set(prepared.column_names)
        assert list(zip(map(tuple, prepared["input_ids"]), map(tuple, prepared["labels"]))) == rows

    # The batches TRL's own collator builds: every -100 stays -100, every kept label survives.
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert ("position_ids" in batch and "attention_mask" not in batch) is packing
    seen = sequences(batch)
    assert_masking_survives(seen, filtered)

    # TRL's loss on that batch (its fused LM head, chunked NLL) equals cross-entropy over the kept labels, computed
    # row by row on an unpatched copy of the model, and is far from the loss with the masked tokens counted.
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    reference = reference_model(tiny_models)
    assert loss == pytest.approx(kept_cross_entropy(reference, seen), abs=TOL)
    assert abs(loss - kept_cross_entropy(reference, unmasked(seen, filtered))) > 100 * TOL
    if packing:
        # The equality above also shows that the packed sequences do not attend to each other: transformers 5.x
        # builds a block-diagonal mask from `position_ids` for sdpa/eager, here on CPU without flash-attention.
        # Each packed row run as one plain causal sequence (cross-sequence attention) gives a measurably other loss.
        leaky = kept_cross_entropy(reference, [(tuple(ids), tuple(labels)) for ids, labels in
                                               zip(batch["input_ids"].tolist(), batch["labels"].tolist())])
        assert abs(loss - leaky) > 10 * TOL


def test_negative_control_lm_collator_overwrites_labels_and_trains_masked_tokens(filtered, tokenizer):
    """The pitfall is real: `DataCollatorForLanguageModeling(mlm=False)` sets labels = input_ids (and -100 on the
    pad id), so every prompt and masked token is trained, and with SmolLM2 (pad = eos = <|im_end|>) the end-of-turn
    tokens lose their labels instead. It is silent with one row per batch (or rows of equal length); a batch of
    rows of different lengths fails in `tokenizer.pad`, which cannot stack the unpadded `labels`."""
    dataset = filtered["dataset"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    with pytest.raises(ValueError, match="Unable to create tensor"):
        collator([dataset[i] for i in range(len(dataset))])
    overwritten = 0
    for i, (ids, labels) in enumerate(filtered["rows"]):
        got = collator([dataset[i]])["labels"][0].tolist()  # per_device_train_batch_size=1
        assert got == [IGNORE if token == tokenizer.pad_token_id else token for token in ids]
        assert any(label != IGNORE and ours == IGNORE for label, ours in zip(got, labels))  # prompt now trained
        flags = filtered["unsafe"][ids]
        overwritten += sum(1 for flag, token, label in zip(flags, ids, got) if flag and label == token)
    assert overwritten > 0  # masked (unsafe) tokens now carry their token id as label: they would be trained
