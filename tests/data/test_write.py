"""Step 5, write: every export format holds exactly the training table (or, for torchtune, its exact pre-shifted
form), streams Parquet in row groups, appears atomically, and copes with an empty table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from toss_filter.data import write
from toss_filter.data.write import OUTPUT_FORMATS, save_output, training_table
from toss_filter.errors import ConfigError

IGNORE = -100
DOCS = Path(__file__).resolve().parents[2] / "docs" / "trainers.md"
# Row lengths with the edge cases: rows of length 1, and rows whose last label is kept.
LENGTHS = [1, 4, 7, 1, 2, 9, 3, 5, 1, 6, 8, 2, 3]


def make_table(lengths: list[int] = LENGTHS, seed: int = 0) -> pa.Table:
    """A training table as `select` builds it: ids, labels that are the id or -100 (the last row token is kept
    in some rows), over a subset of rows so `training_table` gathers."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, 50_000, offsets[-1]).astype(np.int32)
    labels = np.where(rng.random(offsets[-1]) < 0.4, IGNORE, ids).astype(np.int64)
    labels[offsets[1:] - 1] = ids[offsets[1:] - 1]  # keep each row's last label, so the shift must drop it
    labels[offsets[2] - 1] = IGNORE
    return training_table(ids, labels, offsets, np.arange(len(lengths)))


def empty_table() -> pa.Table:
    none = np.array([], dtype=np.int64)
    return training_table(none.astype(np.int32), none, np.array([0]), none)


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def shifted(labels: list[int]) -> list[int]:
    """The reference torchtune shift, written out plainly."""
    return [labels[i + 1] if i + 1 < len(labels) else IGNORE for i in range(len(labels))]


def masks(labels: list[int]) -> list[int]:
    return [int(label != IGNORE) for label in labels]


def load(path: Path, builder: str, cache: Path) -> datasets.Dataset:
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache))


@pytest.fixture(autouse=True)
def _quiet():
    datasets.disable_progress_bars()


def test_make_table_has_the_edge_cases():
    table = rows(make_table())
    assert any(len(r["labels"]) == 1 for r in table)
    assert any(len(r["labels"]) > 1 and r["labels"][-1] != IGNORE for r in table)
    assert all(label in (IGNORE, token) for r in table for label, token in zip(r["labels"], r["input_ids"]))


def test_arrow_is_todays_save_to_disk(tmp_path):
    table = make_table()
    assert save_output(table, tmp_path / "out") == tmp_path / "out"
    loaded = datasets.load_from_disk(str(tmp_path / "out"))
    assert loaded.column_names == ["input_ids", "attention_mask", "labels"]
    assert loaded.data.table.schema == table.schema
    assert loaded.to_list() == rows(table)


def test_parquet_round_trips_through_pyarrow_and_datasets(tmp_path):
    table = make_table()
    target = tmp_path / "out.parquet"
    assert save_output(table, target, "parquet") == target
    assert target.is_file()
    read = pq.read_table(target)
    assert read.schema.remove_metadata() == table.schema
    assert rows(read) == rows(table)
    loaded = load(target, "parquet", tmp_path / "cache")
    assert loaded.column_names == ["input_ids", "attention_mask", "labels"]
    assert loaded.to_list() == rows(table)


def test_parquet_writes_exactly_target_whatever_its_suffix(tmp_path):
    target = tmp_path / "filtered"
    save_output(make_table(), target, "parquet")
    assert target.is_file() and rows(pq.read_table(target)) == rows(make_table())


def test_parquet_streams_in_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(write, "ROW_GROUP_ROWS", 4)
    table = make_table()
    save_output(table, tmp_path / "out.parquet", "parquet")
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [4, 4, 4, 1]
    assert rows(pq.read_table(tmp_path / "out.parquet")) == rows(table)


