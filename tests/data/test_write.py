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
from toss_filter.data.write import (OUTPUT_FORMATS, MissingShardsError, ShardedDataset, export, save_dataset,
                                    save_output, training_schema, training_table, with_assistant_masks)
from toss_filter.arrow import list_array
from toss_filter.errors import ConfigError, TossError
from toss_filter.files import MARKER

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


@pytest.mark.parametrize("where", ["data", "move"])
def test_a_failed_arrow_write_leaves_no_directory_and_keeps_the_older_one(tmp_path, monkeypatch, where):
    def boom(*args, **kwargs):
        raise OSError("boom")

    monkeypatch.setattr(write, "_write_stream" if where == "data" else "replace_dir", boom)
    with pytest.raises(OSError, match="boom"):
        save_output(make_table(), tmp_path / "out", "arrow")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    save_output(make_table(seed=1), tmp_path / "out", "arrow")
    monkeypatch.setattr(write, "_write_stream" if where == "data" else "replace_dir", boom)
    with pytest.raises(OSError, match="boom"):
        save_output(make_table(seed=2), tmp_path / "out", "arrow")
    assert os.listdir(tmp_path) == ["out"]
    assert datasets.load_from_disk(str(tmp_path / "out")).to_list() == rows(make_table(seed=1))


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


# --- sharded writing ------------------------------------------------------------------------------------------

SHARD_ROWS = [4, 0, 6, 3]  # the 13 rows of LENGTHS in four shards, one of them empty
WRITE_ORDER = [2, 1, 3, 0]  # out of order, as parallel workers finish


def sharded(staging: Path, table: pa.Table, sizes: list[int] = SHARD_ROWS, order: list[int] | None = None,
            schema: pa.Schema | None = None, prepare=lambda t: t) -> ShardedDataset:
    """`table` cut into contiguous shards of `sizes` rows, written in `order` (default WRITE_ORDER)."""
    assert sum(sizes) == table.num_rows
    data = ShardedDataset(staging, len(sizes), schema or table.schema)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    for shard in order or (WRITE_ORDER if len(sizes) == len(WRITE_ORDER) else range(len(sizes))):
        data.write(shard, prepare(table.slice(starts[shard], sizes[shard])))
    return data


def todays_file(table: pa.Table, path: Path, format: str, emit_assistant_masks: bool = False) -> None:
    """The single-table writers of write.py before sharding (one in-memory table, batches of ROW_GROUP_ROWS): the
    reference bytes every single-file export must keep."""
    convert = (write.torchtune_batch if format == "torchtune" else with_assistant_masks if emit_assistant_masks
               else (lambda batch: batch))
    batches = table.to_batches(max_chunksize=write.ROW_GROUP_ROWS)
    if format == "jsonl":
        with open(path, "w", encoding="utf-8") as sink:
            for batch in batches:
                sink.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in convert(batch).to_pylist())
        return
    with pq.ParquetWriter(path, convert(pa.RecordBatch.from_pylist([], schema=table.schema)).schema) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(convert(batch), row_group_size=write.ROW_GROUP_ROWS)


def data_files(shards: int) -> list[str]:
    return [f"data-{shard:05d}-of-{shards:05d}.arrow" for shard in range(shards)]


def test_shards_written_out_of_order_load_in_shard_order(tmp_path):
    table = make_table()
    data = sharded(tmp_path / "staging", table)
    assert [data.done(shard) for shard in range(4)] == [True] * 4
    assert export(data, tmp_path / "out", "arrow") == tmp_path / "out"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the staging directory became the output
    assert sorted(os.listdir(tmp_path / "out")) == data_files(4) + ["dataset_info.json", "state.json", MARKER]
    loaded = datasets.load_from_disk(str(tmp_path / "out"))
    assert loaded.to_list() == rows(table)
    assert len(loaded.cache_files) == 4  # memory-mapped, one table per shard file
    assert loaded.data.table.schema == table.schema
    listed = getattr(datasets, "List", datasets.Sequence)  # datasets >= 4 names lists List
    assert list(loaded.features) == ["input_ids", "attention_mask", "labels"]
    for name, dtype in [("input_ids", "int32"), ("attention_mask", "int8"), ("labels", "int64")]:
        assert isinstance(loaded.features[name], listed) and loaded.features[name].feature.dtype == dtype
    assert loaded.features == datasets.Features.from_arrow_schema(training_schema())


