"""Step 5, write: the trainer-ready dataset, the rejected rows and the per-token score sidecar, shard by shard.

The training table (`training_table`), exactly three columns:
- `input_ids`: list<int32>, the tokenized conversation, unsafe tokens included (they stay as context);
- `attention_mask`: list<int8>, all ones (no padding is stored);
- `labels`: list<int64>, unshifted (the model shifts): the token id on kept response tokens, -100 on prompt
  tokens and on unsafe tokens. So `labels[i]` is either `input_ids[i]` or -100.
Rows keep their input order.

Writing is sharded and resumable. A `ShardedDataset` is a staging directory that receives one Arrow file per shard
of input rows (`write`, in any order, from any process; a file exists only once complete), and becomes a
`save_to_disk` directory when every shard is there (`finish`). `export` turns it into the output, in one of
`OUTPUT_FORMATS` (docs/trainers.md, "Export formats", says which trainer reads which):
- `arrow`: a `save_to_disk` directory (`datasets.load_from_disk`), the three columns, one Arrow file per shard;
- `parquet`: one Parquet file, the three columns, in row groups of at most `ROW_GROUP_ROWS` rows;
- `jsonl`: one UTF-8 JSON object per line, `{"input_ids": [...], "attention_mask": [...], "labels": [...]}`;
- `torchtune`: one Parquet file with `tokens` (= input_ids, list<int32>), `mask` (list<bool>, torchtune's sense:
  True = no loss, i.e. `labels == -100`) and `labels` (list<int64>) pre-shifted as torchtune's main branch wants
  them: `labels[i]` is the unshifted `labels[i + 1]`, and the last label of every row is -100.
`emit_assistant_masks` adds `assistant_masks` (list<int8>: 1 where `labels != -100`, else 0, aligned with
`input_ids`) to the first three, for TRL <= 1.6 with packing, which drops `labels` and rebuilds them from it.
The single-file formats are the same bytes however the rows were cut into shards: row groups run across shard
boundaries. `save_output` / `save_dataset` write one in-memory table, as a single shard.

Every output is written to a temporary sibling and renamed into place only when complete, so a failed run never
leaves a file or directory that looks finished; the staging directory stays until the output is in place, so a
re-run only writes the shards that are missing.

What is already at the target is replaced only if toss-filter wrote it: a directory output holds `MARKER`
(`toss-filter.json`, beside datasets' own files, which it leaves as `save_to_disk` writes them), and a directory
without it, not empty, is refused (`check_output`, before any work, and again right before the move), never
deleted; a single-file output replaces only a regular file. A full disk or a read-only target is a one-line
`WriteError` naming the file; a single-file export, or a directory output copied across filesystems, first
checks that the filesystem has room for it.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from datasets import DatasetInfo, Features
from datasets import config as datasets_config
from datasets.utils.py_utils import asdict

from toss_filter.arrow import list_array, take_rows
from toss_filter.config import OUTPUT_FORMATS
from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.errors import ConfigError, TossError
from toss_filter.files import (atomic_file, atomic_write_text, check_free_space, check_replaceable, mark_dir,
                               replace_dir, staging_dir, writing)

# Bytes of a single-file export per byte of the staged Arrow shards, at most (free space is checked against it):
# JSON Lines spells each id in about as many characters as Arrow stores bytes; Parquet compresses.
EXPORT_SIZE = {"jsonl": 1.25, "parquet": 1.0, "torchtune": 1.0}
# Rows per Parquet row group and per JSONL batch: at 2048 tokens a row, about 26 MB of columns, so a reader can
# stream the file and the writer never holds more than one converted group beside the table.
ROW_GROUP_ROWS = 1024
DATA_FILE = "data-{:05d}-of-{:05d}.arrow"  # datasets' own names, so load_from_disk reads the directory
DATA_FILES = re.compile(r"^data-(\d{5,})-of-(\d{5,})\.arrow$")
# The temporary files `temp_file` makes for them (`.NAME.random`), which a killed write leaves behind.
TEMP_FILES = re.compile(r"^\.(data-\d{5,}-of-\d{5,}\.arrow|state\.json|dataset_info\.json|toss-filter\.json)\.")
STATE_FILE, INFO_FILE = datasets_config.DATASET_STATE_JSON_FILENAME, datasets_config.DATASET_INFO_FILENAME
HASH_CHUNK = 16 * 2**20


def training_table(input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> pa.Table:
    ids, new_offsets = take_rows(input_ids, offsets, rows)
    row_labels, _ = take_rows(labels, offsets, rows)
    return pa.table({
        "input_ids": list_array(ids, new_offsets, pa.int32()),
        "attention_mask": list_array(np.ones(len(ids), dtype=np.int8), new_offsets, pa.int8()),
        "labels": list_array(row_labels, new_offsets, pa.int64()),
    })


def training_schema(emit_assistant_masks: bool = False) -> pa.Schema:
    """The schema of `training_table` (with `assistant_masks` last if asked): what a `ShardedDataset` of the
    output is made with."""
    fields = [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
              ("labels", pa.list_(pa.int64()))]
    return pa.schema(fields + ([("assistant_masks", pa.list_(pa.int8()))] if emit_assistant_masks else []))


class MissingShardsError(TossError):
    """A ShardedDataset was finished or exported before every shard was written; `missing` lists them."""

    def __init__(self, staging: Path, missing: list[int], shards: int):
        self.staging, self.missing, self.shards = staging, missing, shards
        names = ", ".join(DATA_FILE.format(shard, shards) for shard in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        super().__init__(f"{staging}: {len(missing)} of {shards} shards are not written ({names}{more}), or their "
                         "write was killed: write them (re-run the step), then finish again")

    def __reduce__(self) -> tuple:
        return type(self), (self.staging, self.missing, self.shards)


class ShardedDataset:
    """A `save_to_disk` directory written one Arrow file per shard: `data-{shard:05d}-of-{shards:05d}.arrow`
    (Arrow IPC *stream* format, as `datasets` itself writes them), so `datasets.load_from_disk` opens the result,
    rows in shard order.

    `staging` is created if missing and persists until `finish` moves it onto the target, so a killed run resumes:
    `done` says which shards are already there. Shards may be written in any order, by several processes at once
    (each file appears by a rename). A shard file is the bytes `Dataset.save_to_disk` writes for the same table
    (record batches of datasets' DEFAULT_MAX_BATCH_SIZE rows, the `huggingface` features metadata). Put `staging`
    on the filesystem of the target: `finish` renames it (across filesystems it falls back to a copy).
    """

    def __init__(self, staging: Path, shards: int, schema: pa.Schema):
        if shards < 1:
            raise ValueError(f"a ShardedDataset needs at least one shard (got {shards}): datasets cannot load a "
                             "directory of zero data files; give an empty dataset one empty shard")
        self.staging, self.shards, self.schema = Path(staging), shards, schema
        self._file_schema(schema)  # refuse a schema datasets cannot describe, before any shard is written
        with writing(self.staging):
            self.staging.mkdir(parents=True, exist_ok=True)
        strays = sorted(path.name for path in self.staging.iterdir()
                        if (match := DATA_FILES.match(path.name)) and int(match.group(2)) != shards)
        if strays:
            raise ConfigError(f"{self.staging} holds shards of another layout ({', '.join(strays[:3])}"
                              f"{', ...' if len(strays) > 3 else ''}), not of {shards} shards: remove it to start over")

    @property
    def features(self) -> Features:
        return Features.from_arrow_schema(self.schema)

    @staticmethod
    def _file_schema(schema: pa.Schema) -> pa.Schema:
        """`schema` as datasets writes it into a data file: its own fields and the features metadata."""
        file_schema = Features.from_arrow_schema(schema).arrow_schema
        if file_schema.remove_metadata() != schema.remove_metadata():
            raise ValueError(f"datasets would store this schema as another one:\n{schema}\nbecomes\n{file_schema}")
        return file_schema

    def path(self, shard: int) -> Path:
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is not in 0..{self.shards - 1}")
        return self.staging / DATA_FILE.format(shard, self.shards)

    def done(self, shard: int) -> bool:
        """Whether shard `shard` is written (its file exists only once complete)."""
        return self.path(shard).exists()

    def missing(self) -> list[int]:
        return [shard for shard in range(self.shards) if not self.done(shard)]

    def write(self, shard: int, table: pa.Table) -> None:
        """Write `table` (exactly `schema`'s columns and types) as shard `shard`: into a temporary file beside it,
        renamed into place once complete, so the shard exists only complete. Writing a shard again replaces it."""
        path = self.path(shard)
        if table.schema.remove_metadata() != self.schema.remove_metadata():
            raise ValueError(f"shard {shard} has the schema\n{table.schema}\nnot the dataset's\n{self.schema}")
        if not self.staging.is_dir():  # finished (moved) or removed meanwhile: do not recreate a stray directory
            raise TossError(f"{self.staging} is gone (finished or removed): shard {shard} was not written")
        file_schema = self._file_schema(self.schema)
        table = table.combine_chunks().cast(file_schema)
        _write_stream(path, file_schema, table.to_batches(max_chunksize=datasets_config.DEFAULT_MAX_BATCH_SIZE))

    def batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        """Every row, in shard order, in record batches of exactly `rows` rows (the last one shorter), without
        the features metadata. Holds at most one batch of a shard file and one batch of `rows` rows."""
        schema = self.schema.remove_metadata()
        pending: list[pa.RecordBatch] = []
        count = 0
        for shard in range(self.shards):
            for batch in _read_stream(self.path(shard)):
                batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
                while batch.num_rows:
                    take = min(rows - count, batch.num_rows)
                    pending.append(batch.slice(0, take))
                    batch, count = batch.slice(take), count + take
                    if count == rows:
                        yield _concat(pending, schema)
                        pending, count = [], 0
        if count:
            yield _concat(pending, schema)

    def finish(self, target: Path) -> Path:
        """Make the staging directory a `save_to_disk` directory and move it to `target` (replacing an older
        directory there if toss-filter wrote it: `check_replaceable`); return `target`. Refuses (MissingShardsError,
        naming them) while a shard is missing, and (ConfigError) a directory at `target` that is not toss-filter's.

        Writes `dataset_info.json` (DatasetInfo of the features of `schema`) and `state.json` (the data files in
        shard order, and a fingerprint that hashes their bytes) as `Dataset.save_to_disk` writes them, after
        removing the temporary files that killed writes left behind. Safe to re-run after a kill: until the final
        rename the staging directory holds everything. `MARKER` is written last, beside datasets' files.
        """
        target = Path(target)
        check_replaceable(target)
        self._check()
        for leftover in self.staging.iterdir():
            if TEMP_FILES.match(leftover.name):
                leftover.unlink(missing_ok=True)
        info = asdict(DatasetInfo(features=self.features))
        # As save_to_disk writes them: info with its first-level keys sorted, state with all keys sorted.
        info_text = json.dumps({key: info[key] for key in sorted(info)}, indent=2)
        files = [DATA_FILE.format(shard, self.shards) for shard in range(self.shards)]
        state = {"_data_files": [{"filename": name} for name in files], "_fingerprint": self._fingerprint(info_text),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        atomic_write_text(self.staging / INFO_FILE, info_text)
        atomic_write_text(self.staging / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
        mark_dir(self.staging, kind="save_to_disk")
        _move_dir(self.staging, target)
        return target

    def _check_complete(self) -> None:
        missing = self.missing()
        if missing:
            raise MissingShardsError(self.staging, missing, self.shards)

    def _check(self) -> None:
        """Every shard written, and each with this dataset's schema (a shard of another run is refused)."""
        self._check_complete()
        expected = self.schema.remove_metadata()
        other = [shard for shard in range(self.shards)
                 if _stream_schema(self.path(shard)).remove_metadata() != expected]
        if other:
            raise ConfigError(f"{self.staging}: shards {', '.join(map(str, other[:10]))} hold other columns than "
                              f"{', '.join(expected.names)} (written by another configuration): remove the staging "
                              "directory to start over")

    def _fingerprint(self, info_text: str) -> str:
        """datasets' kind of fingerprint (16 hex digits) of the content: the same shards give the same state.json."""
        digest = xxhash.xxh64(info_text.encode())
        for shard in range(self.shards):
            path = self.path(shard)
            digest.update(path.name.encode())
            with open(path, "rb") as source:
                while chunk := source.read(HASH_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()

    def _map(self, convert: Callable[[pa.RecordBatch], pa.RecordBatch], schema: pa.Schema) -> None:
        """Rewrite every shard through `convert` (batch by batch) into `schema`, which becomes this dataset's.
        A shard already in `schema` (a killed earlier pass got to it) is left as it is."""
        file_schema, plain = self._file_schema(schema), schema.remove_metadata()
        for shard in range(self.shards):
            path = self.path(shard)
            if _stream_schema(path).remove_metadata() != plain:
                converted = (pa.RecordBatch.from_arrays(convert(batch).columns, schema=file_schema)
                             for batch in _read_stream(path))
                _write_stream(path, file_schema, converted)
        self.schema = schema


def _write_stream(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    """An Arrow IPC stream file of `batches` at `path`, by a temporary file and a rename. Empty batches are left
    out: a 0-row shard is the schema alone, as datasets writes it, and loads as 0 rows."""
    with atomic_file(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch)


def _read_stream(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC stream file, one at a time (the file is closed once they are read)."""
    with pa.OSFile(str(path)) as source:
        yield from pa.ipc.open_stream(source)


def _stream_schema(path: Path) -> pa.Schema:
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_stream(source).schema


def _concat(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()[0]


def _move_dir(staging: Path, target: Path) -> None:
    """`replace_dir`, and across filesystems (after checking the room there) a copy beside `target` renamed into
    place, then `staging` removed."""
    try:
        replace_dir(staging, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    check_free_space(target, _tree_bytes(staging))
    copy = staging_dir(target)
    try:
        with writing(target):
            shutil.copytree(staging, copy, dirs_exist_ok=True)
        replace_dir(copy, target)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    shutil.rmtree(staging)


def _tree_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def export(data: ShardedDataset, target: Path, format: str = "arrow", emit_assistant_masks: bool = False) -> Path:
    """Write the finished shards of `data` to `target` in `format`; return `target`. Raises MissingShardsError
    while a shard is missing, and ConfigError for what `check_output` refuses.

    `arrow`: `data.finish(target)`, the directory `target` (replacing an older one). With `emit_assistant_masks`
    and shards that lack the column, each shard is rewritten with it first, one at a time (resumable); shards
    written with `training_schema(True)` (`with_assistant_masks` applied per shard) skip that pass. Every other
    format: the shards, in order, streamed into the single file `target`, whatever its suffix (a temporary file
    renamed over an older regular file; anything else there is refused), one row group of ROW_GROUP_ROWS rows at
    a time, once the filesystem is seen to have room for it (WriteError otherwise); then the staging directory is
    removed. The layouts are in this module's docstring. A failed export leaves the staging directory, so it can
    be run again.
    """
    target = Path(target)
    check_output(target, format, emit_assistant_masks)
    data._check_complete()
    masks = emit_assistant_masks and "assistant_masks" not in data.schema.names
    if format == "arrow":  # finish checks the shards' schemas, after the masks pass (a killed one converted some)
        if masks:
            data._map(with_assistant_masks, data.schema.append(pa.field("assistant_masks", pa.list_(pa.int8()))))
        return data.finish(target)
    data._check()
    convert = torchtune_batch if format == "torchtune" else with_assistant_masks if masks else None
    write = write_jsonl if format == "jsonl" else write_parquet
    check_free_space(target, int(EXPORT_SIZE[format] * sum(data.path(shard).stat().st_size
                                                           for shard in range(data.shards))))
    with atomic_file(target) as tmp:
        write(data.batches(ROW_GROUP_ROWS), data.schema.remove_metadata(), tmp, convert)
        check_output(target, format, emit_assistant_masks)  # again: what is there now, right before the move
    shutil.rmtree(data.staging)
    return target


def save_output(table: pa.Table, target: Path, format: str = "arrow", emit_assistant_masks: bool = False) -> Path:
    """Write the in-memory training table `table` (as `training_table` returns it) to `target` in `format`: a
    one-shard `ShardedDataset` beside `target`, then `export` (see there); return `target`. A failure leaves
    nothing behind (nor the staging directory) and keeps an older output. Raises ConfigError for a format not in
    OUTPUT_FORMATS, and for `emit_assistant_masks` with `torchtune`: no torchtune code reads `assistant_masks`, so
    the column would be dead weight that looks like it does something.
    """
    target = Path(target)
    check_output(target, format, emit_assistant_masks)
    staging = staging_dir(target)
    try:
        data = ShardedDataset(staging, 1, table.schema)
        data.write(0, table)
        return export(data, target, format, emit_assistant_masks)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_dataset(table: pa.Table, target: Path) -> Path:
    """Any in-memory table as a `save_to_disk` directory at `target` (replacing an older one): `save_output` in
    the arrow format."""
    return save_output(table, target, "arrow")


def check_output(target: Path, format: str, emit_assistant_masks: bool) -> None:
    """Refuse what `save_output` cannot write, or must not replace: for `arrow`, a directory toss-filter did not
    write (not empty, no MARKER), a symbolic link or a file; for a single-file format, anything but a regular file.
    The API entry (`api.select_dataset`, `api.filter_dataset`) calls it too (and `check_output_dir` on the
    rejected rows' directory), so a bad choice fails before scoring; the writers call it again right before the
    move."""
    if format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format '{format}': choose one of {', '.join(OUTPUT_FORMATS)}")
    if format == "torchtune" and emit_assistant_masks:
        raise ConfigError("--emit-assistant-masks does not apply to the torchtune format: torchtune never reads "
                          "`assistant_masks` (its loss mask is the `mask` column); the masks are for TRL <= 1.6 "
                          "with packing")
    target = Path(target)
    if format == "arrow":
        check_output_dir(target)
    elif target.is_dir():
        raise ConfigError(f"{target} is a directory; the {format} format writes a single file: name a file")
    elif target.exists() and not target.is_file():
        raise ConfigError(f"--output {target} exists and is not a regular file: toss-filter replaces only a regular "
                          "file; name another path")


def check_output_dir(target: Path, option: str = "--output") -> None:
    """Refuse a directory output's `target` that toss-filter must not replace (`files.check_replaceable`)."""
    check_replaceable(Path(target), option)


Convert = Callable[[pa.RecordBatch], pa.RecordBatch] | None


def write_parquet(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path, convert: Convert) -> None:
    """Stream `batches` (of at most ROW_GROUP_ROWS rows, with `schema`) into the Parquet file `path`, one row group
    per batch, converting each with `convert` (if any) on the way, so no converted copy of the whole table exists."""
    schema = _converted(pa.RecordBatch.from_pylist([], schema=schema), convert).schema
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            if batch.num_rows:  # an empty row group makes datasets' Parquet reader fail ("BatchSize ... got 0")
                writer.write_batch(_converted(batch, convert), row_group_size=ROW_GROUP_ROWS)


def write_jsonl(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path, convert: Convert) -> None:
    """Stream `batches` into `path` as JSON Lines, one batch at a time."""
    with open(path, "w", encoding="utf-8") as sink:
        for batch in batches:
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