def test_jsonl_round_trips_through_datasets(tmp_path):
    table = make_table()
    target = tmp_path / "out.jsonl"
    assert save_output(table, target, "jsonl") == target
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows(table)
    assert list(json.loads(lines[0])) == ["input_ids", "attention_mask", "labels"]
    loaded = load(target, "json", tmp_path / "cache")
    assert loaded.to_list() == rows(table)


def test_jsonl_batches_do_not_change_the_lines(tmp_path, monkeypatch):
    save_output(make_table(), tmp_path / "one.jsonl", "jsonl")
    monkeypatch.setattr(write, "ROW_GROUP_ROWS", 3)
    save_output(make_table(), tmp_path / "many.jsonl", "jsonl")
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "many.jsonl").read_bytes()


@pytest.mark.parametrize("row_group_rows", [1024, 4, 1])
def test_torchtune_labels_are_shifted_by_exactly_one(tmp_path, monkeypatch, row_group_rows):
    monkeypatch.setattr(write, "ROW_GROUP_ROWS", row_group_rows)  # row ends on and off batch boundaries
    table = make_table()
    target = tmp_path / "out.parquet"
    save_output(table, target, "torchtune")
    read = pq.read_table(target)
    assert read.schema.remove_metadata() == pa.schema([("tokens", pa.list_(pa.int32())),
                                                       ("mask", pa.list_(pa.bool_())),
                                                       ("labels", pa.list_(pa.int64()))])
    got = rows(read)
    assert [r["tokens"] for r in got] == [r["input_ids"] for r in rows(table)]
    assert [r["mask"] for r in got] == [[label == IGNORE for label in r["labels"]] for r in rows(table)]
    assert [r["labels"] for r in got] == [shifted(r["labels"]) for r in rows(table)]
    assert all(r["labels"][-1] == IGNORE for r in got)
    assert [r["labels"] for r in got if len(r["tokens"]) == 1] == [[IGNORE]] * LENGTHS.count(1)
    assert load(target, "parquet", tmp_path / "cache").to_list() == got


def test_torchtune_builds_our_labels_from_tokens_and_mask_in_both_conventions(tmp_path):
    """torchtune's SFTTransform builds labels from the written `tokens` and `mask` (True = no loss):
    main (since PR #2613): where(mask[1:], -100, tokens[1:]) + [-100], pre-shifted, must equal the written labels;
    0.6.1: where(mask, -100, tokens), unshifted (its recipes shift), must equal our labels."""
    table = make_table(seed=1)
    save_output(table, tmp_path / "out.parquet", "torchtune")
    for ours, theirs in zip(rows(table), rows(pq.read_table(tmp_path / "out.parquet"))):
        tokens, mask = np.array(theirs["tokens"]), np.array(theirs["mask"])
        assert list(np.where(mask[1:], IGNORE, tokens[1:])) + [IGNORE] == theirs["labels"]
        assert list(np.where(mask, IGNORE, tokens)) == ours["labels"]


@pytest.mark.parametrize("format", ["arrow", "parquet", "jsonl"])
def test_assistant_masks_mark_exactly_the_kept_labels(tmp_path, format):
    table = make_table()
    target = tmp_path / ("out" if format == "arrow" else f"out.{format}")
    save_output(table, target, format, emit_assistant_masks=True)
    loaded = (datasets.load_from_disk(str(target)) if format == "arrow"
              else load(target, "json" if format == "jsonl" else "parquet", tmp_path / "cache"))
    assert loaded.column_names == ["input_ids", "attention_mask", "labels", "assistant_masks"]
    got = loaded.to_list()
    assert [r["assistant_masks"] for r in got] == [masks(r["labels"]) for r in rows(table)]
    # What TRL <= 1.6 does with packing: labels = input_ids, then labels[assistant_masks == 0] = -100.
    rebuilt = [[t if m else IGNORE for t, m in zip(r["input_ids"], r["assistant_masks"])] for r in got]
    assert rebuilt == [r["labels"] for r in rows(table)]
    if format != "jsonl":
        assert loaded.features["assistant_masks"].feature.dtype == "int8"


