"""Atomic file operations: a target appears only complete, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