def other_tables() -> dict[str, pa.Table]:
    """The three kinds of table written as shards: training (over two record batches of datasets' 1000 rows),
    rejected rows (training columns + row, reason) and the sidecar (row, score with NaN, unsafe), and an empty one."""
    training = make_table(LENGTHS * 100)
    none = np.array([], dtype=np.int64)
    rejected = training.slice(0, 7).append_column("row", pa.array(range(7), pa.int64())).append_column(
        "reason", pa.array(["no response"] * 3 + ["truncated"] * 4, pa.string()))
    offsets = np.array([0, 3, 3, 8])
    sidecar = pa.table({"row": pa.array([0, 1, 2], pa.int64()),
                        "score": list_array(np.array([np.nan, 1, 2, 3, 4, np.nan, 5, 6], np.float32), offsets,
                                            pa.float32()),
                        "unsafe": list_array(np.arange(8) % 3 == 0, offsets, pa.bool_())})
    return {"training": training, "rejected": rejected, "sidecar": sidecar,
            "empty": training_table(none.astype(np.int32), none, np.array([0]), none)}


@pytest.mark.parametrize("kind", ["training", "rejected", "sidecar", "empty"])
def test_the_directory_is_what_save_to_disk_writes(tmp_path, kind):
    """Data files byte for byte, dataset_info.json byte for byte, state.json but for the fingerprint: as
    `Dataset.save_to_disk` writes the same table in the same shards (datasets cuts them contiguously, the first
    `rows % shards` one row longer). One shard by `save_dataset`, three by ShardedDataset."""
    table = other_tables()[kind]
    for shards in (1, 3) if table.num_rows else (1,):
        ref, ours = tmp_path / f"ref{shards}", tmp_path / f"ours{shards}"
        datasets.Dataset(table).save_to_disk(str(ref), num_shards=shards)
        if shards == 1:
            save_dataset(table, ours)
        else:
            div, mod = divmod(table.num_rows, shards)
            export(sharded(tmp_path / "staging", table, [div + (i < mod) for i in range(shards)]), ours, "arrow")
        # datasets' own files exactly, and beside them toss-filter's marker (which datasets never reads)
        assert sorted(os.listdir(ref)) == data_files(shards) + ["dataset_info.json", "state.json"]
        assert sorted(os.listdir(ours)) == sorted(os.listdir(ref) + [MARKER])
        assert json.loads((ours / MARKER).read_text()) == {"kind": "save_to_disk", "written_by": "toss-filter"}
        for name in data_files(shards) + ["dataset_info.json"]:
            assert (ours / name).read_bytes() == (ref / name).read_bytes(), name
        state, ref_state = (json.loads((path / "state.json").read_text()) for path in (ours, ref))
        assert len(state.pop("_fingerprint")) == 16 and ref_state.pop("_fingerprint")
        assert state == ref_state
        assert (ours / "state.json").read_text() == json.dumps(state | {"_fingerprint": json.loads(
            (ours / "state.json").read_text())["_fingerprint"]}, indent=2, sort_keys=True)
        loaded = datasets.load_from_disk(str(ours))
        assert loaded.features == datasets.load_from_disk(str(ref)).features
        assert repr(loaded.to_list()) == repr(rows(table))  # repr: the sidecar's NaN scores compare unequal


def test_the_fingerprint_follows_the_content(tmp_path):
    fingerprint = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        save_dataset(make_table(seed=seed), tmp_path / name)
        fingerprint[name] = json.loads((tmp_path / name / "state.json").read_text())["_fingerprint"]
    assert fingerprint["a"] == fingerprint["b"] != fingerprint["c"]
    loaded = {name: datasets.load_from_disk(str(tmp_path / name))._fingerprint for name in fingerprint}
    assert loaded["a"] == loaded["b"] != loaded["c"]  # (load_from_disk derives its own from state.json's)


@pytest.mark.parametrize("row_group_rows", [1024, 4, 3])
@pytest.mark.parametrize("format, emit", [("parquet", False), ("parquet", True), ("jsonl", False), ("jsonl", True),
                                          ("torchtune", False)])
