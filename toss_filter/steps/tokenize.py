"""Steps 1 and 2 over the shard plan: stream the input, tokenize it shard by shard, write the token shards.

    tokenize_step(config, tokenizer, chat_format, run, show_progress) -> (tokens_key, manifest)

The input is read in batches on the driver, so a bad row stops the run there, before any model is loaded or any
remote work starts. Each shard's rows are tokenized in this process or, with `num_proc > 1`, in a pool of worker
processes (at most two shards per worker in flight, so memory stays bounded). A shard that exists is not
tokenized again; the manifest is written last, and its presence means the tokens are complete:

    tokens/<key>/manifest.json: {"rows", "shards", "shard_rows", "tokens", "response_tokens", "longest_row",
                                 "truncated_rows", "digests": [sha256 per shard], "digest": sha256 of them all}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from toss_filter.config import ScoreConfig
from toss_filter.data.load import Message, count_rows, load_conversations
from toss_filter.data.tokenize import IGNORE_INDEX, ConversationTokenizer, tokenize_rows
from toss_filter.files import atomic_write_text
from toss_filter.plan import read_table, write_table
from toss_filter.run import RunDir, content_key, list_column, tokens_digest
from toss_filter.steps.progress import Progress

_worker_encode: ConversationTokenizer | None = None


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
    })


def shard_summary(table: pa.Table) -> dict[str, Any]:
    """What the manifest records of one token shard."""
    labels, offsets = list_column(table, "labels")
    lengths = np.diff(offsets)
    return {"digest": tokens_digest(table), "rows": table.num_rows, "tokens": int(offsets[-1]),
            "response_tokens": int((labels != IGNORE_INDEX).sum()), "longest_row": int(lengths.max(initial=0)),
            "truncated_rows": int(pa.compute.sum(table.column("truncated")).as_py() or 0)}


def _write_shard(path: Path, items: list[tuple[int, list[Message]]], source: str,
                 encode: ConversationTokenizer | None = None) -> dict[str, Any]:
    table = tokenize_rows(items, encode or _worker_encode, source)
    write_table(path, table)
    return shard_summary(table)


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
        return key, manifest
    conversations = load_conversations(config.input, config.split, config.columns, config.name)
    summaries: list[Future | dict[str, Any]] = []
    # fork where there is one: spawn would re-import the caller's __main__, which a script without a main guard
    # cannot survive; the workers only tokenize (no torch, no tokenizer thread pool), so forking them is safe.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = (ProcessPoolExecutor(config.num_proc, mp_context=get_context(method), initializer=_init_worker,
                                initargs=(encode,)) if config.num_proc > 1 else None)
    try:
        with Progress("tokenize", count_rows(config.input, config.split, config.name), "rows",
                      show_progress) as progress:
            for shard, items in enumerate(_batched(conversations, config.shard_rows)):
                path = run.token_shard(key, shard)
                if path.exists():
                    summaries.append(shard_summary(read_table(path)))
                elif pool is None:
                    summaries.append(_write_shard(path, items, config.input, encode))
                else:
                    in_flight = [s for s in summaries if isinstance(s, Future) and not s.done()]
                    if len(in_flight) >= 2 * config.num_proc:
                        in_flight[0].result()
                    summaries.append(pool.submit(_write_shard, path, items, config.input))
                progress.advance(len(items))
            summaries = [s.result() if isinstance(s, Future) else s for s in summaries]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    digests = [s["digest"] for s in summaries]
    manifest = {
        "rows": sum(s["rows"] for s in summaries), "shards": len(summaries), "shard_rows": config.shard_rows,
        **{field: sum(s[field] for s in summaries) for field in ("tokens", "response_tokens", "truncated_rows")},
        "longest_row": max((s["longest_row"] for s in summaries), default=0),
        "digests": digests, "digest": hashlib.sha256("".join(digests).encode()).hexdigest(),
    }
    atomic_write_text(run.tokens_dir(key) / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return key, manifest
