"""Step 1, load: read rows from a file or dataset and normalise each one to a chat conversation.

Contract: `load_conversations(source, ...)` yields `(row, conversation)` for every input row, in input order,
where `row` is the 0-based index of the row in the input and `conversation` is a validated `Conversation`
(`toss_filter.data.conversation`: the messages and tools exactly as the chat template will get them).
A row that cannot be normalised raises `InputError` naming the source, the row and the field: rows are
never skipped silently. `iter_conversations` yields the `InputError` of a bad row in its place instead (what
`--skip-invalid` uses), so the rows after it are still read and keep their row numbers.

Hostile input (each an `InputError`, never a traceback):
- a compressed or binary file under a text name (gzip, zstd, bz2, xz, zip, Parquet, UTF-16): refused up front;
- bytes that are not UTF-8: the row (in JSONL its own line; lines are read as bytes and decoded one by one);
- a JSONL line, or a .json row, over `MAX_ROW_BYTES` bytes (16 MiB; `TOSS_FILTER_MAX_ROW_BYTES` overrides it):
  read with a cap, never whole, so a huge line costs neither the memory nor the time to decode it;
- a lone surrogate (a JSON `\\ud800` escape without its pair) in any text: the row and field;
- nesting too deep for the JSON decoder, an integer too long to convert: the row.
NUL characters (`\\u0000`) are valid text: they are kept and tokenized like any other character.

Row shapes and the message contract are in `toss_filter.data.conversation`.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from toss_filter.data.conversation import Conversation, to_conversation
from toss_filter.errors import InputError

JSON_CHUNK_CHARS = 1 << 20
MAX_ROW_BYTES = 16 * 2**20  # the longest JSONL line or .json row read; TOSS_FILTER_MAX_ROW_BYTES overrides it
MAX_ROW_BYTES_ENV = "TOSS_FILTER_MAX_ROW_BYTES"
BOM = codecs.BOM_UTF8
# What a compressed or binary file starts with, so one named .jsonl is refused with its real kind.
MAGIC_BYTES = (
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it first, e.g. gzip -dc FILE > plain.jsonl"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", "decompress it first, e.g. zstd -dc FILE > plain.jsonl"),
    (b"BZh", "a bzip2-compressed file", "decompress it first, e.g. bzip2 -dc FILE > plain.jsonl"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it first, e.g. xz -dc FILE > plain.jsonl"),
    (b"PK\x03\x04", "a zip archive", "extract it first (unzip)"),
    (b"PAR1", "a Parquet file", "name it .parquet"),
    (b"\xff\xfe", "UTF-16 text", "convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8"),
    (b"\xfe\xff", "UTF-16 text", "convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8"),
)


def max_row_bytes() -> int:
    """The longest row read, in bytes: `TOSS_FILTER_MAX_ROW_BYTES` if set, else `MAX_ROW_BYTES`."""
    text = os.environ.get(MAX_ROW_BYTES_ENV)
    if not text:
        return MAX_ROW_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        from toss_filter.errors import ConfigError

        raise ConfigError(f"{MAX_ROW_BYTES_ENV} must be a positive number of bytes, got {text!r}")
    return value


def _too_long(limit: int) -> str:
    return (f"the row is longer than {limit:,} bytes, the limit on one row: shorten or split it, or raise the limit "
            f"with {MAX_ROW_BYTES_ENV}=BYTES")


def read_records(source: str, split: str | None = None, name: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(row, record)` for each row of a JSONL/JSON/Parquet file, a `save_to_disk` directory or a
    `datasets.load_dataset` name or path (streamed, with `name` its config), reading in batches, never the whole
    input at once. Broken JSON and an empty input raise `InputError`."""
    for row, record in read_records_or_errors(source, split, name):
        if isinstance(record, InputError):
            raise record
        yield row, record


def read_records_or_errors(source: str, split: str | None = None,
                           name: str | None = None) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    """`read_records`, but a row that cannot be read and that the reader can step over (a JSONL line that is not
    JSON, not UTF-8 or too long; a row that is not an object) is yielded as its `InputError`. A problem with the
    input as a whole, or one that leaves no way to find the next row (broken JSON inside a .json list), raises."""
    path = Path(source)
    count = 0
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix == ".parquet":
            records = _read_parquet(path)
        else:
            raise InputError(source, None, None, f"unknown file type '{suffix}' (expected .jsonl, .json or .parquet)")
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        records = _read_saved_dataset(path, split)
    elif path.exists() or source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise InputError(source, None, None, "no such file, or a directory that is not a `save_to_disk` dataset")
    else:
        records = _read_hub_dataset(source, split, name)
    for row, record in enumerate(records):
        count += 1
        if isinstance(record, InputError):
            yield row, record
        elif not isinstance(record, Mapping):
            yield row, InputError(source, row, None, f"expected a JSON object per row, got {type(record).__name__}")
        else:
            yield row, dict(record)
    if count == 0:
        raise InputError(source, None, None, "the input has no rows")