def test_single_file_exports_are_the_same_bytes_however_sharded(tmp_path, monkeypatch, format, emit, row_group_rows):
    """N shards (one empty, written out of order; row groups then run across shard boundaries) = one shard of
    every row (`save_output`) = the single-table writer before sharding, byte for byte."""
    monkeypatch.setattr(write, "ROW_GROUP_ROWS", row_group_rows)
    table = make_table()
    todays_file(table, tmp_path / "today", format, emit)
    save_output(table, tmp_path / "one", format, emit)
    assert export(sharded(tmp_path / "staging", table), tmp_path / "many", format, emit) == tmp_path / "many"
    assert sorted(os.listdir(tmp_path)) == ["many", "one", "today"]  # the staging directories are gone
    today = (tmp_path / "today").read_bytes()
    assert (tmp_path / "one").read_bytes() == today and (tmp_path / "many").read_bytes() == today
    if format != "jsonl":
        meta = pq.ParquetFile(tmp_path / "many").metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert sizes == [min(row_group_rows, 13 - start) for start in range(0, 13, row_group_rows)]


def test_arrow_export_adds_assistant_masks_shard_by_shard(tmp_path):
    """Masks added by export (a pass over the shards) or by the writer (shards of training_schema(True)) give the
    same directory, fingerprint included."""
    table = make_table()
    export(sharded(tmp_path / "staging", table), tmp_path / "late", "arrow", emit_assistant_masks=True)
    early = sharded(tmp_path / "staging", table, schema=training_schema(True), prepare=with_assistant_masks)
    export(early, tmp_path / "early", "arrow", emit_assistant_masks=True)
    loaded = datasets.load_from_disk(str(tmp_path / "late"))
    assert loaded.to_list() == rows(with_assistant_masks(table))
    assert loaded.features["assistant_masks"].feature.dtype == "int8"
    for name in data_files(4) + ["dataset_info.json", "state.json", MARKER]:
        assert (tmp_path / "late" / name).read_bytes() == (tmp_path / "early" / name).read_bytes(), name


def test_a_killed_masks_pass_resumes(tmp_path, monkeypatch):
    table = make_table()
    staging = tmp_path / "staging"
    sharded(staging, table)
    calls = []

    def killed_on_shard_2(batch):
        calls.append(batch.num_rows)
        if len(calls) == 2:  # shard 0 (4 rows) and the empty shard 1 are rewritten; shard 2 is not
            raise KeyboardInterrupt
        return with_assistant_masks(batch)

    monkeypatch.setattr(write, "with_assistant_masks", killed_on_shard_2)
    with pytest.raises(KeyboardInterrupt):
        export(ShardedDataset(staging, 4, table.schema), tmp_path / "out", "arrow", emit_assistant_masks=True)
    monkeypatch.undo()
    assert sorted(os.listdir(staging)) == data_files(4)  # no temporary file left, no output
    assert not (tmp_path / "out").exists()
    export(ShardedDataset(staging, 4, training_schema()), tmp_path / "out", "arrow", emit_assistant_masks=True)
    assert datasets.load_from_disk(str(tmp_path / "out")).to_list() == rows(with_assistant_masks(table))


def test_a_killed_write_is_refused_then_redone_and_its_leftovers_are_not_in_the_output(tmp_path):
    table = make_table()
    staging, target = tmp_path / "staging", tmp_path / "out"
    data = sharded(staging, table, [5, 4, 4], order=[2, 0])
    (staging / ".data-00001-of-00003.arrow.k1ll3d").write_bytes(b"half a shard")  # what a killed write leaves
    assert [data.done(shard) for shard in range(3)] == [True, False, True]
    refusal = r"1 of 3 shards are not written \(data-00001-of-00003\.arrow\)"
    with pytest.raises(MissingShardsError, match=refusal) as refused:
        data.finish(target)
    assert refused.value.missing == [1]
    with pytest.raises(MissingShardsError, match="data-00001-of-00003.arrow"):
        export(data, tmp_path / "out.parquet", "parquet")
    assert sorted(os.listdir(tmp_path)) == ["staging"]  # neither output appeared; the shards are kept

    rerun = ShardedDataset(staging, 3, table.schema)  # a re-run writes only what is missing
    assert [shard for shard in range(3) if not rerun.done(shard)] == [1]
    rerun.write(1, table.slice(5, 4))
    assert rerun.finish(target) == target
    assert sorted(os.listdir(target)) == data_files(3) + ["dataset_info.json", "state.json", MARKER]
    assert datasets.load_from_disk(str(target)).to_list() == rows(table)
    assert not staging.exists()


