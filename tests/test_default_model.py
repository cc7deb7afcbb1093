import json

from toss_filter.default_model import EMBEDDED_MODEL_ID, embedded_model_dir, resolve_model_path


def test_the_embedded_default_is_served_offline_under_its_hub_name(smollm2_dir):
    assert resolve_model_path(EMBEDDED_MODEL_ID) == str(smollm2_dir) == str(embedded_model_dir())
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # a plain float model that any backend loads
    assert (smollm2_dir / "tokenizer.json").exists()


def test_local_paths_win_and_other_names_pass_through(tmp_path, monkeypatch):
    local = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(EMBEDDED_MODEL_ID) == EMBEDDED_MODEL_ID  # the relative local directory exists
    assert resolve_model_path("someone/other-model") == "someone/other-model"
