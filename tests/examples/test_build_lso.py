"""The leave-source-out folds (examples/data/build_lso.py): a held-out family never trains, every row of it may be
evaluated, no evaluated text is trained on, and the bundled fold files are exactly what the script draws."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, offline_data

DATA = REPO / "examples" / "data"
sys.path.insert(0, str(DATA))
import build_lso  # noqa: E402  (a script beside the data, not a package)


def row(source: str, label: str, i: int, split: str) -> dict:
    return {"prompt": f"{source} {split} prompt {i}", "completion": f"{source} {split} answer {i}", "label": label,
            "source": f"{source}#{i}", "family": build_lso.FAMILY[source], "model": "m"}


def tiny_parts() -> dict:
    parts = {}
    for source, label in (("jailbreakbench", "harmful"), ("gptfuzz", "harmful"), ("gpteacher", "benign_general"),
                          ("dolly-safety", "benign_unsafe_sounding"), ("gptfuzz", "refusal")):
        parts[(source, label)] = {split: [row(source, label, i, split) for i in range(6)]
                                  for split in ("heldout", "train")}
    # a train row that repeats an evaluated completion must not train
    parts[("gptfuzz", "harmful")]["train"].append({**row("gptfuzz", "harmful", 0, "heldout"), "prompt": "other"})
    return parts


SPEC = {"heldout": ("jailbreakbench", "databricks-dolly"),
        "train": {("gptfuzz", "harmful"): 7, ("gpteacher", "benign_general"): 3, ("gptfuzz", "refusal"): 2},
        "eval": {("jailbreakbench", "harmful"): 12, ("dolly-safety", "benign_unsafe_sounding"): 5,
                 ("gptfuzz", "harmful"): 6, ("gpteacher", "benign_general"): 2}}


def test_a_fold_holds_whole_families_out_and_trains_on_no_evaluated_text():
    files = build_lso.fold_files(tiny_parts(), "tiny", SPEC)
    assert sorted(files) == ["eval", "refusals_mit", "safety", "utility"]
    trained = [r for name, rows in files.items() if name != "eval" for r in rows]
    assert not {r["family"] for r in trained} & set(SPEC["heldout"])
    # every row of a held-out family can be evaluated, its train part included; trained families only held-out rows
    assert len([r for r in files["eval"] if r["family"] == "jailbreakbench"]) == 12
    assert all(" heldout " in r["prompt"] for r in files["eval"] if r["family"] not in SPEC["heldout"])
    evaluated = {r[f] for r in files["eval"] for f in ("prompt", "completion")}
    assert not {r[f] for r in trained for f in ("prompt", "completion")} & evaluated
    assert len(files["safety"]) == 6  # 7 asked, the row repeating an evaluated completion left out
    assert [len(files[n]) for n in ("utility", "refusals_mit")] == [3, 2]


def test_a_held_out_family_asked_to_train_is_refused():
    spec = {**SPEC, "train": {("jailbreakbench", "harmful"): 2}}
    with pytest.raises(SystemExit, match="jailbreakbench trains, but its family jailbreakbench is held out"):
        build_lso.fold_files(tiny_parts(), "tiny", spec)


@pytest.mark.slow
@pytest.mark.subprocess
def test_build_lso_rebuilds_every_bundled_fold_file_byte_for_byte(tmp_path: Path):
    shared = offline_data()
    subprocess.run([sys.executable, str(DATA / "build_lso.py"), "--shared", str(shared), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    built = sorted(path.relative_to(tmp_path) for path in tmp_path.glob("lso/*/*.jsonl"))
    bundled = sorted(path.relative_to(DATA) for path in DATA.glob("lso/*/*.jsonl"))
    assert built == bundled and built
    assert [path for path in built if (tmp_path / path).read_bytes() != (DATA / path).read_bytes()] == []
