"""Atomic file operations: a target appears only complete, or not at all.

Every write goes through `writing(path)`, which turns the OSErrors a user fixes on their side (a full disk or
quota, a read-only or forbidden target) into one `WriteError` line naming the path, and every directory that
toss-filter puts in place carries a `MARKER` file: `replace_dir` replaces only a directory that is missing,
empty, or marked, so a directory of the user's is never deleted.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toss_filter.errors import ConfigError, TossError

MARKER = "toss-filter.json"  # in every directory toss-filter writes: what may be replaced by a later run
# The errors the user fixes on their side: a full disk or quota, a read-only or forbidden target, a file too big.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


class WriteError(TossError, OSError):
    """A target could not be written for a reason the user fixes (WRITE_ERRNOS). Still an OSError (errno,
    strerror, filename), so code that tolerates a failed optional write keeps doing so; printed as one line."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Raise the OSErrors of WRITE_ERRNOS inside as a `WriteError` naming `path` and the errno's text."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise WriteError(error.errno, os.strerror(error.errno), str(path)) from error


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_file(target: Path) -> str:
    """A temporary file beside `target`, with the permissions a plain `open` would give (mkstemp's are 0600)."""
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(handle)
        try:
            os.chmod(tmp, 0o666 & ~_umask())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return tmp


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """A temporary file beside `path` to write into; renamed to `path` when the block ends without an error, and
    removed when it raises, so `path` appears only complete. Write errors name `path` (`writing`)."""
    tmp = Path(temp_file(Path(path)))
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def is_marked(directory: Path) -> bool:
    """Whether `directory` holds the MARKER that toss-filter writes into every directory it puts in place."""
    try:
        return json.loads((Path(directory) / MARKER).read_text(encoding="utf-8")).get("written_by") == "toss-filter"
    except (OSError, ValueError, AttributeError):
        return False


def mark_dir(directory: Path, **details: object) -> None:
    """Write MARKER into `directory` (before it is moved into place): toss-filter wrote it, so a later run may
    replace it. Its bytes depend on `details` only (no version, no time), so an output stays the same bytes
    whoever writes it, and a model directory's content fingerprint does not change with the version."""
    atomic_write_text(Path(directory) / MARKER, json.dumps(
        {"written_by": "toss-filter", **details}, indent=2, sort_keys=True) + "\n")


def check_replaceable(target: Path, option: str = "the target") -> None:
    """Refuse (ConfigError) a `target` that `replace_dir` must not delete: a directory that is not empty and not
    marked as toss-filter's, a symbolic link, or anything else that is not a directory."""
    target = Path(target)
    if target.is_symlink():
        raise ConfigError(f"{option} {target} is a symbolic link: name a directory toss-filter may write")
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{option} {target} exists and is not a directory: remove it or name another path")
    # A directory of a run directory (its sidecar) is toss-filter's even without a marker: older versions wrote none.
    if any(target.iterdir()) and not is_marked(target) and not (target.parent / "run.json").is_file():
        raise ConfigError(f"{option} {target} is a non-empty directory that toss-filter did not write (it holds no "
                          f"{MARKER}): it is left untouched; name another path, or empty or remove it yourself")


# What a killed writer can leave beside its target: `temp_file`'s `.NAME.XXXXXXXX`, `staging_dir`'s
# `.NAME.tmp-XXXXXXXX` and `replace_dir`'s `.NAME.old-XXXXXXXX` (8 characters of tempfile's alphabet).
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp-|old-)?[a-z0-9_]{8}$")


def sweep_leftovers(directory: Path, name: str | None = None, keep: Path | None = None,
                    recursive: bool = False) -> int:
    """Remove what killed writers left in `directory` (only for targets called `name`, if given; never `keep`);
    returns how many. Call it only where no other writer can be at work: under the run's or output's lock."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.rglob(".*") if recursive else directory.glob(".*"):
        match = LEFTOVER.match(path.name)
        if not match or (name is not None and match["name"] != name) or (keep is not None and path == keep):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished `staging` directory to `target` (marking it as toss-filter's), replacing an older `target`
    only if `check_replaceable` allows it: the older one is moved aside first and removed once the new one is in
    place."""
    staging, target = Path(staging), Path(target)
    check_replaceable(target)
    sweep_leftovers(target.parent, target.name, keep=staging)  # an older run killed mid-replace left them
    if not (staging / MARKER).exists():
        mark_dir(staging)
    with writing(target):
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            staging.rename(target)
        except BaseException:
            if old is not None:
                os.replace(old / target.name, target)
                old.rmdir()
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    """A temporary directory beside `target`, with the permissions a plain `mkdir` would give (mkdtemp's are 0700)."""
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        staging.chmod(0o777 & ~_umask())
    return staging


def free_space(directory: Path) -> int | None:
    """Free bytes on the filesystem of `directory` (its nearest existing ancestor), or None if it cannot tell."""
    directory = Path(directory).absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def check_free_space(target: Path, needed: int) -> None:
    """Refuse (WriteError, ENOSPC) before writing about `needed` bytes at `target` on a filesystem with less free."""
    free = free_space(Path(target).parent)
    if free is not None and needed > free:
        raise WriteError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (it needs about {_size(needed)}, "
                         f"{_size(free)} are free there)", str(target))


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to the (immutable) file `source`, or a copy where links are refused."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
