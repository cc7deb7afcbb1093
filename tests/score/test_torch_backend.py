import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import load_from_disk
from peft import PeftModel
from transformers import AutoModelForCausalLM

from toss_filter import ScoreConfig, SelectConfig, filter_dataset
from toss_filter.config import ExecutorConfig
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
from toss_filter.plan import read_table
from toss_filter.run import RunDir
from toss_filter.score import torch_backend
from toss_filter.score.models import ReferenceModels, resolve_spec
from toss_filter.score.torch_backend import TorchScorer, length_sorted_batches, single_row_batches

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Sure, 2+2 is 4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green, or maybe a long answer about red and orange and yellow tones."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today?"}],
]


@pytest.fixture(scope="module")
def rows(tokenizer):
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"))
    return [(np.array(t.input_ids), np.array(t.labels)) for t in map(encode, CONVERSATIONS)]


def direct_nll(model, ids: np.ndarray) -> np.ndarray:
    """-log p(ids[j] | ids[:j]) from one unbatched, unpadded full forward pass, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return np.concatenate([[np.nan], -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).numpy()])


def test_each_score_equals_a_direct_model_call_at_that_position(tiny_models, rows):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    nll = TorchScorer(max_batch_tokens=64).model_nll(model, rows)
    for (ids, labels), got in zip(rows, nll):
        expected = direct_nll(model, ids)
        response = (labels != -100) & (np.arange(len(ids)) > 0)
        assert len(got) == len(ids)
        np.testing.assert_allclose(got[response], expected[response], rtol=0, atol=1e-4)
        assert np.isnan(got[~response]).all()


def test_adapters_on_a_shared_base_score_like_separately_loaded_peft_models(tiny_models, rows):
    specs = {role: resolve_spec(role, str(tiny_models[role]), None) for role in ("safety", "utility")}
    references = ReferenceModels(specs["safety"], specs["utility"], torch.float32, "cpu")
    assert references.shared_base
    scorer = TorchScorer(references, max_batch_tokens=10_000)
    for role in ("safety", "utility"):
        got = scorer.nll(role, rows)
        base = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
        separate = PeftModel.from_pretrained(base, tiny_models[role]).eval()
        for (ids, labels), values in zip(rows, got):
            response = (labels != -100) & (np.arange(len(ids)) > 0)
            np.testing.assert_allclose(values[response], direct_nll(separate, ids)[response], atol=1e-4)
    safety, utility = (scorer.nll(r, rows[:1])[0] for r in ("safety", "utility"))
    assert np.nanmax(np.abs(safety - utility)) > 1e-3, "the two adapters must give different scores"


def _lora_layers(model: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_float32_adapters_are_merged_and_every_role_switch_is_exactly_repeatable(tiny_models, rows):
    specs = {role: resolve_spec(role, str(tiny_models[role]), None) for role in ("safety", "utility")}
    references = ReferenceModels(specs["safety"], specs["utility"], torch.float32, "cpu")
    scorer = TorchScorer(references)
    assert scorer.one_model_at_a_time
    first = {role: scorer.nll(role, rows) for role in ("safety", "utility")}
    assert all(layer.merged for layer in _lora_layers(references.model_for("utility")))
    fresh = TorchScorer(ReferenceModels(specs["safety"], specs["utility"], torch.float32, "cpu"))
    # Back to safety (a reload), forward to utility again, and utility first in a fresh process-like start.
    for role, other in (("safety", scorer), ("utility", scorer), ("utility", fresh), ("safety", fresh)):
        for a, b in zip(first[role], other.nll(role, rows)):
            np.testing.assert_array_equal(a, b)
    # A role's scores do not depend on the other reference: utility beside another safety adapter (here utility's
    # own), bit for bit.
    alone = TorchScorer(ReferenceModels(specs["utility"], specs["utility"], torch.float32, "cpu"))
    for role in ("safety", "utility"):
        for a, b in zip(first["utility"], alone.nll(role, rows)):
            np.testing.assert_array_equal(a, b)


def test_bfloat16_adapters_stay_unmerged(tiny_models, rows):
    specs = {role: resolve_spec(role, str(tiny_models[role]), None) for role in ("safety", "utility")}
    references = ReferenceModels(specs["safety"], specs["utility"], torch.bfloat16, "cpu")
    assert not any(layer.merged for layer in _lora_layers(references.model_for("safety")))
    scorer = TorchScorer(references)
    safety, utility = (scorer.nll(role, rows[:1])[0] for role in ("safety", "utility"))
    assert np.nanmax(np.abs(safety - utility)) > 1e-3


def test_scores_do_not_depend_on_batching(tiny_models, rows):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    one_by_one = TorchScorer(max_batch_tokens=1).model_nll(model, rows)
    batched = TorchScorer(max_batch_tokens=100_000, logits_chunk=7).model_nll(model, rows)
    for a, b in zip(one_by_one, batched):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_batch_invariant_scoring_runs_each_row_alone_and_gives_a_row_the_same_bits_beside_any_rows(tiny_models, rows):
    assert not TorchScorer().batch_invariant  # opt-in: bench/batch_invariance.py measures its cost
    assert single_row_batches([5, 100, 7, 100]) == [[1], [3], [2], [0]]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    scorer = TorchScorer(max_batch_tokens=100_000, batch_invariant=True)
    scorer.model_nll(model, rows[:1])  # its one-off head check runs a forward pass of its own
    widths = []
    model.get_decoder().register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                                  with_kwargs=True)
    invariant = scorer.model_nll(model, rows)
    assert sorted(widths) == sorted((1, len(ids)) for ids, _ in rows)  # one unpadded row per forward pass
    # A row's scores are the same bits alone, beside other rows, or in another order.
    for subset in ([0], [1, 2], [2, 1, 0]):
        again = TorchScorer(batch_invariant=True).model_nll(model, [rows[i] for i in subset])
        for i, values in zip(subset, again):
            np.testing.assert_array_equal(values, invariant[i])


def test_length_sorted_batches_respect_the_budget_and_cover_every_row():
    lengths = [5, 100, 7, 50, 50, 3, 200]
    batches = length_sorted_batches(lengths, max_batch_tokens=120)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 120
    assert batches[0] == [6]  # a row over the budget runs alone, first


def _score_bytes(run_dir: Path) -> dict[str, bytes]:
    """Every role's score shards, and the sidecar's rows and scores, concatenated in row order, as raw bytes."""
    run = RunDir(run_dir)
    state = json.loads((run_dir / "run.json").read_text())
    out = {}
    for role in ("safety", "utility"):
        table = pa.concat_tables([read_table(run.score_shard(state["score_key"], role, shard))
                                  for shard in range(state["shards"])])
        nll = table.column("nll").combine_chunks()
        out[f"{role}.row"] = table.column("row").to_numpy().tobytes()
        out[f"{role}.lengths"] = np.diff(nll.offsets.to_numpy()).tobytes()
        out[f"{role}.nll"] = nll.flatten().to_numpy(zero_copy_only=False).tobytes()
    sidecar = load_from_disk(str(run_dir / "token_scores")).data.table
    score = sidecar.column("score").combine_chunks()
    out["sidecar.row"] = sidecar.column("row").to_numpy().tobytes()
    out["sidecar.lengths"] = np.diff(score.offsets.to_numpy()).tobytes()
    out["sidecar.score"] = score.flatten().to_numpy(zero_copy_only=False).tobytes()
    return out


class _BatchInvariantScorer(TorchScorer):
    """TorchScorer with batch_invariant=True whatever the caller passes. A stand-in until steps/score.py builds its
    scorer with `batch_invariant=config.deterministic`; then the monkeypatch below can go (deterministic=True stays)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "batch_invariant": True})


