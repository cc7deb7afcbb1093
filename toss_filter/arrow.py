"""Arrow list columns as flat numpy arrays: row i of a column is `values[offsets[i]:offsets[i + 1]]`. Every shard
file of the run directory and every output table is read and built this way, without a Python object per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

INT32_MAX = 2**31 - 1


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, int64 offsets) of a list column, so row i is values[offsets[i]:offsets[i+1]], without copies
    per row."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def list_array(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list<value_type> array, row i = values[offsets[i]:offsets[i+1]]. `offsets` may be int64 (every count across
    shards is); the Arrow type keeps int32 offsets, so a column of more than 2^31 - 1 values is refused, never
    truncated: write smaller shards."""
    offsets = np.asarray(offsets)
    if len(offsets) and int(offsets.max()) > INT32_MAX:
        raise ValueError(f"a list column of {int(offsets.max()):,} values does not fit Arrow's int32 list offsets "
                         f"(at most {INT32_MAX:,} values): write it in smaller shards")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32, copy=False)), pa.array(values, type=value_type))


def take_rows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows `rows` of a (values, offsets) list column, as a new (values, offsets) pair."""
    lengths = np.diff(offsets)[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if len(rows) == len(offsets) - 1 and np.array_equal(rows, np.arange(len(rows))):
        return values, new_offsets
    starts = offsets[:-1][rows]
    gather = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return values[gather], new_offsets
