import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import chat, write_jsonl
from toss_filter import ScoreConfig, score_dataset
from toss_filter.errors import ConfigError
from toss_filter.run import RunDir
from toss_filter.fingerprint import tokens_digest
from toss_filter.config import TrainRefConfig
from toss_filter.train import train_reference

ROWS = [chat(f"What is {i} plus {i}?", f"Sure! {i} plus {i} is {2 * i}. Happy to help.") for i in range(8)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("train")
    data = write_jsonl(root / "data.jsonl", ROWS)
    config = TrainRefConfig(str(data), str(tiny_models["base"]), str(root / "adapter"), learning_rate=5e-3,
                            epochs=4, batch_size=4, micro_batch_size=2, target_modules=["all-linear"], rank=4)
    return data, root / "adapter", train_reference(config)


@pytest.mark.slow
def test_train_ref_writes_a_loadable_adapter_whose_loss_went_down(trained, tiny_models):
    _, adapter, record = trained
    assert record["final_loss"] < record["first_loss"]
    assert record["rows_trained"] == len(ROWS) and record["optimizer_steps"] == 8  # 4 epochs × 8 rows / batch 4
    assert json.loads((adapter / "training.json").read_text())["data_sha256"] == record["data_sha256"]
    assert not (adapter / "README.md").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["base"]), adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_models["base"]) and config["r"] == 4


@pytest.mark.slow
def test_train_ref_and_filter_see_identical_tokens_and_masks(trained, tiny_models, tmp_path):
    data, adapter, record = trained
    score_dataset(ScoreConfig(str(data), str(adapter), str(tiny_models["utility"]), str(tmp_path / "run")), show_progress=False)
    assert tokens_digest(RunDir(tmp_path / "run").read_tokens()) == record["data_sha256"]


def test_batch_size_must_be_a_multiple_of_the_micro_batch(tmp_path):
    with pytest.raises(ConfigError, match="multiple"):
        TrainRefConfig("d.jsonl", "base", str(tmp_path / "a"), batch_size=10, micro_batch_size=4)


def test_max_rows_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--max-rows"):
        TrainRefConfig("d.jsonl", "base", str(tmp_path / "a"), max_rows=0)


@pytest.mark.slow
def test_init_adapter_continues_an_adapter_with_its_own_lora_shape(trained, tiny_models, tmp_path):
    data, start, _ = trained
    config = TrainRefConfig(str(data), str(tiny_models["base"]), str(tmp_path / "continued"), learning_rate=5e-3,
                            epochs=1, batch_size=4, micro_batch_size=4, init_adapter=str(start), rank=16)
    record = train_reference(config)
    assert record["lora"]["rank"] == 4 and record["settings"]["init_adapter"] == str(start)  # the adapter's r, not 16
    base = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    before = PeftModel.from_pretrained(base, start).state_dict()
    after = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["base"]),
                                      tmp_path / "continued").state_dict()
    lora = [name for name in after if "lora_" in name]
    assert lora and any(not torch.equal(before[name], after[name]) for name in lora)


@pytest.mark.slow
def test_init_adapter_of_another_base_is_refused(trained, tmp_path):
    data, start, _ = trained
    config = TrainRefConfig(str(data), "some/other-base", str(tmp_path / "a"), init_adapter=str(start))
    with pytest.raises(ConfigError, match="--init-adapter: .* was trained on"):
        train_reference(config)


@pytest.mark.slow
def test_the_same_recipe_rebuilds_the_same_weights(trained, tiny_models, tmp_path):
    data, _, record = trained
    config = TrainRefConfig(str(data), str(tiny_models["base"]), str(tmp_path / "again"), learning_rate=5e-3,
                            epochs=4, batch_size=4, micro_batch_size=2, target_modules=["all-linear"], rank=4)
    again = train_reference(config)
    assert again["weights_sha256"] == record["weights_sha256"] and again["final_loss"] == record["final_loss"]
    assert record["train_seconds"]["wall"] > 0 and record["train_seconds"]["cpu"] > 0


@pytest.mark.slow
def test_several_inputs_train_together_and_max_rows_counts_over_all(trained, tiny_models, tmp_path):
    data, _, _ = trained
    second = write_jsonl(tmp_path / "more.jsonl", [chat("Name a colour.", "Blue, like the sky.")] * 3)
    config = TrainRefConfig([str(data), str(second)], str(tiny_models["base"]), str(tmp_path / "both"),
                            epochs=1, batch_size=4, micro_batch_size=4, max_rows=len(ROWS) + 2)
    record = train_reference(config)
    assert record["rows_in"] == len(ROWS) + 2 and record["data"] == [str(data), str(second)]