def _check_text_file(path: Path, handle: Any) -> None:
    """Refuse a compressed or binary file under a text name, from its first bytes; leaves `handle` at the start."""
    head = handle.read(8)
    handle.seek(0)
    for magic, kind, fix in MAGIC_BYTES:
        if head.startswith(magic):
            raise InputError(str(path), None, None, f"this looks like {kind} (it starts with bytes "
                             f"{magic.hex(' ')}), not UTF-8 JSON text: {fix}")


def _skip_bom(handle: Any) -> None:
    if handle.read(len(BOM)) != BOM:  # tolerate a byte-order mark
        handle.seek(0)


def _parse_error(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} (column {err.colno})"
    if isinstance(err, RecursionError):
        return "nested too deeply to decode"
    return str(err)  # e.g. an integer too long to convert


def _read_jsonl(path: Path) -> Iterator[Any]:
    """The JSON value of each non-blank line, or the `InputError` of a line that is not one. Lines are read as
    bytes, at most `max_row_bytes()` of them at a time, and decoded one by one, so a bad line names its own row
    and a huge one is refused without being held whole."""
    source, limit = str(path), max_row_bytes()
    with path.open("rb") as handle:
        _check_text_file(path, handle)
        _skip_bom(handle)
        row, line_number = 0, 0
        while line := handle.readline(limit + 1):
            line_number += 1
            if len(line) > limit and not line.endswith(b"\n"):  # more than `limit` bytes before the newline
                del line
                while (rest := handle.readline(1 << 16)) and not rest.endswith(b"\n"):
                    pass  # step over the rest of the line without keeping it
                yield InputError(source, row, None, f"line {line_number}: {_too_long(limit)}")
                row += 1
                continue
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield InputError(source, row, None, f"not valid UTF-8 on line {line_number}: byte "
                                 f"0x{line[err.start]:02x} at byte {err.start + 1} of the line (the file must be UTF-8)")
                row += 1
                continue
            if not text.strip():
                continue
            try:
                yield json.loads(text)
            except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
                yield InputError(source, row, None, f"broken JSON on line {line_number}: {_parse_error(err)}")
            row += 1


def _read_json(path: Path) -> Iterator[Any]:
    """The elements of a top-level JSON list, decoded one at a time from chunks of the file, as strictly as
    `json.loads` would read the whole list."""
    decoder, source, limit = json.JSONDecoder(), str(path), max_row_bytes()
    with path.open("rb") as handle:
        _check_text_file(path, handle)
        _skip_bom(handle)
        buffer, position, lines_before, rows = "", 0, 0, 0
        pending, decoded = b"", 0  # bytes of a character cut by the chunk's end; bytes decoded so far
        bad: tuple[int, int] | None = None  # (file offset, value) of the first byte that is not UTF-8
        current: int | None = None  # the row being read, for an error (None outside the list)

        def read_text() -> str:  # the next chunk as text, up to the first byte that is not UTF-8
            nonlocal pending, decoded, bad
            while bad is None:
                raw = handle.read(JSON_CHUNK_CHARS)
                data = pending + raw
                try:
                    text, used = codecs.utf_8_decode(data, "strict", not raw)
                except UnicodeDecodeError as err:
                    text, used, bad = data[:err.start].decode("utf-8"), err.start, (decoded + err.start, data[err.start])
                pending, decoded = data[used:], decoded + used
                if text or not raw:
                    return text
            return ""

        def not_utf8() -> InputError:
            assert bad is not None
            return InputError(source, current, None, f"not valid UTF-8: byte 0x{bad[1]:02x} at byte {bad[0]:,} of "
                              "the file (the file must be UTF-8)")

        def more() -> bool:  # append the next chunk to what is left of the buffer; False at the end of the file
            nonlocal buffer, position, lines_before
            chunk = read_text()
            lines_before += buffer.count("\n", 0, position)
            buffer, position = buffer[position:] + chunk, 0
            return bool(chunk)

        def where(pos: int) -> str:
            line_start = buffer.rfind("\n", 0, pos) + 1
            return f"line {lines_before + buffer.count(chr(10), 0, pos) + 1}, column {pos - line_start + 1}"

        def next_char() -> str:  # the next non-blank character ("" at the end of the file), left in the buffer
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n":
                    position += 1
                if position < len(buffer) or not more():
                    if position >= len(buffer) and bad is not None:
                        raise not_utf8()
                    return buffer[position:position + 1]

        first = next_char()
        if first != "[":
            kinds = {"{": "dict", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}
            found = kinds.get(first, "nothing" if not first else "a number" if first in "-0123456789" else repr(first))
            raise InputError(source, None, None, f"a .json input must hold a list of rows, got {found}")
        position += 1
        expect_value = False  # after "[" a "]" may come; after "," a value must
        while True:
            current = rows
            char = next_char()
            if not char:
                raise InputError(source, None, None, "broken JSON: the list is not closed with ']'")
            if char == "]" and not expect_value:
                position += 1
                current = None
                if next_char():
                    raise InputError(source, None, None, "broken JSON: text after the closing ']'")
                return
            # A number cut by the chunk's end would decode as a shorter number: keep a full chunk ahead.
            while len(buffer) - position < JSON_CHUNK_CHARS and more():
                pass
            while True:
                try:
                    element, end = decoder.raw_decode(buffer, position)
                    if end < len(buffer) or not more():  # a number at the buffer's end may go on in the next chunk
                        break
                except (ValueError, RecursionError) as err:
                    if len(buffer) - position > limit:
                        raise InputError(source, rows, None, _too_long(limit)) from None
                    if not isinstance(err, json.JSONDecodeError):
                        raise InputError(source, rows, None, f"broken JSON: {_parse_error(err)}") from None
                    if not more():  # else the element may continue in the next chunk
                        if bad is not None:
                            raise not_utf8() from None
                        raise InputError(source, rows, None, f"broken JSON at {where(err.pos)}: {err.msg}") from None
            # A row that parsed is over the limit too if it is longer: say so, and go on to the next one.
            yield InputError(source, rows, None, _too_long(limit)) if end - position > limit else element
            position, rows = end, rows + 1
            current = rows
            char = next_char()
            if char == ",":
                position, expect_value = position + 1, True
            elif char != "]":
                raise InputError(source, rows, None, f"broken JSON at {where(position)}: expected ',' or ']' after "
                                 f"a row, got {char!r}" if char else "broken JSON: the list is not closed with ']'")
            else:
                expect_value = False