@pytest.mark.slow
def test_one_shard_and_seven_row_shards_give_byte_identical_scores_under_the_smollm2_references(tmp_path, monkeypatch):
    """The issue's case, smaller: the bundled SmolLM2 references on 21 rows of custom_mix.jsonl cut at 256 tokens,
    filtered as one shard and as 3 shards of 7 rows, each row scored alone. Batched rows (the default) give other
    bits here: 359 of 2,511 safety scores moved between the two layouts. Cut at 128 or 192 tokens, nearly every row
    has the same length, batches carry little padding and batched scores agreed too, so that would test nothing."""
    monkeypatch.setattr(torch_backend, "TorchScorer", _BatchInvariantScorer)
    # The worker pins one torch thread, as a Ray replica does: on 2 busy cores each of a lone row's many small ops
    # would otherwise wait on a thread barrier (bench/batch_invariance.py), and the test would take 10 minutes.
    threads = torch.get_num_threads()
    runs = {}
    for shard_rows in (1000, 7):
        run_dir = tmp_path / f"run-{shard_rows}"
        score = ScoreConfig(input=str(EXAMPLES / "data" / "custom_mix.jsonl"),
                            safety_model=str(EXAMPLES / "reference-adapters" / "safety"),
                            utility_model=str(EXAMPLES / "reference-adapters" / "utility"),
                            run_dir=str(run_dir), limit=21, max_length=256, shard_rows=shard_rows, deterministic=True)
        select = SelectConfig(run_dir=str(run_dir), output=str(tmp_path / f"out-{shard_rows}"), report=False)
        try:
            filter_dataset(score, select, show_progress=False, executor=ExecutorConfig(threads=1))
        finally:
            torch.set_num_threads(threads)
        runs[shard_rows] = _score_bytes(run_dir)
    assert json.loads((tmp_path / "run-7" / "run.json").read_text())["shards"] == 3
    one, seven = runs[1000], runs[7]
    assert one.keys() == seven.keys()
    for name in one:
        assert one[name] == seven[name], f"{name} differs between 1 shard and 7-row shards"
    scores = np.frombuffer(one["sidecar.score"], dtype=np.float32)
    assert np.isfinite(scores).sum() > 1000  # the comparison covers real scores, not NaN placeholders
