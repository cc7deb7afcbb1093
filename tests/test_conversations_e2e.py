"""End to end on the bundled agentic and reasoning samples (examples/data/{agentic,reasoning}_sample.jsonl) with the
genuine Qwen3 chat template (examples/templates/qwen3.jinja) on SmolLM2's tokenizer and the tiny models of conftest:

- `toss-filter filter` (the CLI, in-process) keeps every row: rows in = rows out + rejected;
- each output row's `input_ids` equal `tokenizer.apply_chat_template(messages, tools=tools, chat_template=...,
  tokenize=True)` for its input row, the messages being `to_conversation`'s;
- the tool calls (the `<tool_call>` JSON with its wrapper) and the reasoning (`<think>` blocks) are response: every
  token in them is labelled, unless the run masked it; tool results and tool schemas are never labelled nor scored;
- with `--no-score-reasoning`, no reasoning token is masked, every one keeps its label, and its score in the
  `token_scores` sidecar is NaN, while the answers are still scored and masked;
- TRL `SFTTrainer` takes the output unchanged: its dataloader's batches carry our labels as they are, and two
  training steps give a finite loss.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from trl import SFTConfig, SFTTrainer

from conftest import REPO, read_jsonl
from test_cli import invoke
from test_trainers import IGNORE, assert_masking_survives, reference_model, sequences
from toss_filter.data.conversation import to_conversation

pytestmark = pytest.mark.slow  # every test reads the module's three filter runs (about 50 s on 2 busy cores)

TEMPLATE = REPO / "examples" / "templates" / "qwen3.jinja"
SAMPLES = {name: REPO / "examples" / "data" / f"{name}_sample.jsonl" for name in ("agentic", "reasoning")}
RATIO = 0.3

TOOL_CALL = re.compile(r"<tool_call>\n.*?\n</tool_call>", re.S)
TOOL_RESPONSE = re.compile(r"<tool_response>\n(.*?)\n</tool_response>", re.S)
TOOLS = re.compile(r"<tools>\n.*?\n</tools>", re.S)
THINK = re.compile(r"<think>\n(.*?)\n</think>", re.S)


def run_filter(tmp: Path, sample: str, models: dict, *options: str) -> dict:
    """Filter one sample through the CLI; return the input records, the output rows aligned to their input rows,
    and the sidecar's per-token score and unsafe flags of each input row."""
    out, run = tmp / "out", tmp / "run"
    invoke("filter", SAMPLES[sample], "--template", TEMPLATE, "--safety-model", models["safety"],
           "--utility-model", models["utility"], "--output", out, "--run-dir", run, "--device", "cpu",
           "--ratio", RATIO, "--no-report", "--quiet", *options)
    records = read_jsonl(SAMPLES[sample])
    dataset, rejected = load_from_disk(str(out)), load_from_disk(str(out) + "-rejected")
    assert len(records) == dataset.num_rows + rejected.num_rows  # rows in = rows out + rejected
    rejected_rows = set(rejected["row"])
    kept = [row for row in range(len(records)) if row not in rejected_rows]
    sidecar = load_from_disk(str(run / "token_scores"))
    scores = {row: (np.array(score, dtype=np.float32), np.array(unsafe, dtype=bool))
              for row, score, unsafe in zip(sidecar["row"], sidecar["score"], sidecar["unsafe"])}
    rows = {row: (ids, labels) for row, ids, labels in zip(kept, dataset["input_ids"], dataset["labels"])}
    return {"records": records, "dataset": dataset, "rows": rows, "scores": scores,
            "stats": json.loads((run / "stats.json").read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("conversations_e2e")
    return {
        "agentic": run_filter(root / "agentic", "agentic", tiny_models),
        "reasoning": run_filter(root / "reasoning", "reasoning", tiny_models),
        "reasoning-unscored": run_filter(root / "unscored", "reasoning", tiny_models, "--no-score-reasoning"),
    }


class Rendered:
    """One output row with its rendered text, each token's character span, label, score and unsafe flag."""

    def __init__(self, run: dict, row: int, tokenizer, template: str):
        conversation = to_conversation(run["records"][row], "sample", row)
        expected = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools,
                                                 chat_template=template, tokenize=True)["input_ids"]
        self.ids, self.labels = run["rows"][row]
        assert self.ids == expected, f"row {row}: input_ids differ from apply_chat_template's"
        self.conversation = conversation
        self.text = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools,
                                                  chat_template=template, tokenize=False)
        encoding = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
        assert encoding["input_ids"] == self.ids
        self.offsets = encoding["offset_mapping"]
        self.score, self.unsafe = run["scores"][row]
        assert len(self.score) == len(self.unsafe) == len(self.ids)

    def tokens(self, start: int, end: int, inside: bool = False) -> list[int]:
        """Positions of the tokens overlapping characters [start, end), or only those wholly inside them."""
        if inside:
            return [j for j, (a, b) in enumerate(self.offsets) if start <= a and b <= end and a < b]
        return [j for j, (a, b) in enumerate(self.offsets) if a < end and b > start]

    def trained_unless_masked(self, positions: list[int]) -> None:
        assert positions
        for j in positions:
            if self.unsafe[j]:
                assert self.labels[j] == IGNORE
            else:
                assert self.labels[j] == self.ids[j], (j, self.text[slice(*self.offsets[j])])

    def prompt(self, positions: list[int]) -> None:
        assert positions
        for j in positions:
            assert self.labels[j] == IGNORE and not self.unsafe[j] and np.isnan(self.score[j])


