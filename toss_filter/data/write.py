"""Step 5, write: the trainer-ready dataset, the rejected rows and the per-token score sidecar.

The training table (`training_table`), exactly three columns:
- `input_ids`: list<int32>, the tokenized conversation, unsafe tokens included (they stay as context);
- `attention_mask`: list<int8>, all ones (no padding is stored);
- `labels`: list<int64>, unshifted (the model shifts): the token id on kept response tokens, -100 on prompt
  tokens and on unsafe tokens. So `labels[i]` is either `input_ids[i]` or -100.
Rows keep their input order.

`save_output` writes it in one of `OUTPUT_FORMATS` (docs/trainers.md, "Export formats", says which trainer reads
which):
- `arrow`: a `save_to_disk` directory (`datasets.load_from_disk`), the three columns;
- `parquet`: one Parquet file, the three columns, in row groups of at most `ROW_GROUP_ROWS` rows;
- `jsonl`: one UTF-8 JSON object per line, `{"input_ids": [...], "attention_mask": [...], "labels": [...]}`;
- `torchtune`: one Parquet file with `tokens` (= input_ids, list<int32>), `mask` (list<bool>, torchtune's sense:
  True = no loss, i.e. `labels == -100`) and `labels` (list<int64>) pre-shifted as torchtune's main branch wants
  them: `labels[i]` is the unshifted `labels[i + 1]`, and the last label of every row is -100.
`emit_assistant_masks` adds `assistant_masks` (list<int8>: 1 where `labels != -100`, else 0, aligned with
`input_ids`) to the first three, for TRL <= 1.6 with packing, which drops `labels` and rebuilds them from it.

Every output is written to a temporary sibling and renamed into place only when complete, so a failed run never
leaves a file or directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.errors import ConfigError
from toss_filter.run import temp_file, replace_dir, staging_dir

OUTPUT_FORMATS = ("arrow", "parquet", "jsonl", "torchtune")
# Rows per Parquet row group and per JSONL batch: at 2048 tokens a row, about 26 MB of columns, so a reader can
# stream the file and the writer never holds more than one converted group beside the table.
ROW_GROUP_ROWS = 1024


def list_array(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


def take_rows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows `rows` of a (values, offsets) list column, as a new (values, offsets) pair."""
    lengths = np.diff(offsets)[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if len(rows) == len(offsets) - 1 and np.array_equal(rows, np.arange(len(rows))):
        return values, new_offsets
    starts = offsets[:-1][rows]
    gather = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return values[gather], new_offsets


def training_table(input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> pa.Table:
    ids, new_offsets = take_rows(input_ids, offsets, rows)
    row_labels, _ = take_rows(labels, offsets, rows)
    return pa.table({
        "input_ids": list_array(ids, new_offsets, pa.int32()),
        "attention_mask": list_array(np.ones(len(ids), dtype=np.int8), new_offsets, pa.int8()),
        "labels": list_array(row_labels, new_offsets, pa.int64()),
    })


def save_dataset(table: pa.Table, target: Path) -> Path:
    """`save_to_disk` into a staging directory, then rename it over `target`."""
    staging = staging_dir(target)
    try:
        # datasets writes zero shards for an empty table and then cannot load it back; one empty shard loads fine.
        Dataset(table).save_to_disk(str(staging), num_shards=1 if table.num_rows == 0 else None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, target)
    return target


def save_output(table: pa.Table, target: Path, format: str = "arrow", emit_assistant_masks: bool = False) -> Path:
    """Write the training table `table` (as `training_table` returns it) to `target` in `format`; return `target`.

    `arrow` writes the directory `target` (replacing an older one). Every other format writes the single file
    `target`, whatever its suffix (replacing an older file; an existing directory there is refused). The layouts
    are in this module's docstring. Raises ConfigError for a format not in OUTPUT_FORMATS, and for
    `emit_assistant_masks` with `torchtune`: no torchtune code reads `assistant_masks`, so the column would be
    dead weight that looks like it does something.
    """
    target = Path(target)
    check_output(target, format, emit_assistant_masks)
    if format == "arrow":
        return save_dataset(with_assistant_masks(table) if emit_assistant_masks else table, target)
    convert = torchtune_batch if format == "torchtune" else with_assistant_masks if emit_assistant_masks else None
    write = write_jsonl if format == "jsonl" else write_parquet
    tmp = Path(temp_file(target))
    try:
        write(table, tmp, convert)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target


def check_output(target: Path, format: str, emit_assistant_masks: bool) -> None:
    """Refuse what `save_output` cannot write; `SelectConfig` calls it too, so a bad choice fails before scoring."""
    if format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format '{format}': choose one of {', '.join(OUTPUT_FORMATS)}")
    if format == "torchtune" and emit_assistant_masks:
        raise ConfigError("--emit-assistant-masks does not apply to the torchtune format: torchtune never reads "
                          "`assistant_masks` (its loss mask is the `mask` column); the masks are for TRL <= 1.6 "
                          "with packing")
    if format != "arrow" and Path(target).is_dir():
        raise ConfigError(f"{target} is a directory; the {format} format writes a single file: name a file")


Convert = Callable[[pa.RecordBatch], pa.RecordBatch] | None


def write_parquet(table: pa.Table, path: Path, convert: Convert) -> None:
    """Stream `table` into the Parquet file `path`, one row group per batch of at most ROW_GROUP_ROWS rows,
    converting each batch with `convert` (if any) on the way, so no converted copy of the whole table exists."""
    schema = _converted(pa.RecordBatch.from_pylist([], schema=table.schema), convert).schema
    with pq.ParquetWriter(path, schema) as writer:
        for batch in table.to_batches(max_chunksize=ROW_GROUP_ROWS):
            if batch.num_rows:  # an empty row group makes datasets' Parquet reader fail ("BatchSize ... got 0")
                writer.write_batch(_converted(batch, convert), row_group_size=ROW_GROUP_ROWS)


def write_jsonl(table: pa.Table, path: Path, convert: Convert) -> None:
    """Stream `table` into `path` as JSON Lines, a batch of at most ROW_GROUP_ROWS rows at a time."""
    with open(path, "w", encoding="utf-8") as sink:
        for batch in table.to_batches(max_chunksize=ROW_GROUP_ROWS):
            sink.writelines(json.dumps(row, separators=(",", ":")) + "\n"
                            for row in _converted(batch, convert).to_pylist())


def _converted(batch: pa.RecordBatch, convert: Convert) -> pa.RecordBatch:
    return batch if convert is None else convert(batch)


def _flat(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets from 0) of a list array, honouring a slice (a batch of `to_batches` is a view)."""
    offsets = column.offsets.to_numpy()
    return column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]], offsets - offsets[0]


def with_assistant_masks(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """`data` plus `assistant_masks`: list<int8>, 1 where `labels != -100`, else 0, aligned with `input_ids`.

    This is the column TRL <= 1.6 applies unconditionally (`labels[assistant_masks == 0] = -100`, on unshifted
    labels) after rebuilding labels as a copy of `input_ids`, which is what it does with packing. Since a kept
    label equals its input id, the labels it rebuilds are exactly ours.
    """
    labels = data.column("labels")
    values, offsets = _flat(labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels)
    masks = list_array((values != IGNORE_INDEX).astype(np.int8), offsets, pa.int8())
    # from_arrays, not append_column: RecordBatch.append_column is newer than the pyarrow>=15 we support.
    return type(data).from_arrays([*data.columns, masks], names=[*data.column_names, "assistant_masks"])


def torchtune_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A training-table batch as torchtune wants it: `tokens` (= input_ids), `mask` and pre-shifted `labels`.

    torchtune's two label conventions: release 0.6.1 (the last on PyPI) builds unshifted labels,
    `where(mask, -100, tokens)`, and its recipes shift them; its main branch since PR #2613 (b18312c7d) builds
    `where(mask[1:], -100, tokens[1:]) + [-100]` and its recipes do not shift. `mask` lets torchtune's own
    SFTTransform build the labels in whichever convention it has (docs/trainers.md gives the builder); `labels`
    is the main-branch result, so label i is the target of position i: our unshifted label at i + 1. The last
    position predicts nothing: -100 (this also keeps a packed row from training on the next row's first token).
    """
    values, offsets = _flat(batch.column("labels"))
    shifted = np.full(len(values), IGNORE_INDEX, dtype=np.int64)
    shifted[:-1] = values[1:]
    ends = offsets[1:][np.diff(offsets) > 0] - 1
    shifted[ends] = IGNORE_INDEX  # values[1:] reached into the next row there
    return pa.record_batch({
        "tokens": batch.column("input_ids"),
        "mask": list_array(values == IGNORE_INDEX, offsets, pa.bool_()),
        "labels": list_array(shifted, offsets, pa.int64()),
    })


def rejected_path(output: Path) -> Path:
    return output.with_name(output.name + "-rejected")
