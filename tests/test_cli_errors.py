"""`toss-filter filter` on bad input, bad options and bad models: one clear line on stderr that names the file, the
row and the problem, exit code 2, no traceback, and no output directory that looks finished."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from toss_filter.cli import app
from toss_filter.errors import ConfigError
from conftest import chat, write_jsonl

ERROR_PREFIX = "toss-filter: error: "


GOOD_ROWS = [chat("Hi", "Hello there."), chat("What is 2+2?", "4.")]


def run_filter(tmp_path: Path, data: Path, *options: str, models: dict | None = None,
               safety: str | None = None, utility: str | None = None) -> tuple[int, str, str]:
    """Run `toss-filter filter DATA ... --output tmp/out` in-process; returns (exit code, stdout, stderr)."""
    safety = safety or str(models["safety"])
    utility = utility or str(models["utility"])
    args = ["filter", str(data), "--safety-model", safety, "--utility-model", utility,
            "--output", str(tmp_path / "out"), "--device", "cpu", *options]
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def assert_clean_failure(tmp_path: Path, code: int, stdout: str, stderr: str, *expected: str) -> str:
    """Exit 2, exactly one error line (the last line of stderr) holding every `expected` text, nothing on stdout,
    no traceback, and neither OUTPUT nor OUTPUT-rejected nor a finished run directory."""
    assert code == 2, (code, stdout, stderr)
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0]
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out-rejected").exists()
    assert not list(tmp_path.glob("*-rejected"))
    run_dir = tmp_path / "out-run"
    for finished in ("run.json", "stats.json", "token_scores"):
        assert not (run_dir / finished).exists()
    return errors[0]


# --------------------------------------------------------------------------------------------------- bad input


def test_broken_json(tmp_path, tiny_models):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD_ROWS[0]) + "\n" + '{"messages": [{"role": "user", "content": "x"}\n',
                    encoding="utf-8")
    line = assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models),
                                str(data), "row 1", "broken JSON on line 2")
    assert line.startswith(f"{ERROR_PREFIX}{data}: row 1: broken JSON on line 2: ")


def test_unknown_role(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", [*GOOD_ROWS, {
        "messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}])
    line = assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models),
                                str(data), "row 2", "messages[1].role", "unknown role 'robot'")
    assert line == (f"{ERROR_PREFIX}{data}: row 2: field 'messages[1].role': "
                    "unknown role 'robot' (expected one of system, developer, user, assistant, tool, ipython)")


def test_missing_role(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROWS[0], {
        "messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}])
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models),
                         str(data), "row 1", "messages[0]", "missing 'role'")


def test_empty_assistant_turn(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", [*GOOD_ROWS, chat("x", "  ")])
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models),
                         str(data), "row 2", "messages[1].content", "empty assistant turn")


def test_content_of_wrong_type(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROWS[0], {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 42}]}])
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models),
                         str(data), "row 1", "messages[1].content", "expected a string or a list of text parts, got int")


def test_prompt_of_wrong_type(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": ["x"], "completion": "y"}])
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models),
                         str(data), "row 0", "field 'prompt'", "expected a string, got list")


def test_unknown_row_shape(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROWS[0], {"text": "x"}])
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models),
                         str(data), "row 1", "no known row shape")


def test_empty_file(tmp_path, tiny_models):
    data = tmp_path / "data.jsonl"
    data.write_text("", encoding="utf-8")
    line = assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models), str(data), "no rows")
    assert line == f"{ERROR_PREFIX}{data}: the input has no rows"


def test_missing_input_file(tmp_path, tiny_models):
    data = tmp_path / "missing.jsonl"
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models=tiny_models), str(data), "no such file")


def test_column_remap_to_missing_column(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, "--column", "prompt=q", "--column", "completion=a",
                                                models=tiny_models),
                         str(data), "row 0", "no known row shape")


# ------------------------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize("ratio", ["-0.1", "1.5"])
def test_ratio_outside_unit_interval(tmp_path, tiny_models, ratio):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(tmp_path, *run_filter(tmp_path, data, "--ratio", ratio, models=tiny_models),
                                "--ratio must be within [0, 1]", f"got {float(ratio)}")
    assert line == f"{ERROR_PREFIX}--ratio must be within [0, 1], got {float(ratio)}"
    assert not (tmp_path / "out-run").exists()  # refused before anything is written


def test_column_without_equals(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(tmp_path, *run_filter(tmp_path, data, "--column", "prompt", models=tiny_models),
                                "--column expects canonical=actual", "'prompt'")
    assert line == f"{ERROR_PREFIX}--column expects canonical=actual, got 'prompt'"
    assert not (tmp_path / "out-run").exists()


def test_missing_template_file(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    missing = tmp_path / "nope.jinja"
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, "--template", str(missing), models=tiny_models),
                         "--template must be chat, paper or a Jinja file", str(missing))


# ------------------------------------------------------------------------------------------------- bad models


def test_missing_model_path(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(
        tmp_path, *run_filter(tmp_path, data, safety="/nonexistent", utility=str(tiny_models["base"])),
        "--safety-model", "/nonexistent",
    )
    assert line == f"{ERROR_PREFIX}--safety-model: no such model directory: /nonexistent"
    assert not (tmp_path / "out-run").exists()


def test_model_directory_without_config(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    (tmp_path / "empty_model").mkdir()
    assert_clean_failure(
        tmp_path, *run_filter(tmp_path, data, safety=str(tiny_models["base"]), utility=str(tmp_path / "empty_model")),
        "--utility-model", "neither config.json", "adapter_config.json",
    )


def test_adapter_on_a_base_it_does_not_fit(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(
        tmp_path, *run_filter(tmp_path, data, "--base-model", str(tiny_models["other_base"]), "--quiet",
                              models=tiny_models),
        "does not fit the base model", str(tiny_models["other_base"]),
    )
    assert line.startswith(f"{ERROR_PREFIX}--safety-model {tiny_models['safety']} does not fit the base model ")
    assert "size mismatch" in line  # the useful line of peft's error, not its headline


def test_tokenizers_that_differ(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    different = tmp_path / "different"
    shutil.copytree(tiny_models["base"], different)
    tokenizer = AutoTokenizer.from_pretrained(different)
    assert tokenizer.add_tokens(["<|extra_token|>"]) == 1
    tokenizer.save_pretrained(different)
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(
        tmp_path, *run_filter(tmp_path, data, safety=str(different), utility=str(tiny_models["base"])),
        "different tokenizers", "vocabularies",
    )
    assert "bos_token" not in line and "chat_template" not in line


@pytest.mark.parametrize(("role", "text", "problem"), [
    ("safety", '{"r": 8,,}', "is not valid JSON: Expecting property name"),
    ("utility", "", "is not valid JSON: Expecting value"),
    ("safety", '["q_proj"]', "is not a JSON object"),
])
def test_a_broken_adapter_config_is_one_line_naming_the_file(tmp_path, tiny_models, role, text, problem):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models[role], broken)
    (broken / "adapter_config.json").write_text(text, encoding="utf-8")
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(tmp_path, *run_filter(tmp_path, data, models={**tiny_models, role: broken}),
                                problem)
    assert line.startswith(f"{ERROR_PREFIX}--{role}-model: {broken / 'adapter_config.json'} {problem}")


def test_a_broken_init_adapter_config_is_one_line_naming_the_file(tmp_path, tiny_models):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["utility"], broken)
    (broken / "adapter_config.json").write_text('{"r": 8,,}', encoding="utf-8")
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    result = CliRunner().invoke(app, ["train-ref", str(data), "--base-model", str(tiny_models["base"]),
                                      "--init-adapter", str(broken), "--output", str(tmp_path / "ref"), "--quiet"])
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (f"{ERROR_PREFIX}--init-adapter: {broken / 'adapter_config.json'} is not valid "
                                     "JSON: Expecting property name enclosed in double quotes: line 1 column 9 (char 8)")
    assert not (tmp_path / "ref").exists()


# ------------------------------------------------------------------------------------------- the real console


@pytest.mark.slow
@pytest.mark.subprocess
def test_console_script_exit_code_and_stderr(tmp_path, tiny_models):
    """The installed entry point (not CliRunner): exit status 2, the error alone on stderr, nothing on stdout."""
    script = Path(sys.executable).with_name("toss-filter")
    if not script.exists():
        pytest.skip("toss-filter entry point not installed in this environment")
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD_ROWS[0], chat("x", "")])
    completed = subprocess.run(
        [str(script), "filter", str(data), "--safety-model", str(tiny_models["safety"]),
         "--utility-model", str(tiny_models["utility"]), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr == (f"{ERROR_PREFIX}{data}: row 1: field 'messages[1].content': empty assistant turn\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-rejected").exists()


# ------------------------------------------------------------------------------------- pickle weights, sandboxes


def pickled(source: Path, target: Path, weights: str, pickle_name: str) -> Path:
    """A copy of the model or adapter directory `source` whose weights file `weights` (safetensors) is replaced by
    the same tensors in the pickle file `pickle_name` (torch.save)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(source, target)
    torch.save(load_file(target / weights), target / pickle_name)
    (target / weights).unlink()
    return target


