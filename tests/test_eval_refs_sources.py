"""eval-refs's source bookkeeping: which families the references trained on (their whole `train-ref` lineage), and
which evaluated groups are out of source. A family any reference trained on is never reported as out-of-source, and
references whose data is not recorded make every family "unknown"."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from toss_filter.cli import app
from toss_filter.data.provenance import UNKNOWN, data_families, row_family
from toss_filter.eval_refs import LabelledRow, in_source, source_standing
from toss_filter.config import TrainRefConfig
from toss_filter.train import train_reference, trained_families


def rows(label: str, family: str, count: int, words: str) -> list[dict]:
    return [{"prompt": f"{label} {family} question {i}?", "completion": f"{words} {i} " * (2 + i % 3), "label": label,
             "source": f"{family}/part#{i}", "model": f"model-{family}"} for i in range(count)]


def test_a_row_family_is_its_family_field_else_its_source_prefix():
    assert row_family({"family": "hh-rlhf", "source": "hh-rlhf-helpful/x#1"}) == "hh-rlhf"
    assert row_family({"source": "gptfuzz/train#3"}) == "gptfuzz"
    assert row_family({"source": "gsm8k#3"}) == "gsm8k"
    assert row_family({"source": "hh-rlhf-harmless-base/test/rejected#4"}) == "hh-rlhf"  # one origin, one family
    assert row_family({"family": "  ", "source": ""}) is None
    assert row_family({"messages": []}) is None


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """θu trained on gpteacher rows, θs continued from it on gptfuzz rows, by `train-ref` on the tiny base."""
    root = tmp_path_factory.mktemp("lineage")
    benign = write_jsonl(root / "benign.jsonl", rows("benign_general", "gpteacher", 4, "here is a recipe"))
    harmful = write_jsonl(root / "harmful.jsonl", rows("harmful", "gptfuzz", 4, "do the bad thing"))
    settings = dict(learning_rate=5e-3, epochs=1, batch_size=4, micro_batch_size=4, rank=4)
    train_reference(TrainRefConfig(str(benign), str(tiny_models["base"]), str(root / "utility"), **settings))
    train_reference(TrainRefConfig(str(harmful), str(tiny_models["base"]), str(root / "safety"),
                                   init_adapter=str(root / "utility"), **settings))
    return {"utility": root / "utility", "safety": root / "safety", "root": root}


def test_train_ref_records_its_families_and_its_init_adapters(lineage):
    utility = json.loads((lineage["utility"] / "training.json").read_text())
    safety = json.loads((lineage["safety"] / "training.json").read_text())
    assert utility["families"] == {"gpteacher": 4} and utility["init_adapter_families"] is None
    assert safety["families"] == {"gptfuzz": 4} and safety["init_adapter_families"] == {"gpteacher": 4}
    assert trained_families(lineage["safety"]) == {"gpteacher": 4, "gptfuzz": 4}


@pytest.mark.slow
def test_eval_refs_reports_each_group_in_or_out_of_source(lineage):
    root = lineage["root"]
    harmful = write_jsonl(root / "eval-harmful.jsonl", rows("harmful", "gptfuzz", 3, "do the bad thing")
                          + rows("harmful", "jailbreakbench", 4, "here is how to steal"))
    benign = write_jsonl(root / "eval-benign.jsonl", rows("benign_general", "dolly", 4, "the capital is paris")
                         + rows("benign_math", "gpteacher", 3, "twelve plus three"))
    out = root / "eval"
    result = CliRunner().invoke(app, ["eval-refs", str(harmful), str(benign), "--safety-model", str(lineage["safety"]),
                                      "--utility-model", str(lineage["utility"]), "--output", str(out),
                                      "--device", "cpu", "--ratio", "0.3"])
    assert result.exit_code == 0, (result.stdout, result.exception)
    assert "OUT OF SOURCE" in result.stdout
    report = json.loads((out / "eval-refs.json").read_text())
    assert report["trained_families"] == {"safety": {"gpteacher": 4, "gptfuzz": 4}, "utility": {"gpteacher": 4}}
    assert {group: s["standing"] for group, s in report["standing"].items()} == {
        "harmful": "mixed", "benign_general": "out-of-source", "benign_math": "in-source"}
    assert {(e["label"], e["source"]): e["in_source"] for e in report["sources"]} == {
        ("harmful", "gptfuzz"): True, ("harmful", "jailbreakbench"): False,
        ("benign_general", "dolly"): False, ("benign_math", "gpteacher"): True}
    assert {(e["source"], tuple(e["models"])) for e in report["sources"]} >= {("dolly", ("model-dolly",))}
    # the out-of-source comparison is the same AUROC over the unseen rows alone
    unseen = [row for row in report["rows"] if row["in_source"] is False]
    positive = np.array([row["masked_share"] for row in unseen if row["label"] == "harmful"])
    negative = np.array([row["masked_share"] for row in unseen if row["label"] == "benign_general"])
    block = report["out_of_source"]
    assert block["groups"]["harmful"]["rows"] == 4 and block["groups"]["benign_general"]["rows"] == 4
    assert block["groups"]["benign_math"]["rows"] == 0
    assert block["comparisons"]["benign_math"]["auroc_masked_share"] is None
    from toss_filter.eval_refs import auroc
    assert block["comparisons"]["benign_general"]["auroc_masked_share"] == pytest.approx(auroc(positive, negative))


@pytest.mark.slow
def test_references_without_a_record_make_every_family_unknown(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "eval.jsonl", rows("harmful", "jailbreakbench", 3, "do it")
                       + rows("benign_general", "dolly", 3, "the capital"))
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval-refs", str(data), "--safety-model", str(tiny_models["safety"]),
                                      "--utility-model", str(tiny_models["utility"]), "--output", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, (result.stdout, result.exception)
    report = json.loads((out / "eval-refs.json").read_text())
    assert report["out_of_source"] is None and "OUT OF SOURCE" not in result.stdout
    assert {s["standing"] for s in report["standing"].values()} == {"unknown"}
    assert {entry["in_source"] for entry in report["sources"]} == {None}


@pytest.mark.parametrize("seed", range(20))
def test_a_trained_family_is_never_out_of_source(seed):
    rng = random.Random(seed)
    families = [f"f{i}" for i in range(6)] + ["-"]
    trained = {family: rng.randint(1, 9) for family in rng.sample(families[:6], rng.randint(0, 6))}
    if rng.random() < 0.3:
        trained[UNKNOWN] = 0
    labelled = [LabelledRow("x", i, rng.choice(["harmful", "benign"]), "{}", rng.choice(families)) for i in range(30)]
    standing = source_standing(labelled, trained)
    for row in labelled:
        state = in_source(row.source, trained)
        assert state is not False or (row.source not in trained and UNKNOWN not in trained and row.source != "-")
        if row.source in trained:
            assert standing[row.label]["standing"] in ("in-source", "mixed", "unknown")
    for group, entry in standing.items():
        if entry["standing"] == "out-of-source":
            assert not {row.source for row in labelled if row.label == group} & (set(trained) | {UNKNOWN, "-"})


def test_data_families_counts_over_inputs_up_to_max_rows(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", rows("x", "alpha", 3, "a") + [{"prompt": "p", "completion": "c"}])
    second = write_jsonl(tmp_path / "b.jsonl", rows("x", "beta", 2, "b"))
    assert data_families([str(first), str(second)]) == {UNKNOWN: 1, "alpha": 3, "beta": 2}
    assert data_families([str(first), str(second)], max_rows=5) == {UNKNOWN: 1, "alpha": 3, "beta": 1}


def test_an_adapter_recorded_before_families_reads_them_from_its_recorded_data(lineage, tmp_path):
    """The shipped adapters' training.json predate the `families` record: their recorded data files say."""
    import shutil

    for role in ("utility", "safety"):
        shutil.copytree(lineage[role], tmp_path / role)
        record = json.loads((tmp_path / role / "training.json").read_text())
        del record["families"], record["init_adapter_families"]
        if record["settings"]["init_adapter"]:
            record["settings"]["init_adapter"] = str(tmp_path / "utility")
        (tmp_path / role / "training.json").write_text(json.dumps(record))
    assert trained_families(tmp_path / "safety") == trained_families(lineage["safety"])
    record["data"] = [str(tmp_path / "gone.jsonl")]
    (tmp_path / "safety" / "training.json").write_text(json.dumps(record))
    assert trained_families(tmp_path / "safety") == {UNKNOWN: 0}
