"""Step 5, write: the trainer-ready dataset, the rejected rows and the per-token score sidecar.

Output contract (`save_to_disk`, loads with `datasets.load_from_disk`), exactly three columns:
- `input_ids`: list<int32>, the tokenized conversation, unsafe tokens included (they stay as context);
- `attention_mask`: list<int8>, all ones (no padding is stored);
- `labels`: list<int64>, unshifted (the model shifts): the token id on kept response tokens, -100 on prompt
  tokens and on unsafe tokens.
Rows keep their input order. Every directory is written to a temporary sibling and renamed into place only when
complete, so a failed run never leaves a directory that looks finished.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset

from toss_filter.run import replace_dir, staging_dir


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


def rejected_path(output: Path) -> Path:
    return output.with_name(output.name + "-rejected")