def rendered_rows(run: dict, tokenizer) -> list[Rendered]:
    template = TEMPLATE.read_text(encoding="utf-8")
    return [Rendered(run, row, tokenizer, template) for row in sorted(run["rows"])]


def test_agentic_sample_tool_calls_are_trained_and_tool_results_and_schemas_never(runs, tokenizer):
    run = runs["agentic"]
    assert run["stats"]["masked_tokens"] > 0
    rows = rendered_rows(run, tokenizer)
    assert len(rows) == len(run["records"]) == 40  # no row rejected
    calls = results = 0
    for row in rows:
        messages = row.conversation.messages
        n_calls = sum(len(m.get("tool_calls", [])) for m in messages)
        tool_turns = [m["content"] for m in messages if m["role"] == "tool"]
        system_end = row.text.index("<|im_end|>")  # the tools system turn shows a <tool_call> example: skip it
        matches = list(TOOL_CALL.finditer(row.text, system_end))
        assert len(matches) == n_calls
        for match in matches:  # the call JSON and its <tool_call> wrapper: response, trained unless masked
            assert json.loads(match.group()[len("<tool_call>\n"):-len("\n</tool_call>")])["name"] == "calculator"
            row.trained_unless_masked(row.tokens(*match.span()))
        responses = list(TOOL_RESPONSE.finditer(row.text))
        assert [match.group(1) for match in responses] == tool_turns
        for match in responses:  # tool results: prompt
            row.prompt(row.tokens(*match.span()))
        schemas = list(TOOLS.finditer(row.text))
        assert len(schemas) == 1 and '"name": "calculator"' in schemas[0].group()
        row.prompt(row.tokens(*schemas[0].span()))
        calls, results = calls + n_calls, results + len(tool_turns)
    assert calls == results > 40
    # Some tool-call tokens are trained somewhere (the masking did not take every call).
    assert any(row.labels[j] != IGNORE for row in rows
               for m in TOOL_CALL.finditer(row.text, row.text.index("<|im_end|>")) for j in row.tokens(*m.span()))


def reasoning_spans(row: Rendered) -> list[tuple[int, int]]:
    """The character spans of the non-empty reasoning texts inside the rendered `<think>` blocks."""
    return [match.span(1) for match in THINK.finditer(row.text) if match.group(1).strip()]


def test_reasoning_sample_reasoning_is_response_and_scored(runs, tokenizer):
    run = runs["reasoning"]
    rows = rendered_rows(run, tokenizer)
    assert len(rows) == len(run["records"]) == 40
    scored = 0
    for row in rows:
        spans = reasoning_spans(row)
        assert len(spans) == 1  # Qwen3 renders the reasoning of the last assistant turn only
        positions = row.tokens(*spans[0])
        row.trained_unless_masked(positions)
        scored += int((~np.isnan(row.score[positions])).sum())
    assert scored > 0 and run["stats"]["masked_tokens"] > 0


def test_no_score_reasoning_keeps_reasoning_trained_unmasked_and_unscored(runs, tokenizer):
    run = runs["reasoning-unscored"]
    rows = rendered_rows(run, tokenizer)
    reasoning_tokens = answer_scored = 0
    for row in rows:
        (start, end), = reasoning_spans(row)
        positions = row.tokens(start, end, inside=True)
        assert positions
        for j in positions:
            assert row.labels[j] == row.ids[j] and not row.unsafe[j] and np.isnan(row.score[j])
        reasoning_tokens += len(positions)
        after = row.tokens(end, len(row.text), inside=True)  # `</think>`, the answer, `<|im_end|>`
        answer_scored += int((~np.isnan(row.score[after])).sum())
    assert reasoning_tokens > 1000 and answer_scored > 0
    assert run["stats"]["masked_tokens"] > 0  # the answers were still masked
    # The same rows, same ids, as the run that scored the reasoning: only the scores and labels differ.
    assert {row: ids for row, (ids, _) in run["rows"].items()} == \
        {row: ids for row, (ids, _) in runs["reasoning"]["rows"].items()}


@pytest.mark.parametrize("sample", ["agentic", "reasoning"])
def test_trl_sft_trainer_trains_on_the_output_unchanged(tmp_path, runs, tiny_models, tokenizer, sample):
    run = runs[sample]
    dataset = run["dataset"]
    pairs = [(tuple(ids), tuple(labels)) for ids, labels in run["rows"].values()]
    filtered = {"rows": pairs, "masked_tokens": run["stats"]["masked_tokens"],
                "unsafe": {tuple(ids): run["scores"][row][1].tolist() for row, (ids, _) in run["rows"].items()}}
    assert len(filtered["unsafe"]) == len(pairs)  # input_ids are distinct, so they key the flags
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=2, max_steps=2, max_length=1024,
                     logging_steps=1, save_strategy="no")
    assert max(len(ids) for ids, _ in pairs) <= 1024
    trainer = SFTTrainer(model=reference_model(tiny_models), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    # TRL's own batches carry our input_ids and labels as they are: every masked token stays -100.
    assert_masking_survives([seq for batch in trainer.get_train_dataloader() for seq in sequences(batch)], filtered)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert all(math.isfinite(loss) for loss in losses) and math.isfinite(result.training_loss)
