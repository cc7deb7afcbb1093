"""Step 1, load: read rows from a file or dataset and normalise each one to a chat conversation.

Contract: `load_conversations(source, ...)` yields `(row, messages)` for every input row, in input order,
where `row` is the 0-based index of the row in the input and `messages` is a list of
`{"role": "system" | "user" | "assistant", "content": str}` with at least one non-empty assistant turn.
A row that cannot be normalised raises `InputError` naming the source, the row and the field: rows are
never skipped.

Accepted row shapes (checked in this order; `--column canonical=actual` renames input columns first):
- chat: `messages` (list of `{role, content}`; ShareGPT `{from, value}` with human/gpt is accepted too)
- `prompt` / `completion` (strings, or TRL-style lists of messages)
- Alpaca: `instruction` / optional `input` / `output`
- OpenOrca: optional `system_prompt` / `question` / `response`
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from toss_filter.errors import InputError

Message = dict[str, str]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
JSON_CHUNK_CHARS = 1 << 20
CANONICAL_COLUMNS = (
    "messages", "prompt", "completion", "instruction", "input", "output", "system_prompt", "question", "response",
)


def read_records(source: str, split: str | None = None, name: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(row, record)` for each row of a JSONL/JSON/Parquet file, a `save_to_disk` directory or a
    `datasets.load_dataset` name or path (streamed, with `name` its config), reading in batches, never the whole
    input at once. Broken JSON and an empty input raise `InputError`."""
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
        if not isinstance(record, Mapping):
            raise InputError(source, row, None, f"expected a JSON object per row, got {type(record).__name__}")
        count += 1
        yield row, dict(record)
    if count == 0:
        raise InputError(source, None, None, "the input has no rows")


def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8-sig") as handle:  # -sig: tolerate a byte-order mark
        row = 0
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(str(path), row, None, f"broken JSON on line {line_number}: {err.msg} (column {err.colno})")
            row += 1


def _read_json(path: Path) -> Iterator[Any]:
    """The elements of a top-level JSON list, decoded one at a time from chunks of the file, as strictly as
    `json.loads` would read the whole list."""
    decoder, source = json.JSONDecoder(), str(path)
    with path.open(encoding="utf-8-sig") as handle:
        buffer, position, lines_before, rows = "", 0, 0, 0

        def more() -> bool:  # append the next chunk to what is left of the buffer; False at the end of the file
            nonlocal buffer, position, lines_before
            chunk = handle.read(JSON_CHUNK_CHARS)
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
                    return buffer[position:position + 1]

        first = next_char()
        if first != "[":
            kinds = {"{": "dict", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}
            found = kinds.get(first, "nothing" if not first else "a number" if first in "-0123456789" else repr(first))
            raise InputError(source, None, None, f"a .json input must hold a list of rows, got {found}")
        position += 1
        expect_value = False  # after "[" a "]" may come; after "," a value must
        while True:
            char = next_char()
            if not char:
                raise InputError(source, None, None, "broken JSON: the list is not closed with ']'")
            if char == "]" and not expect_value:
                position += 1
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
                except json.JSONDecodeError as err:
                    if not more():  # else the element may continue in the next chunk
                        raise InputError(source, rows, None, f"broken JSON at {where(err.pos)}: {err.msg}") from None
            yield element
            position, rows = end, rows + 1
            char = next_char()
            if char == ",":
                position, expect_value = position + 1, True
            elif char != "]":
                raise InputError(source, rows, None, f"broken JSON at {where(position)}: expected ',' or ']' after "
                                 f"a row, got {char!r}" if char else "broken JSON: the list is not closed with ']'")
            else:
                expect_value = False


def _read_parquet(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


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
                with path.open("rb") as handle:
                    return sum(1 for line in handle if line.strip())
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


def to_messages(record: Mapping[str, Any], source: str, row: int, columns: Mapping[str, str] | None = None) -> list[Message]:
    """Normalise one record to validated chat messages (see the module docstring for the shapes)."""
    if columns:
        renamed = {canonical: record[actual] for canonical, actual in columns.items() if actual in record}
        record = {k: v for k, v in record.items() if k not in columns and k not in columns.values()} | renamed
    # Columnar inputs (Parquet, Arrow) fill the columns of other row shapes with nulls: a null column is absent.
    record = {key: value for key, value in record.items() if value is not None}
    if "messages" in record:
        return _validate_messages(record["messages"], source, row, "messages")
    if "conversations" in record:
        return _validate_messages(record["conversations"], source, row, "conversations")
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return _validate_messages(prompt + completion, source, row, "prompt+completion")
        _require_str(prompt, source, row, "prompt")
        _require_str(completion, source, row, "completion")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _validate_messages(messages, source, row, "completion")
    if "instruction" in record and "output" in record:
        instruction, extra = record["instruction"], record.get("input") or ""
        _require_str(instruction, source, row, "instruction")
        _require_str(extra, source, row, "input")
        _require_str(record["output"], source, row, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _validate_messages(
            [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}], source, row, "output"
        )
    if "question" in record and "response" in record:
        system = record.get("system_prompt") or ""
        for field in ("question", "response"):
            _require_str(record[field], source, row, field)
        _require_str(system, source, row, "system_prompt")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["response"]}]
        return _validate_messages(messages, source, row, "response")
    raise InputError(
        source, row, None,
        f"no known row shape in columns {sorted(record)}: expected messages, prompt+completion, "
        "instruction+output or question+response (rename columns with --column canonical=actual)",
    )


def _require_str(value: Any, source: str, row: int, field: str) -> None:
    if not isinstance(value, str):
        raise InputError(source, row, field, f"expected a string, got {type(value).__name__}")


def _validate_messages(messages: Any, source: str, row: int, field: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise InputError(source, row, field, "expected a non-empty list of messages")
    normalised: list[Message] = []
    for turn, message in enumerate(messages):
        where = f"{field}[{turn}]"
        if not isinstance(message, Mapping):
            raise InputError(source, row, where, f"expected an object with role and content, got {type(message).__name__}")
        if "role" in message:
            role, content = message.get("role"), message.get("content")
        elif "from" in message:
            role, content = SHAREGPT_ROLES.get(message["from"], message["from"]), message.get("value")
        else:
            raise InputError(source, row, where, "missing 'role'")
        if role not in ROLES:
            raise InputError(source, row, f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise InputError(source, row, f"{where}.content", f"expected a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise InputError(source, row, f"{where}.content", "empty assistant turn")
        normalised.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in normalised):
        raise InputError(source, row, field, "no assistant turn: nothing to score")
    return normalised


def load_conversations(
    source: str, split: str | None = None, columns: Mapping[str, str] | None = None, name: str | None = None
) -> Iterator[tuple[int, list[Message]]]:
    """Yield `(row, messages)` for every row of `source`, validated (see the module docstring)."""
    for row, record in read_records(source, split, name):
        yield row, to_messages(record, source, row, columns)