def test_finish_resumes_after_a_kill_before_the_rename(tmp_path, monkeypatch):
    table = make_table(seed=2)
    save_dataset(make_table(seed=1), tmp_path / "out")  # an older output, kept until the new one is complete

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        sharded(tmp_path / "staging", table).finish(tmp_path / "out")
    monkeypatch.undo()
    assert {"state.json", "dataset_info.json"} <= set(os.listdir(tmp_path / "staging"))
    assert datasets.load_from_disk(str(tmp_path / "out")).to_list() == rows(make_table(seed=1))
    ShardedDataset(tmp_path / "staging", 4, table.schema).finish(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert datasets.load_from_disk(str(tmp_path / "out")).to_list() == rows(table)


def test_writing_a_shard_again_replaces_it(tmp_path):
    table = make_table()
    data = sharded(tmp_path / "staging", table)
    before = data.path(2).read_bytes()
    data.write(2, make_table(seed=5).slice(0, 6))
    data.write(2, table.slice(4, 6))
    assert data.path(2).read_bytes() == before
    assert sorted(os.listdir(tmp_path / "staging")) == data_files(4)


@pytest.mark.parametrize("format", OUTPUT_FORMATS)
def test_an_all_empty_sharded_dataset_is_a_valid_empty_output(tmp_path, format):
    none = empty_table()
    data = sharded(tmp_path / "staging", none, [0, 0, 0])
    target = tmp_path / ("out" if format == "arrow" else "out.data")
    export(data, target, format)
    assert os.listdir(tmp_path) == [target.name]
    if format == "arrow":
        loaded = datasets.load_from_disk(str(target))
        assert loaded.num_rows == 0 and loaded.column_names == ["input_ids", "attention_mask", "labels"]
        assert loaded.features == datasets.Features.from_arrow_schema(training_schema())
    elif format == "jsonl":
        assert target.read_bytes() == b""
    else:
        assert pq.ParquetFile(target).metadata.num_row_groups == 0
        todays_file(none, tmp_path / "today", format)
        assert target.read_bytes() == (tmp_path / "today").read_bytes()


def test_a_failed_export_keeps_the_shards_for_a_rerun(tmp_path, monkeypatch):
    table = make_table()
    data = sharded(tmp_path / "staging", table)
    monkeypatch.setattr(pq.ParquetWriter, "write_batch", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        export(data, tmp_path / "out.parquet", "parquet")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["staging"] and sorted(os.listdir(tmp_path / "staging")) == data_files(4)
    export(ShardedDataset(tmp_path / "staging", 4, table.schema), tmp_path / "out.parquet", "parquet")
    todays_file(table, tmp_path / "today", "parquet")
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "today").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["out.parquet", "today"]


def test_sharded_dataset_refuses_what_would_not_load(tmp_path):
    table = make_table()
    with pytest.raises(ValueError, match="at least one shard"):
        ShardedDataset(tmp_path / "none", 0, table.schema)
    data = ShardedDataset(tmp_path / "staging", 3, table.schema)
    with pytest.raises(ValueError, match="shard 3 is not in 0..2"):
        data.write(3, table)
    with pytest.raises(ValueError, match="schema"):
        data.write(0, table.drop_columns(["attention_mask"]))
    with pytest.raises(ValueError, match="schema"):
        data.write(0, table.set_column(2, "labels", pa.array(table.column("labels").to_pylist(), pa.list_(pa.int32()))))
    assert os.listdir(tmp_path / "staging") == []
    data.write(0, table)
    with pytest.raises(ConfigError, match="another layout.*data-00000-of-00003.arrow"):
        ShardedDataset(tmp_path / "staging", 4, table.schema)  # shards of 3 would be mixed with shards of 4
    (tmp_path / "other").mkdir()
    other = ShardedDataset(tmp_path / "other", 1, training_schema(True))
    other.write(0, with_assistant_masks(table))
    with pytest.raises(ConfigError, match="other columns"):
        ShardedDataset(tmp_path / "other", 1, table.schema).finish(tmp_path / "out")
    for shard in (1, 2):
        data.write(shard, empty_table())
    data.finish(tmp_path / "out")
    with pytest.raises(TossError, match="is gone"):
        data.write(1, empty_table())  # a late worker does not recreate the moved staging directory
    assert not (tmp_path / "staging").exists()


def test_list_array_takes_int64_offsets_and_refuses_what_int32_cannot_hold():
    array = list_array(np.arange(6, dtype=np.int32), np.array([0, 2, 2, 6], dtype=np.int64), pa.int32())
    assert array.type == pa.list_(pa.int32()) and array.offsets.type == pa.int32()
    assert array.to_pylist() == [[0, 1], [], [2, 3, 4, 5]]
    with pytest.raises(ValueError, match="int32 list offsets"):
        list_array(np.zeros(1, np.int32), np.array([0, 2**31], dtype=np.int64), pa.int32())
