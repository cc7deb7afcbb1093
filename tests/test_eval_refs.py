"""`eval-refs`: its numbers equal a direct computation from the run's sidecar, its AUROC equals a pairwise count
with ties, and bad labels are one line naming the file, row and field."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from typer.testing import CliRunner

from conftest import REPO, read_jsonl, write_jsonl
from toss_filter.cli import app
from toss_filter.errors import InputError
from toss_filter.eval_refs import auroc, read_labels, write_plot


def pairwise_auroc(positive: list[float], negative: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive, negative))
    return wins / (len(positive) * len(negative))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_a_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    positive, negative = rng.integers(0, 4, size=7).astype(float), rng.integers(0, 4, size=11).astype(float)
    assert auroc(positive, negative) == pytest.approx(pairwise_auroc(list(positive), list(negative)))


def test_auroc_extremes_and_empty_sides():
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([]), np.array([1.0])) is None


def rows(label: str, count: int, words: str) -> list[dict]:
    return [{"prompt": f"{label} question {i}?", "completion": f"{words} {i} " * (2 + i % 3), "label": label,
             "source": f"{label}-{i % 2}/part#{i}"} for i in range(count)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_models) -> tuple[Path, Path, Path]:
    """(harmful.jsonl, benign.jsonl, the eval-refs output directory) of one run on the tiny models."""
    root = tmp_path_factory.mktemp("eval-refs")
    harmful = write_jsonl(root / "harmful.jsonl", rows("harmful", 5, "do the bad thing"))
    benign = write_jsonl(root / "benign.jsonl", rows("benign_general", 4, "here is a recipe")
                         + rows("benign_math", 4, "twelve plus three is fifteen"))
    out = root / "eval"
    result = CliRunner().invoke(app, ["eval-refs", str(harmful), str(benign), "--safety-model", str(tiny_models["safety"]),
                                      "--utility-model", str(tiny_models["utility"]), "--output", str(out),
                                      "--device", "cpu", "--ratio", "0.3"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "AUROC" in result.stdout
    return harmful, benign, out


def test_harness_equals_a_direct_computation_from_the_sidecar(evaluated):
    harmful, benign, out = evaluated
    report = json.loads((out / "eval-refs.json").read_text())

    labels = [row["label"] for row in read_jsonl(harmful, benign)]
    sidecar = load_from_disk(str(out / "run" / "token_scores"))
    share, mean = {}, {}
    for row, scores, unsafe in zip(sidecar["row"], sidecar["score"], sidecar["unsafe"]):
        scores = np.array(scores, dtype=np.float64)
        scored = ~np.isnan(scores)
        share[row], mean[row] = np.array(unsafe)[scored].mean(), scores[scored].mean()
    assert [r["label"] for r in report["rows"]] == labels
    assert [r["masked_share"] for r in report["rows"]] == pytest.approx([share[i] for i in range(len(labels))])
    assert [r["mean_score"] for r in report["rows"]] == pytest.approx([mean[i] for i in range(len(labels))], rel=1e-5)

    def of(label: str, values: dict) -> list[float]:
        return [values[i] for i, row_label in enumerate(labels) if label in (row_label, "rest") and row_label != "harmful"
                or label == row_label == "harmful"]

    for group in ("benign_general", "benign_math", "rest"):
        comparison = report["comparisons"][group]
        assert comparison["auroc_masked_share"] == pytest.approx(pairwise_auroc(of("harmful", share), of(group, share)))
        assert comparison["auroc_mean_score"] == pytest.approx(pairwise_auroc(of("harmful", mean), of(group, mean)))
        assert comparison["share_losing_over_half"] == pytest.approx(np.mean(np.array(of(group, share)) > 0.5))
    for group in ("harmful", "benign_general", "benign_math"):
        assert report["groups"][group]["masked_share_mean"] == pytest.approx(np.mean(of(group, share)))
    # the harness masks through the real pipeline: its budget is the global top share of all rows together
    stats = json.loads((out / "run" / "stats.json").read_text())
    assert report["masked_tokens"] == stats["masked_tokens"] == int(0.3 * stats["scored_tokens"])
    assert (out / "eval-refs.png").exists() or "plot_skipped" in report


def test_per_source_lines_equal_a_direct_computation(evaluated):
    harmful, benign, out = evaluated
    report = json.loads((out / "eval-refs.json").read_text())
    rows = report["rows"]
    sources = [json.loads(line)["source"].split("/")[0] for path in (harmful, benign) for line in path.read_text().splitlines()]

    def shares(label: str, source: str | None = None) -> list[float]:
        return [row["masked_share"] for row, row_source in zip(rows, sources)
                if row["label"] == label and source in (None, row_source)]

    entries = {(entry["label"], entry["source"]): entry for entry in report["sources"]}
    assert set(entries) == {(label, f"{label}-{k}") for label in ("harmful", "benign_general", "benign_math") for k in (0, 1)}
    harmful_0 = entries[("harmful", "harmful-0")]
    assert harmful_0["rows"] == 3 and harmful_0["masked_share_mean"] == pytest.approx(np.mean(shares("harmful", "harmful-0")))
    assert harmful_0["auroc_masked_share"]["benign_math"] == pytest.approx(
        pairwise_auroc(shares("harmful", "harmful-0"), shares("benign_math")))
    assert entries[("benign_general", "benign_general-1")]["auroc_masked_share"]["harmful"] == pytest.approx(
        pairwise_auroc(shares("harmful"), shares("benign_general", "benign_general-1")))


@pytest.mark.subprocess
def test_the_example_script_prints_the_harness_numbers(evaluated):
    harmful, benign, out = evaluated
    report = json.loads((out / "eval-refs.json").read_text())
    printed = subprocess.run([sys.executable, str(REPO / "examples" / "masked_share_by_label.py"), str(harmful),
                              str(benign), str(out / "run"), "--held-out", str(out / "eval-refs.json")],
                             capture_output=True, text=True, check=True).stdout
    rest = report["comparisons"]["rest"]["auroc_masked_share"]
    assert f"AUROC of per-row masked share, harmful vs rest: {rest:.3f}" in printed
    harmful_line = next(line.split() for line in printed.splitlines() if line.startswith("harmful "))
    assert harmful_line == ["harmful", str(report["groups"]["harmful"]["rows"]),
                            f"{report['groups']['harmful']['masked_share_mean']:.1%}"]
    math = report["comparisons"]["benign_math"]  # --held-out quotes an eval-refs.json
    assert (f"benign_math              masked {math['masked_share_mean']:.1%}, "
            f"AUROC harmful vs it {math['auroc_masked_share']:.3f}") in printed


def test_a_row_without_its_label_is_named_by_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", rows("harmful", 2, "x") + [{"prompt": "p", "completion": "c"}])
    with pytest.raises(InputError, match=r"bad\.jsonl: row 2: field 'label'"):
        read_labels([str(path)], "label")


def test_cli_names_the_bad_row_in_one_line(tmp_path, tiny_models):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c", "group": 3}])
    result = CliRunner().invoke(app, ["eval-refs", str(path), "--safety-model", str(tiny_models["safety"]),
                                      "--utility-model", str(tiny_models["utility"]), "--output", str(tmp_path / "o"),
                                      "--label-column", "group"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"toss-filter: error: {path}: row 0: field 'group': expected a non-empty string label, got 3"


def test_without_matplotlib_the_plot_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it gives
    skipped = write_plot({"groups": {}, "rows": [], "config": {"ratio": 0.2}}, tmp_path / "p.png")
    assert "matplotlib is not installed" in skipped["plot_skipped"] and not (tmp_path / "p.png").exists()


def test_a_row_the_pipeline_refuses_is_named_in_its_own_file(tmp_path, tiny_models):
    first = write_jsonl(tmp_path / "first.jsonl", rows("harmful", 3, "x"))
    second = write_jsonl(tmp_path / "second.jsonl", rows("benign", 1, "y") + [{"prompt": "p", "completion": 5, "label": "benign"}])
    result = CliRunner().invoke(app, ["eval-refs", str(first), str(second), "--safety-model", str(tiny_models["safety"]),
                                      "--utility-model", str(tiny_models["utility"]), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"toss-filter: error: {second}: row 1: field 'completion': ")


@pytest.mark.slow
def test_rounds_measure_the_final_round_of_toss_pro(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "rows.jsonl", rows("harmful", 4, "do the bad thing") + rows("benign_math", 4, "two plus two"))
    result = CliRunner().invoke(app, ["eval-refs", str(data), "--safety-model", str(tiny_models["safety"]),
                                      "--utility-model", str(tiny_models["utility"]), "--output", str(tmp_path / "e"),
                                      "--device", "cpu", "--ratio", "0.3", "--rounds", "2", "--refine-learning-rate",
                                      "5e-2", "--refine-batch-size", "4", "--refine-micro-batch-size", "2", "--quiet"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads((tmp_path / "e" / "eval-refs.json").read_text())
    stats = json.loads((tmp_path / "e" / "run" / "stats.json").read_text())
    assert report["refine"]["rounds"] == 2 and [entry["round"] for entry in stats["rounds"]] == [1, 2]
    sidecar = load_from_disk(str(tmp_path / "e" / "run" / "token_scores"))  # the final round's masks
    assert sum(sum(unsafe) for unsafe in sidecar["unsafe"]) == report["masked_tokens"] == stats["masked_tokens"]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["shorter", "other-ratio", "exclude"])
def test_subset_script_equals_a_direct_run(evaluated, tiny_models, tmp_path, case):
    harmful, benign, out = evaluated
    inputs, option = [harmful, benign], {"shorter": ["--max-length", "45"], "other-ratio": ["--ratio", "0.1"]}.get(case, [])
    if case == "exclude":  # two harmful rows and one benign row left out: the budget is over the rest
        left_out = read_jsonl(harmful, benign)[1:8:3]
        excludes = [write_jsonl(tmp_path / f"exclude-{i}.jsonl", [{"source": row["source"]} for row in part])
                    for i, part in enumerate((left_out[:2], left_out[2:]))]  # two files, as the audit has
        inputs = [write_jsonl(tmp_path / file.name, [row for row in read_jsonl(file) if row not in left_out])
                  for file in (harmful, benign)]
    script = [sys.executable, str(REPO / "examples" / "eval_refs_subset.py"), str(out), *option,
              *(["--exclude", *map(str, excludes)] if case == "exclude" else [])]
    printed = subprocess.run(script, capture_output=True, text=True, check=True).stdout
    result = CliRunner().invoke(app, ["eval-refs", *map(str, inputs), "--safety-model", str(tiny_models["safety"]),
                                      "--utility-model", str(tiny_models["utility"]), "--output", str(tmp_path / "direct"),
                                      "--device", "cpu", "--ratio", "0.3", *option, "--quiet"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    direct = json.loads((tmp_path / "direct" / "eval-refs.json").read_text())
    full = json.loads((out / "eval-refs.json").read_text())
    if case == "shorter":
        assert direct["rows"][0]["response_tokens"] < full["rows"][0]["response_tokens"]
    elif case == "other-ratio":
        assert direct["masked_tokens"] < full["masked_tokens"]
    else:
        assert len(direct["rows"]) == len(full["rows"]) - 3
    for group in ("benign_general", "benign_math"):
        line = next(line for line in printed.splitlines() if line.startswith(group + " "))
        comparison = direct["comparisons"][group]
        assert f"masked {comparison['masked_share_mean']:.1%}" in line
        assert f"AUROC masked share {comparison['auroc_masked_share']:.3f}" in line