def test_assistant_masks_are_off_by_default(tmp_path):
    save_output(make_table(), tmp_path / "out.parquet", "parquet")
    assert pq.read_schema(tmp_path / "out.parquet").names == ["input_ids", "attention_mask", "labels"]


def test_assistant_masks_are_refused_for_torchtune(tmp_path):
    with pytest.raises(ConfigError, match="torchtune"):
        save_output(make_table(), tmp_path / "out.parquet", "torchtune", emit_assistant_masks=True)
    assert os.listdir(tmp_path) == []


def test_unknown_format_is_a_config_error(tmp_path):
    assert OUTPUT_FORMATS == ("arrow", "parquet", "jsonl", "torchtune")
    with pytest.raises(ConfigError, match="unknown output format 'csv'.*arrow, parquet, jsonl, torchtune"):
        save_output(make_table(), tmp_path / "out.csv", "csv")
    assert os.listdir(tmp_path) == []


def test_a_file_format_refuses_an_existing_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a directory"):
        save_output(make_table(), tmp_path / "out", "parquet")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_file_format_replaces_an_older_file(tmp_path):
    target = tmp_path / "out.jsonl"
    save_output(make_table(seed=1), target, "jsonl")
    save_output(make_table(seed=2), target, "jsonl")
    assert [json.loads(line) for line in target.read_text().splitlines()] == rows(make_table(seed=2))
    assert os.listdir(tmp_path) == ["out.jsonl"]


@pytest.mark.parametrize("format", ["parquet", "jsonl", "torchtune"])
def test_a_failed_write_leaves_no_file_and_no_litter(tmp_path, monkeypatch, format):
    monkeypatch.setattr(write, "ROW_GROUP_ROWS", 4)
    calls = []
    real = write._converted

    def fail_on_third_batch(batch, convert):
        calls.extend([batch.num_rows] if batch.num_rows else [])  # parquet first converts an empty batch for its schema
        if len(calls) == 3:  # two batches of rows are already in the temporary file
            raise OSError("disk full")
        return real(batch, convert)

    monkeypatch.setattr(write, "_converted", fail_on_third_batch)
    target = tmp_path / "sub" / "out.data"
    with pytest.raises(OSError, match="disk full"):
        save_output(make_table(), target, format)
    assert calls == [4, 4, 4]
    assert os.listdir(tmp_path / "sub") == []


