"""One writer per run directory and per output: lock files that a second process finds and is refused by.

    with RunLock(run_dir / ".lock"):   ...   # exclusive
    with run_dir_lock(run_dir): ...           # RUN_DIR/.lock, or RUN_DIR/.lock-slice-I-of-N for `--shard-slice I/N`
    with output_lock(output): ...             # OUTPUT.lock, beside the output

A lock file is created atomically (`O_CREAT | O_EXCL`) and holds the holder's pid, host and start time (JSON). It
is removed on exit, also on errors and KeyboardInterrupt. A lock left by a process that died (same host, pid not
alive, or alive but started later than the lock: a reused pid) is stale: it is taken over, with a warning. A lock
of another host cannot be checked from here: it is refused with a message that says how to remove it.

Locks are re-entrant per process: a process that holds a lock takes it again for free (a count), so `filter`
holds both locks for its whole duration and the `score` and `select` inside it do not re-lock. Shard-slice locks
(`--shard-slice` runs of `score` share one run directory, e.g. a Slurm array) exclude the run directory's
exclusive lock, and each other only for the same slice: `select` (or a whole `score`) is refused while any slice
lock is alive, and a slice is refused while the exclusive lock is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toss_filter.errors import TossError
from toss_filter.files import writing

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
SLICE_LOCK = ".lock-slice-{}-of-{}"
SLICE_LOCKS = re.compile(r"^\.lock-slice-\d+-of-\d+$")
READ_ATTEMPTS = 25  # x 20 ms: how long a lock file may stay empty between its creation and its content


@dataclass
class _Holding:
    """A lock this process holds: how many times, the identity in its file, the directories made for it."""

    count: int
    identity: dict[str, Any]
    created: list[Path] = field(default_factory=list)


_held: dict[str, _Holding] = {}  # real path of the lock file -> this process's holding
_guard = threading.RLock()


class LockError(TossError):
    """Another process holds the lock; the message says who, and what to do."""


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat), to tell a reused pid; None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name (which may hold spaces)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


BOOT_ID = _read("/proc/sys/kernel/random/boot_id")  # changes at every boot: every process of before is gone
PID_NAMESPACE = _pid_namespace()  # containers on one host may share a host name, never a pid namespace


def _local(holder: dict[str, Any]) -> bool:
    """Whether the holder's pid can be checked from here: the same host, in the same pid namespace."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot_id") and BOOT_ID and holder["boot_id"] != BOOT_ID:
        return True  # rebooted since: checkable (dead)
    return not (holder.get("pid_namespace") and PID_NAMESPACE and holder["pid_namespace"] != PID_NAMESPACE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    return True


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"


class RunLock:
    """An exclusive lock file at `path` (see the module docstring). `what` names the locked thing in messages;
    `conflicts` lists the lock files (as a callable of the lock's directory) that must not be alive while it is
    held: those are checked after the lock file is created, so of two processes racing one always sees the other."""

    def __init__(self, path: Path | str, what: str | None = None, conflicts: Any = None):
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.conflicts = conflicts
        self._key = os.path.realpath(self.path)

    # ---- the holder
    def _me(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "process_start": _process_start(os.getpid()), "boot_id": BOOT_ID, "pid_namespace": PID_NAMESPACE}

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """The holder recorded in the lock file `path` ({} if unreadable), or None if there is none. A file that
        does not parse is read again for a moment: its holder may have created it and not yet written it."""
        for attempt in range(READ_ATTEMPTS):
            try:
                text = Path(path).read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except OSError:
                return {}
            try:
                holder = json.loads(text)
            except ValueError:
                holder = None
            if isinstance(holder, dict):
                return holder
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(0.02)
        return {}

    @staticmethod
    def stale(holder: dict[str, Any]) -> bool:
        """Whether the holder is a dead process of this host (or its pid now belongs to a later process)."""
        if not _local(holder) or not isinstance(holder.get("pid"), int):
            return False
        if holder.get("boot_id") and BOOT_ID and holder["boot_id"] != BOOT_ID:
            return True
        pid = holder["pid"]
        if pid == os.getpid():  # this process, yet not among its locks: left by an earlier life of this pid
            return True
        if not _alive(pid):
            return True
        recorded, now = holder.get("process_start"), _process_start(pid)
        return recorded is not None and now is not None and recorded != now

    # ---- taking and releasing
    def _mkdirs(self) -> list[Path]:
        """Make the lock's directory; return the directories made, deepest first."""
        missing = []
        directory = self.path.parent.absolute()
        while not directory.exists() and directory != directory.parent:
            missing.append(directory)
            directory = directory.parent
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        return missing

    def _create(self) -> dict[str, Any] | None:
        """Create the lock file with this process's identity and return it; None if one exists."""
        identity = self._me()
        with writing(self.path):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(handle, (json.dumps(identity) + "\n").encode())
            except BaseException:
                os.close(handle)
                self.path.unlink(missing_ok=True)
                raise
            os.close(handle)
        return identity

    def _take_over(self, holder: dict[str, Any]) -> bool:
        """Remove the stale lock file whose holder is `holder`, unless another process replaced it meanwhile: it is
        renamed aside first (atomic), and put back if what was renamed is not that stale lock."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # gone meanwhile: try again
        if self.read(aside) != holder:  # a fresh lock, taken between our read and the rename: give it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        log.warning("taking over the stale lock %s of a process that is gone (%s)", self.path, _describe(holder))
        return True

    def _refuse(self, path: Path, holder: dict[str, Any]) -> LockError:
        if not holder:
            return LockError(f"{self.what} is locked by {path}, which names no holder: if no toss-filter run is using "
                             f"it, remove {path} and re-run")
        if not _local(holder):
            return LockError(f"{self.what} is in use by another toss-filter run ({_describe(holder)}; lock {path}): "
                             f"wait for it to finish; if that host's run is dead, remove {path} and re-run")
        return LockError(f"{self.what} is in use by another toss-filter run ({_describe(holder)}; lock {path}): "
                         "wait for it to finish, or stop it")

    def acquire(self) -> RunLock:
        """Take the lock (again, if this process holds it already), or raise LockError naming the holder."""
        with _guard:
            if self._key in _held:
                _held[self._key].count += 1
                return self
            created = self._mkdirs()
            identity = None
            try:
                identity = self._take()
                self._check_conflicts()
                _held[self._key] = _Holding(1, identity, created)
            except BaseException:  # a refusal, an error, an interrupt: leave nothing behind
                if identity is not None:
                    self._remove(identity)
                self._remove_dirs(created)
                raise
            return self

    def _take(self) -> dict[str, Any]:
        """Create the lock file, taking over a stale one; return the identity written into it."""
        for _ in range(10):
            identity = self._create()
            if identity is not None:
                return identity
            holder = self.read(self.path)
            if holder is None:
                continue  # released meanwhile
            if holder and self.stale(holder):
                self._take_over(holder)
                continue
            raise self._refuse(self.path, holder)
        raise LockError(f"{self.what}: could not take the lock {self.path} (other processes keep taking it): re-run")

    def _check_conflicts(self) -> None:
        for path in self.conflicts(self.path.parent) if self.conflicts else []:
            if os.path.realpath(path) in _held:
                continue  # this process's own
            holder = self.read(path)
            if holder is None:
                continue
            if holder and self.stale(holder):
                self._take_over_conflict(path, holder)
                continue
            raise self._refuse(path, holder)

    def _take_over_conflict(self, path: Path, holder: dict[str, Any]) -> None:
        RunLock(path, self.what)._take_over(holder)

    def release(self) -> None:
        """Give the lock back: the file goes when the outermost holding of this process ends."""
        with _guard:
            holding = _held.get(self._key)
            if holding is None:
                return
            holding.count -= 1
            if holding.count:
                return
            del _held[self._key]
            self._remove(holding.identity)
            self._remove_dirs(holding.created)

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._key in _held

    def _remove(self, identity: dict[str, Any]) -> None:
        """Remove the lock file if it is still this process's (not in a forked child, not after a takeover)."""
        if identity["pid"] == os.getpid() and self.read(self.path) == identity:
            self.path.unlink(missing_ok=True)

    @staticmethod
    def _remove_dirs(created: list[Path]) -> None:
        for directory in created:
            try:
                directory.rmdir()  # only if empty: nothing else was written there
            except OSError:
                break

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _slice_locks(directory: Path) -> list[Path]:
    try:
        return sorted(path for path in Path(directory).iterdir() if SLICE_LOCKS.match(path.name))
    except OSError:
        return []


def run_dir_lock(run_dir: Path | str, shard_slice: tuple[int, int] | None = None) -> RunLock:
    """The lock of a run directory: exclusive (RUN_DIR/.lock, refused while any slice lock is alive), or for
    `shard_slice` (index, count) the slice's own (refused while the exclusive lock, or the same slice, is held)."""
    run_dir = Path(run_dir)
    if shard_slice is None or shard_slice[1] == 1:
        return RunLock(run_dir / LOCK_NAME, f"the run directory {run_dir}", conflicts=_slice_locks)
    index, count = shard_slice
    return RunLock(run_dir / SLICE_LOCK.format(index, count),
                   f"the run directory {run_dir} (--shard-slice {index}/{count})",
                   conflicts=lambda directory: [Path(directory) / LOCK_NAME])


def output_lock(output: Path | str) -> RunLock:
    """The lock of an output (and its -rejected sibling): OUTPUT.lock, beside it, so that two runs with different
    run directories cannot write one output."""
    output = Path(output)
    return RunLock(output.with_name(output.name + ".lock"), f"the output {output}")
