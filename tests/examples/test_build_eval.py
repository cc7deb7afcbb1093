"""The bundled eval, refs and mix files (examples/data/{eval,refs,mix}) are exactly what examples/data/build_eval.py
draws from the offline data folder: no hand edit, no stale file, no file the script no longer writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, offline_data

DATA = REPO / "examples" / "data"


@pytest.mark.slow
@pytest.mark.subprocess
def test_build_eval_rebuilds_every_bundled_file_byte_for_byte(tmp_path: Path):
    shared = offline_data()
    subprocess.run([sys.executable, str(DATA / "build_eval.py"), "--shared", str(shared), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    built = sorted(path.relative_to(tmp_path) for path in tmp_path.glob("*/*.jsonl"))
    bundled = sorted(path.relative_to(DATA) for folder in ("eval", "refs", "mix") for path in (DATA / folder).glob("*.jsonl"))
    assert built == bundled
    assert [path for path in built if (tmp_path / path).read_bytes() != (DATA / path).read_bytes()] == []
