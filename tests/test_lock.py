"""One writer per run directory and per output (`toss_filter.lock`): a second `toss-filter` process is refused at
once with one line and exit 2, a stale lock of a dead process is taken over, a lock of another host is refused
with how to remove it, nested holdings in one process are free, and `--shard-slice` runs share a run directory.

The two-process tests start a real second `toss-filter` (`python -m toss_filter.cli`) while this test process
holds the lock through `RunLock` itself."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from toss_filter.lock import LockError, RunLock, output_lock, run_dir_lock
from conftest import REPO, chat, write_jsonl

ERROR_PREFIX = "toss-filter: error: "


def toss(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "toss_filter.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env=env, cwd=REPO)


def error_line(completed: subprocess.CompletedProcess) -> str:
    """Exit 2, nothing on stdout, no traceback, and the one error line (the last line of stderr)."""
    assert completed.returncode == 2, (completed.returncode, completed.stdout, completed.stderr)
    assert completed.stdout == ""
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith(ERROR_PREFIX)] == [lines[-1]], completed.stderr
    return lines[-1]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def fake_holder(path: Path, **holder: object) -> None:
    """A lock file as another process would have written it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000", **holder}))


# ------------------------------------------------------------------------------------------------ in-process


def test_the_lock_file_names_its_holder_and_goes_on_exit(tmp_path):
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir) as lock:
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        assert lock.held
    assert not (run_dir / ".lock").exists()
    assert not run_dir.exists()  # made for the lock alone, so removed with it


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_goes_on_errors_and_interrupts(tmp_path, error):
    (tmp_path / "run").mkdir()
    with pytest.raises(error):
        with run_dir_lock(tmp_path / "run"):
            (tmp_path / "run" / "run.json").write_text("{}")
            raise error
    assert sorted(os.listdir(tmp_path / "run")) == ["run.json"]  # the lock is gone, the run's files are kept


def test_nested_holdings_in_one_process_are_free(tmp_path):
    """`filter` holds the run directory's and the output's locks; the `score` and `select` inside take them again."""
    with run_dir_lock(tmp_path / "run"), output_lock(tmp_path / "out"):
        with run_dir_lock(tmp_path / "run"):
            with run_dir_lock(tmp_path / "run"), output_lock(tmp_path / "out"):
                pass
        assert (tmp_path / "run" / ".lock").exists() and (tmp_path / "out.lock").exists()
    assert not (tmp_path / "run" / ".lock").exists() and not (tmp_path / "out.lock").exists()


def test_a_live_holder_is_refused(tmp_path):
    fake_holder(tmp_path / "run" / ".lock", pid=os.getppid())  # alive, and not this process
    with pytest.raises(LockError, match=r"is in use by another toss-filter run \(pid \d+ on host .*wait for it"):
        run_dir_lock(tmp_path / "run").acquire()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getppid()  # left alone


@pytest.mark.subprocess
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    fake_holder(tmp_path / "run" / ".lock", pid=dead_pid())
    with caplog.at_level(logging.WARNING, logger="toss_filter.lock"):
        with run_dir_lock(tmp_path / "run"):
            assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text
    assert os.listdir(tmp_path / "run") == []


def test_a_reused_pid_is_stale(tmp_path):
    """The pid is alive, but its process started after the lock was written (another process got the pid)."""
    fake_holder(tmp_path / "run" / ".lock", pid=os.getppid(), process_start="1")
    with run_dir_lock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()


@pytest.mark.subprocess
def test_a_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    lock = tmp_path / "run" / ".lock"
    fake_holder(lock, pid=dead_pid(), host="elsewhere.example")  # its pid means nothing here: never taken over
    with pytest.raises(LockError) as refused:
        run_dir_lock(tmp_path / "run").acquire()
    assert "on host elsewhere.example" in str(refused.value)
    assert f"if that host's run is dead, remove {lock} and re-run" in str(refused.value)
    assert lock.exists()


def test_slices_share_the_run_directory_and_exclude_the_exclusive_lock(tmp_path):
    run_dir = tmp_path / "run"
    fake_holder(run_dir / ".lock-slice-0-of-2", pid=os.getppid())  # slice 0/2 runs in another live process
    with run_dir_lock(run_dir, (1, 2)):  # another slice: fine
        with pytest.raises(LockError, match="lock-slice-0-of-2"):
            run_dir_lock(run_dir).acquire()  # select (or a whole score) waits for every slice
    with pytest.raises(LockError, match="lock-slice-0-of-2"):
        run_dir_lock(run_dir, (0, 2)).acquire()  # the same slice twice
    (run_dir / ".lock-slice-0-of-2").unlink()
    fake_holder(run_dir / ".lock", pid=os.getppid())
    with pytest.raises(LockError, match=r"run \(pid"):
        run_dir_lock(run_dir, (1, 2)).acquire()  # no slice while the exclusive lock is held
    assert sorted(os.listdir(run_dir)) == [".lock"]


