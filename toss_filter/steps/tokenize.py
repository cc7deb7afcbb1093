"""Steps 1 and 2 over the shard plan: stream the input, tokenize it shard by shard, write the token shards.

    tokenize_step(config, tokenizer, chat_format, run, show_progress) -> (tokens_key, manifest)

The input is read in batches on the driver, so a bad row stops the run there, before any model is loaded or any
remote work starts. Each shard's rows are tokenized in this process or, with `num_proc > 1`, in a pool of worker
processes (at most two shards per worker in flight, so memory stays bounded). A shard that exists is not
tokenized again; the manifest is written last, and its presence means the tokens are complete:

    tokens/<key>/manifest.json: {"rows", "shards", "shard_rows", "tokens", "response_tokens", "unscored_tokens",
                                 "reasoning_dropped_turns", "longest_row",
                                 "truncated_rows", "invalid_rows", "digests": [sha256 per shard],
                                 "digest": sha256 of them all}

`rows` counts every input row, so the shard plan of input positions holds. With `skip_invalid`, a row that cannot
be loaded or tokenized (an `InputError`) is left out of its token shard and recorded instead in
`tokens/<key>/invalid-NNNNN.arrow` beside it (`row`, `field`, `problem`; written before the token shard, whose
presence still means the shard is complete; absent when the shard has none). The row ids of the valid rows stay
their input positions; `select` writes the invalid rows to OUTPUT-rejected with `reason = "invalid: ..."`.
A shard's digest is its tokens' digest, and, only when it has invalid rows, mixed with their row ids, so tokens
without invalid rows keep their digest. `max_invalid` stops the run once more rows than that were invalid, with
the `InputError` of the first row over the limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from toss_filter.config import ScoreConfig
from toss_filter.data.conversation import Conversation
from toss_filter.data.load import count_rows, iter_conversations, load_conversations
from toss_filter.data.tokenize import IGNORE_INDEX, ConversationTokenizer, Tokenized
from toss_filter.errors import InputError
from toss_filter.files import atomic_write_text
from toss_filter.plan import read_table, write_table
from toss_filter.run import INVALID_SCHEMA, TOKENS_SCHEMA, UNSCORED_FIELD, RunDir, invalid_path, read_invalid
from toss_filter.fingerprint import content_key, tokens_digest
from toss_filter.arrow import list_column
from toss_filter.progress import Progress

log = logging.getLogger(__name__)
_worker_encode: ConversationTokenizer | None = None


def tokenize_rows(conversations: Iterable[tuple[int, Conversation | list[dict[str, Any]]]],
                  encode: ConversationTokenizer, source: str) -> pa.Table:
    """Every conversation as one `tokens_table` row, in input order."""
    rows = ((row, encode(conversation, source, row)) for row, conversation in conversations)
    return tokens_table(rows, with_unscored=not encode.score_reasoning)


def tokens_table(tokenized: Iterable[tuple[int, Tokenized]], with_unscored: bool) -> pa.Table:
    """Tokenized rows as one token shard table (`run.TOKENS_SCHEMA`): `labels` holds the SCORED response tokens
    (those of `Tokenized.labels` not in `Tokenized.unscored`), and, only `with_unscored` (so tables of other runs
    keep their layout), `unscored` (`run.UNSCORED_FIELD`: positions trained but not scored; the writer trains on
    them). The schema's metadata `reasoning_dropped_turns` counts the turns whose reasoning the template dropped by
    design (absent when none).
    """
    rows, input_ids, labels, truncated, unscored, dropped = [], [], [], [], [], 0
    for row, tokens in tokenized:
        dropped += tokens.dropped_reasoning
        scored = list(tokens.labels)
        for j in tokens.unscored:
            scored[j] = IGNORE_INDEX
        rows.append(row)
        input_ids.append(tokens.input_ids)
        labels.append(scored)
        truncated.append(tokens.truncated)
        unscored.append(tokens.unscored)
    columns = [rows, input_ids, labels, truncated] + ([unscored] if with_unscored else [])
    schema = TOKENS_SCHEMA.append(UNSCORED_FIELD) if with_unscored else TOKENS_SCHEMA
    table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)], schema=schema)
    return table.replace_schema_metadata({"reasoning_dropped_turns": str(dropped)} if dropped else None)


def input_identity(source: str, split: str | None, name: str | None) -> dict[str, Any]:
    """What identifies the input without reading it: a file by path, size and modification time; a directory by
    its files'; a dataset name by name, config and split."""
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "split": split}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"dir": str(path.resolve()), "split": split,
                "files": [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    return {"dataset": source, "name": name, "split": split}


def tokenizer_identity(encode: ConversationTokenizer) -> str:
    tokenizer = encode.tokenizer
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()


def tokens_key(config: ScoreConfig, encode: ConversationTokenizer) -> str:
    return content_key({
        "layout": "tokens-v2", "input": input_identity(config.input, config.split, config.name),
        "columns": config.columns, "template": encode.chat_format.template,
        "add_special_tokens": encode.chat_format.add_special_tokens, "tokenizer": tokenizer_identity(encode),
        "max_length": config.max_length, "shard_rows": config.shard_rows,
        **({"skip_invalid": True} if config.skip_invalid else {}),  # absent when off: keys made before stay valid
        **({"score_reasoning": False} if not config.score_reasoning else {}),
        **({"limit": config.limit} if config.limit is not None else {}),  # likewise
    })


def invalid_reason(field: str | None, problem: str) -> str:
    """The `reason` of an invalid row in OUTPUT-rejected: one line."""
    return " ".join(f"invalid: {f'field {field!r}: ' if field else ''}{problem}".split())


def shard_summary(table: pa.Table, invalid: pa.Table | None = None) -> dict[str, Any]:
    """What the manifest records of one token shard (and of its invalid rows, if any)."""
    labels, offsets = list_column(table, "labels")
    lengths = np.diff(offsets)
    invalid_rows = invalid.num_rows if invalid is not None else 0
    digest = tokens_digest(table)
    if invalid_rows:
        mixed = hashlib.sha256(digest.encode())
        mixed.update(np.ascontiguousarray(invalid.column("row").to_numpy(), dtype=np.int64).tobytes())
        digest = mixed.hexdigest()
    unscored = list_column(table, "unscored")[0].size if "unscored" in table.column_names else 0
    return {"digest": digest, "rows": table.num_rows + invalid_rows, "tokens": int(offsets[-1]),
            "response_tokens": int((labels != IGNORE_INDEX).sum()), "unscored_tokens": unscored,
            "reasoning_dropped_turns": int((table.schema.metadata or {}).get(b"reasoning_dropped_turns", 0)),
            "longest_row": int(lengths.max(initial=0)),
            "truncated_rows": int(pa.compute.sum(table.column("truncated")).as_py() or 0),
            "invalid_rows": invalid_rows}


def tokenize_valid_rows(items: list[tuple[int, Conversation | InputError]], encode: ConversationTokenizer,
                        source: str) -> tuple[pa.Table, pa.Table]:
    """`tokens_table` of the rows that load and tokenize, and the others (an `InputError` from loading or
    tokenizing) as an `INVALID_SCHEMA` table."""
    tokenized, invalid = [], []
    for row, conversation in items:
        if not isinstance(conversation, InputError):
            try:
                tokenized.append((row, encode(conversation, source, row)))
                continue
            except InputError as err:
                conversation = err
        invalid.append((row, conversation.field, conversation.problem))
    table = tokens_table(tokenized, with_unscored=not encode.score_reasoning)
    rows, fields, problems = zip(*invalid) if invalid else ((), (), ())
    return table, pa.table({"row": pa.array(rows, pa.int64()), "field": pa.array(fields, pa.string()),
                            "problem": pa.array(problems, pa.string())}, schema=INVALID_SCHEMA)


def _write_shard(path: Path, items: list[tuple[int, Any]], source: str, encode: ConversationTokenizer | None = None,
                 skip_invalid: bool = False) -> dict[str, Any]:
    encode = encode or _worker_encode
    if not skip_invalid:
        table, invalid = tokenize_rows(items, encode, source), None
    else:
        table, invalid = tokenize_valid_rows(items, encode, source)
        if invalid.num_rows:  # before the token shard, whose presence means the shard is complete
            write_table(invalid_path(path), invalid)
        else:
            invalid_path(path).unlink(missing_ok=True)
    write_table(path, table)
    return shard_summary(table, invalid)


def _check_max_invalid(summaries: list[Future | dict[str, Any]], paths: list[Path], max_invalid: int | None,
                       source: str) -> None:
    """Raise the `InputError` of the first invalid row over `max_invalid`, counting the shards that are done, in
    order (so the row named is the same however many processes tokenize)."""
    if max_invalid is None:
        return
    seen = 0
    for summary, path in zip(summaries, paths):
        if isinstance(summary, Future):
            if not summary.done():
                return
            summary = summary.result()
        if seen + summary["invalid_rows"] > max_invalid:
            first_over = read_invalid(path).slice(max_invalid - seen, 1).to_pylist()[0]
            raise InputError(source, first_over["row"], first_over["field"],
                             f"{first_over['problem']} (more than --max-invalid {max_invalid} invalid rows)")
        seen += summary["invalid_rows"]


def rows_to_read(config: ScoreConfig) -> int | None:
    """How many input rows the run reads (for progress): `limit` if set (the input is not counted then: counting
    can mean reading all of it), else the input's row count, or None if unknown."""
    return config.limit if config.limit is not None else count_rows(config.input, config.split, config.name)


def _init_worker(encode: ConversationTokenizer) -> None:
    global _worker_encode
    _worker_encode = encode


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def tokenize_step(config: ScoreConfig, encode: ConversationTokenizer, run: RunDir,
                  show_progress: bool = True) -> tuple[str, dict[str, Any]]:
    """Tokenize `config.input` into `run`'s token shards (resuming from complete ones); returns the tokens key and
    the manifest (see the module docstring)."""
    key = tokens_key(config, encode)
    manifest = run.tokens_manifest(key)
    if manifest is not None:
        if manifest.get("invalid_rows") and config.max_invalid is not None:
            _check_max_invalid([{"invalid_rows": read_invalid(run.token_shard(key, shard)).num_rows}
                                for shard in range(manifest["shards"])],
                               [run.token_shard(key, shard) for shard in range(manifest["shards"])],
                               config.max_invalid, config.input)
        return key, manifest
    load = iter_conversations if config.skip_invalid else load_conversations
    conversations = islice(load(config.input, config.split, config.columns, config.name), config.limit)
    summaries: list[Future | dict[str, Any]] = []
    paths: list[Path] = []
    # fork where there is one: spawn would re-import the caller's __main__, which a script without a main guard
    # cannot survive; the workers only tokenize (no torch, no tokenizer thread pool), so forking them is safe.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = (ProcessPoolExecutor(config.num_proc, mp_context=get_context(method), initializer=_init_worker,
                                initargs=(encode,)) if config.num_proc > 1 else None)
    try:
        with Progress("tokenize", rows_to_read(config), "rows", show_progress) as progress:
            for shard, items in enumerate(_batched(conversations, config.shard_rows)):
                path = run.token_shard(key, shard)
                paths.append(path)
                if path.exists():
                    summaries.append(shard_summary(read_table(path), read_invalid(path)))
                elif pool is None:
                    summaries.append(_write_shard(path, items, config.input, encode, config.skip_invalid))
                else:
                    in_flight = [s for s in summaries if isinstance(s, Future) and not s.done()]
                    if len(in_flight) >= 2 * config.num_proc:
                        in_flight[0].result()
                    summaries.append(pool.submit(_write_shard, path, items, config.input, None,
                                                 config.skip_invalid))
                _check_max_invalid(summaries, paths, config.max_invalid, config.input)
                progress.advance(len(items))
            summaries = [s.result() if isinstance(s, Future) else s for s in summaries]
            _check_max_invalid(summaries, paths, config.max_invalid, config.input)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    invalid_rows = sum(s["invalid_rows"] for s in summaries)
    if summaries and invalid_rows == sum(s["rows"] for s in summaries):
        first = read_invalid(paths[0]).slice(0, 1).to_pylist()[0]
        raise InputError(config.input, first["row"], first["field"],
                         f"{first['problem']} (and every other row is invalid too: nothing to filter)")
    digests = [s["digest"] for s in summaries]
    manifest = {
        "rows": sum(s["rows"] for s in summaries), "shards": len(summaries), "shard_rows": config.shard_rows,
        **{field: sum(s[field] for s in summaries)
           for field in ("tokens", "response_tokens", "unscored_tokens", "reasoning_dropped_turns", "truncated_rows",
                         "invalid_rows")},
        "longest_row": max((s["longest_row"] for s in summaries), default=0),
        "digests": digests, "digest": hashlib.sha256("".join(digests).encode()).hexdigest(),
    }
    atomic_write_text(run.tokens_dir(key) / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    if manifest["reasoning_dropped_turns"]:
        log.warning("%d assistant turns carry reasoning that the %s template does not render (it keeps reasoning "
                    "only for the last turns, as Qwen3's does): like a trainer using the template, the output has "
                    "none of it; counted as reasoning_dropped_turns in stats.json", manifest["reasoning_dropped_turns"],
                    encode.chat_format.name)
    return key, manifest