def test_a_failed_write_keeps_the_older_file(tmp_path, monkeypatch):
    target = tmp_path / "out.parquet"
    save_output(make_table(seed=1), target, "parquet")
    monkeypatch.setattr(pq.ParquetWriter, "write_batch", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_output(make_table(seed=2), target, "parquet")
    assert os.listdir(tmp_path) == ["out.parquet"]
    assert rows(pq.read_table(target)) == rows(make_table(seed=1))


def test_a_failed_arrow_write_leaves_no_directory(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("boom")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", boom)
    with pytest.raises(OSError, match="boom"):
        save_output(make_table(), tmp_path / "out", "arrow")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("format", OUTPUT_FORMATS)
def test_an_empty_table_writes_an_empty_output(tmp_path, format):
    target = tmp_path / ("out" if format == "arrow" else "out.data")
    save_output(empty_table(), target, format)
    assert sorted(os.listdir(tmp_path)) == ["out" if format == "arrow" else "out.data"]
    if format == "arrow":
        loaded = datasets.load_from_disk(str(target))
        assert loaded.num_rows == 0 and loaded.column_names == ["input_ids", "attention_mask", "labels"]
    elif format == "jsonl":
        assert target.read_bytes() == b""
    else:
        # No row group at all: pyarrow reads zero rows. (datasets.load_dataset refuses any zero-row file.)
        assert pq.ParquetFile(target).metadata.num_row_groups == 0
        read = pq.read_table(target)
        assert read.num_rows == 0
        assert read.column_names == (["tokens", "mask", "labels"] if format == "torchtune"
                                     else ["input_ids", "attention_mask", "labels"])


def test_an_empty_table_with_assistant_masks(tmp_path):
    save_output(empty_table(), tmp_path / "out.parquet", "parquet", emit_assistant_masks=True)
    assert pq.read_schema(tmp_path / "out.parquet").names[-1] == "assistant_masks"
    save_output(empty_table(), tmp_path / "out", "arrow", emit_assistant_masks=True)
    assert datasets.load_from_disk(str(tmp_path / "out")).column_names[-1] == "assistant_masks"


def docs_block(language: str, first_line: str) -> str:
    """The fenced `language` block of docs/trainers.md whose first line is `first_line`."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index(f"```{language}\n{first_line}\n") + len(f"```{language}\n")
    return text[start:text.index("```", start)]


def test_torchtune_builder_from_these_docs_trains_our_labels(tmp_path, monkeypatch):
    """The builder and dataset config of docs/trainers.md, run with the installed torchtune's own dataset,
    collators and packing, then its recipes' label handling: position i's loss target is our unshifted label
    i + 1 (-100 at each row's end and on padding), in either of torchtune's label conventions."""
    pytest.importorskip("torchtune")  # not a dependency of toss-filter: runs where torchtune is installed
    import torch
    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.data import padded_collate_packed, padded_collate_sft
    from torchtune.datasets._sft import SFTTransform

    # 0.6.1 builds unshifted labels and its recipes shift them; main (PR #2613 on) pre-shifts and does not.
    probe = SFTTransform(model_transform=lambda row: {"tokens": [1, 2], "mask": [False, False]})({})
    recipe_shifts = [int(x) for x in probe["labels"]] == [1, 2]

    def loss_targets(labels: torch.Tensor) -> list[int]:
        if recipe_shifts:  # recipes/*.py::_loss_step in 0.6.1: hstack((labels[..., 1:], ignore))
            labels = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], IGNORE)))
        return labels.reshape(-1).tolist()

    lengths = [2, 4, 7, 1, 3, 9, 5]
    rng = np.random.default_rng(3)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(1, 50_000, offsets[-1]).astype(np.int32)
    labels = np.where(rng.random(offsets[-1]) < 0.4, IGNORE, ids).astype(np.int64)
    labels[offsets[1:] - 1] = ids[offsets[1:] - 1]
    labels[offsets[:-1]] = IGNORE  # every toss-filter row starts with a prompt token
    output = training_table(ids, labels, offsets, np.arange(len(lengths)))
    save_output(output, tmp_path / "out.parquet", "torchtune")
    table = rows(output)
    expected = [shifted(r["labels"]) for r in table]

    (tmp_path / "toss_torchtune.py").write_text(docs_block("python", "# toss_torchtune.py"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yaml = docs_block("yaml", "# in the recipe config (e.g. a copy of llama3_2/1B_lora_single_device.yaml)")
    cfg = OmegaConf.create(yaml)
    cfg.dataset.data_files = str(tmp_path / "out.parquet")
    tokenizer = SimpleNamespace(max_seq_len=16, pad_id=0)

    ds = config.instantiate(cfg.dataset, tokenizer)
    batch = padded_collate_sft([ds[i] for i in range(len(ds))], padding_idx=0, ignore_idx=IGNORE)
    width = batch["tokens"].shape[1]
    assert batch["tokens"].tolist() == [r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in table]
    assert loss_targets(batch["labels"]) == [t for e in expected for t in e + [IGNORE] * (width - len(e))]

    cfg.dataset.packed = True
    packs = config.instantiate(cfg.dataset, tokenizer)
    got = [t for i in range(len(packs)) for t in loss_targets(padded_collate_packed([packs[i]])["labels"])]
    want, used = [], 0
    for e in expected:  # PackedDataset fills packs greedily, in order, and pads each to max_seq_len
        if used + len(e) > 16:
            want, used = want + [IGNORE] * (16 - used), 0
        want, used = want + e, used + len(e)
    assert got == want + [IGNORE] * (16 - used)