def _read_parquet(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        for batch in batches:
            records = batch.to_pylist()
            yield from records
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:  # not Parquet, or a damaged one
        raise InputError(str(path), None, None, f"not a readable Parquet file: {' '.join(str(err).split())}") from None


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[Any]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = split or ("train" if "train" in loaded else None)
        if split not in loaded:
            raise InputError(str(path), None, None, f"choose a split with --split, one of {sorted(loaded)}")
        loaded = loaded[split]
    elif split:
        raise InputError(str(path), None, None, f"--split {split} given, but this directory holds a single dataset, not splits")
    yield from loaded


def _read_hub_dataset(source: str, split: str | None, name: str | None) -> Iterator[Any]:
    import datasets

    try:
        loaded = datasets.load_dataset(source, name, split=split or "train", streaming=True)
        yield from loaded
    except InputError:
        raise
    except Exception as err:  # datasets raises many unrelated types; the user needs the message, not the class
        raise InputError(source, None, None, f"could not load with datasets.load_dataset: {err}") from err


def count_rows(source: str, split: str | None = None, name: str | None = None) -> int | None:
    """The number of input rows, from metadata or one cheap pass (for progress and ETA), or None if unknown."""
    path = Path(source)
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                return pq.ParquetFile(path).metadata.num_rows
            if suffix in (".jsonl", ".ndjson"):
                return _count_lines(path)
            return None
        if path.is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split or "train"]
            return len(loaded)
        import datasets

        info = datasets.load_dataset_builder(source, name).info
        return info.splits[split or "train"].num_examples if info.splits else None
    except Exception:  # a count is only for the progress bar: reading the rows reports the real problem
        return None


def _count_lines(path: Path) -> int:
    """Non-blank lines, read in fixed chunks (a line of any length costs no more memory than a chunk)."""
    count, open_line = 0, False  # whether the line the last chunk ended in has a non-blank byte yet
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            *ended, last = chunk.split(b"\n")
            for part in ended:
                count += bool(open_line or part.strip())
                open_line = False
            open_line = open_line or bool(last.strip())
    return count + open_line


def load_conversations(
    source: str, split: str | None = None, columns: Mapping[str, str] | None = None, name: str | None = None
) -> Iterator[tuple[int, Conversation]]:
    """Yield `(row, conversation)` for every row of `source`, validated (see the module docstring); the first bad row
    raises its `InputError`."""
    for row, conversation in iter_conversations(source, split, columns, name):
        if isinstance(conversation, InputError):
            raise conversation
        yield row, conversation


def iter_conversations(
    source: str, split: str | None = None, columns: Mapping[str, str] | None = None, name: str | None = None
) -> Iterator[tuple[int, Conversation | InputError]]:
    """`load_conversations`, but a bad row that the reader can step over is yielded as `(row, InputError)` and
    reading goes on (`--skip-invalid`); problems of the input as a whole still raise."""
    for row, record in read_records_or_errors(source, split, name):
        if isinstance(record, InputError):
            yield row, record
            continue
        try:
            conversation: Conversation | InputError = to_conversation(record, source, row, columns)
        except InputError as err:
            conversation = err
        yield row, conversation