@pytest.fixture(scope="module")
def pickle_models(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pickled")
    return {"base": pickled(tiny_models["base"], root / "base", "model.safetensors", "pytorch_model.bin"),
            "safety": pickled(tiny_models["safety"], root / "safety", "adapter_model.safetensors",
                              "adapter_model.bin")}


def test_a_pickle_only_model_is_refused(tmp_path, tiny_models, pickle_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(
        tmp_path, *run_filter(tmp_path, data, safety=str(tiny_models["base"]), utility=str(pickle_models["base"])))
    assert line == (f"{ERROR_PREFIX}--utility-model {pickle_models['base']}: {pickle_models['base']}/pytorch_model.bin "
                    f"is a pickle weights file and {pickle_models['base']} has no .safetensors: loading pickle can "
                    "run arbitrary code; convert it to safetensors, or pass --allow-pickle-weights if you trust its "
                    "source")
    assert not (tmp_path / "out-run").exists()  # refused before anything loads or is written


def test_a_pickle_only_adapter_and_a_pickle_only_base_are_refused(tmp_path, tiny_models, pickle_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, safety=str(pickle_models["safety"]),
                                               utility=str(tiny_models["utility"])),
                         f"--safety-model {pickle_models['safety']} (a LoRA adapter)", "adapter_model.bin",
                         "loading pickle can run arbitrary code", "--allow-pickle-weights")
    assert_clean_failure(tmp_path, *run_filter(tmp_path, data, "--base-model", str(pickle_models["base"]),
                                               models=tiny_models),
                         f"its base model {pickle_models['base']}", "pytorch_model.bin", "--allow-pickle-weights")


def test_pickle_weights_load_only_when_the_user_opts_in(pickle_models):
    import torch

    from toss_filter.score.models import ReferenceModels, resolve_spec

    spec = resolve_spec("safety", str(pickle_models["base"]), None, allow_pickle=True)
    models = ReferenceModels(spec, spec, torch.float32, "cpu")
    models.load()
    assert models.model_for("safety").model.embed_tokens.weight.shape[0] > 0
    # Without the opt-in the loader itself reads safetensors only (a Hub model is not checked before it loads).
    unchecked = dataclasses.replace(spec, allow_pickle=False)
    with pytest.raises(ConfigError, match="cannot load the safety model"):
        ReferenceModels(unchecked, unchecked, torch.float32, "cpu").load()


@pytest.mark.slow
def test_allow_pickle_weights_is_an_option_of_filter_and_score(tmp_path, pickle_models):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    code, stdout, stderr = run_filter(tmp_path, data, "--allow-pickle-weights", "--no-report", "--quiet",
                                      safety=str(pickle_models["base"]), utility=str(pickle_models["base"]))
    assert code == 0, stderr
    assert json.loads((tmp_path / "out-run" / "config.json").read_text())["score"]["allow_pickle_weights"] is True
    result = CliRunner().invoke(app, ["score", "--help"], env={"COLUMNS": "200"})  # rich squeezes long names
    assert "--allow-pickle-weights" in result.stdout


def test_a_python_tag_in_the_config_file_is_refused_and_never_run(tmp_path):
    """`--config` is read with yaml.safe_load: a !!python tag is an error, not a constructor call."""
    witness = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f'ratio: !!python/object/apply:os.system ["touch {witness}"]\n')
    result = CliRunner().invoke(app, ["select", "--run-dir", str(tmp_path / "run"), "--output",
                                      str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"{ERROR_PREFIX}--config {config}: cannot read it: could not determine a constructor "
                             "for the tag 'tag:yaml.org,2002:python/object/apply:os.system' (line 1, column 8)\n")
    assert not witness.exists()


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch WITNESS').read() }}",
])
def test_a_chat_template_cannot_leave_its_sandbox(tmp_path, tiny_models, payload):
    """A `--template FILE.jinja` renders in transformers' ImmutableSandboxedEnvironment, like the model's own: an
    escape attempt fails on one line (exit 2) and runs nothing."""
    witness = tmp_path / "ran"
    template = tmp_path / "evil.jinja"
    template.write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}"
                        + payload.replace("WITNESS", str(witness)))
    data = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    line = assert_clean_failure(tmp_path, *run_filter(tmp_path, data, "--template", str(template),
                                                      models=tiny_models), "is unsafe")
    assert "access to attribute '__" in line
    assert not witness.exists()