@pytest.mark.subprocess
def test_a_stale_slice_lock_does_not_block_select(tmp_path):
    fake_holder(tmp_path / "run" / ".lock-slice-3-of-4", pid=dead_pid())
    with run_dir_lock(tmp_path / "run"):
        pass
    assert os.listdir(tmp_path / "run") == []


def test_a_lock_of_this_process_held_elsewhere_in_it_does_not_conflict(tmp_path):
    """A process scoring a slice may select in the same process (the API, sequentially or nested)."""
    with run_dir_lock(tmp_path / "run", (0, 2)), run_dir_lock(tmp_path / "run"):
        assert {".lock", ".lock-slice-0-of-2"} <= set(os.listdir(tmp_path / "run"))


def test_an_unreadable_lock_is_refused_not_removed(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("garbage")
    with pytest.raises(LockError, match="names no holder: if no toss-filter run is using it, remove"):
        RunLock(tmp_path / "run" / ".lock", "the run directory").acquire()
    assert (tmp_path / "run" / ".lock").read_text() == "garbage"


# --------------------------------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_second_process_on_the_run_directory_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "run"
    data = write_jsonl(tmp_path / "data.jsonl", [chat("Hi", "Hello.")])
    with run_dir_lock(run_dir):
        selected = toss("select", "--run-dir", run_dir, "--output", tmp_path / "out")
        scored = toss("score", data, "--safety-model", "/no/model", "--utility-model", "/no/model",
                      "--run-dir", run_dir)
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()  # still ours
    for completed in (selected, scored):
        line = error_line(completed)
        assert line == (f"{ERROR_PREFIX}the run directory {run_dir} is in use by another toss-filter run "
                        f"(pid {os.getpid()} on host {socket.gethostname()}, since {line.split('since ')[1]}")
        assert line.endswith(f"; lock {run_dir / '.lock'}): wait for it to finish, or stop it")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.lock").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_second_process_on_the_output_is_refused_even_with_another_run_directory(tmp_path):
    output = tmp_path / "out"
    with output_lock(output):
        line = error_line(toss("select", "--run-dir", tmp_path / "other-run", "--output", output))
    assert line.startswith(f"{ERROR_PREFIX}the output {output} is in use by another toss-filter run (pid {os.getpid()}")
    assert not (tmp_path / "other-run").exists()  # its lock was released, the directory made for it removed


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_stale_lock_is_taken_over_by_the_next_process(tmp_path):
    run_dir = tmp_path / "run"
    fake_holder(run_dir / ".lock", pid=dead_pid())
    completed = toss("select", "--run-dir", run_dir, "--output", tmp_path / "out")
    line = error_line(completed)  # past the lock: select then finds nothing scored
    assert line == f"{ERROR_PREFIX}{run_dir} holds no run.json: run `toss-filter score` into it first"
    assert "taking over the stale lock" in completed.stderr
    assert os.listdir(run_dir) == []


@pytest.mark.slow
@pytest.mark.subprocess
def test_slices_run_side_by_side_and_select_waits_for_them(tmp_path):
    run_dir = tmp_path / "run"
    data = write_jsonl(tmp_path / "data.jsonl", [chat("Hi", "Hello.")])
    with run_dir_lock(run_dir, (0, 2)):
        other_slice = toss("score", data, "--safety-model", "/no/model", "--utility-model", "/no/model",
                           "--run-dir", run_dir, "--shard-slice", "1/2")
        selected = toss("select", "--run-dir", run_dir, "--output", tmp_path / "out")
    # the other slice got past the lock, to the first thing it checks after it
    assert error_line(other_slice) == f"{ERROR_PREFIX}--safety-model: no such model directory: /no/model"
    line = error_line(selected)
    assert line.startswith(f"{ERROR_PREFIX}the run directory {run_dir} is in use by another toss-filter run "
                           f"(pid {os.getpid()}")
    assert f"lock {run_dir / '.lock-slice-0-of-2'})" in line
    assert not run_dir.exists()  # made for the slice lock alone, and left empty by the others: removed with it
