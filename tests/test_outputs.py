"""Outputs that must not be touched, and targets that cannot be written.

- `--output` (or its `-rejected` sibling) that is the input, lies in the run directory or holds it, or is a
  directory toss-filter did not write (no `toss-filter.json`), is refused before any work, and again right before
  the move; a user's directory is never deleted.
- A full disk, a quota, a read-only or forbidden target is one line naming the path and the errno's text (exit 2),
  with no temporary file left and nothing that looks finished; a single-file export (or a copy across filesystems)
  is refused early when the filesystem has no room for it.

Which failures are real and which simulated: the tests run as root here, where chmod 0o555 does not stop a write.
REAL: a full disk and a read-only filesystem are tiny tmpfs mounts (`tmpfs` fixture; skipped where mounting is not
allowed); the cross-filesystem move is a real EXDEV (tmp_path on disk, the target on a tmpfs); a forbidden target
is sysfs (`/sys/fs`), which refuses new files even to root (EACCES) and new directories (EPERM). SIMULATED (always
run, so the behaviour is covered where nothing can be mounted): the lowest write call monkeypatched to raise
(`os.replace` with EDQUOT, `Path.write_text` and `pyarrow.OSFile` with ENOSPC).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import chat, write_jsonl
from toss_filter import files
from toss_filter.api import score_dataset, select_dataset
from toss_filter.cli import app
from toss_filter.config import ScoreConfig, SelectConfig
from toss_filter.data.write import ShardedDataset, export, save_dataset, save_output, training_table
from toss_filter.errors import ConfigError, TossError
from toss_filter.files import MARKER, WriteError, atomic_write_text, replace_dir
from toss_filter.plan import write_table

ERROR_PREFIX = "toss-filter: error: "
ROWS = [chat(f"Question {i}?", f"Answer {i}, in a few words.") for i in range(6)]


def table_of(rows: int, length: int = 100, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    offsets = np.arange(rows + 1, dtype=np.int64) * length
    ids = rng.integers(0, 50_000, offsets[-1]).astype(np.int32)
    return training_table(ids, ids.astype(np.int64), offsets, np.arange(rows))


def invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def error_line(code: int, stdout: str, stderr: str) -> str:
    """Exit 2, nothing on stdout, no traceback, exactly one error line, the last line of stderr."""
    assert code == 2, (code, stdout, stderr)
    assert stdout == "" and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith(ERROR_PREFIX)] == [lines[-1]], stderr
    return lines[-1]


def filter_args(data: Path, output: Path, *options: object, models: dict | None = None) -> list[object]:
    """`filter` with models that do not exist unless `models` is given: a refusal before any work never looks."""
    safety, utility = (models["safety"], models["utility"]) if models else ("/no/safety", "/no/utility")
    return ["filter", data, "--safety-model", safety, "--utility-model", utility, "--output", output,
            "--device", "cpu", *options]


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A directory of the user's, with their files in it."""
    directory = tmp_path / "mine"
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return directory


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(name, size, readonly=False)`: a real tmpfs of `size` (e.g. "64k") mounted at tmp_path/name, unmounted
    at the end; the test is skipped where mounting is not allowed (the simulated tests still run)."""
    mounted = []

    def mount(name: str, size: str, readonly: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777" + (",ro" if readonly else ""),
                                   "tmpfs", str(point)], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is None or done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the simulated tests cover it")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_models) -> Path:
    """A run directory scored once, for the select tests (each copies nothing: select writes only under
    RUN_DIR/select until it moves the outputs)."""
    root = tmp_path_factory.mktemp("scored")
    data = write_jsonl(root / "data.jsonl", ROWS)
    score_dataset(ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), str(root / "run"),
                              device="cpu"), show_progress=False)
    return root / "run"


# ------------------------------------------------------------------------------ the input and the run directory


def test_an_output_that_is_the_input_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    before = data.read_bytes()
    line = error_line(*invoke(*filter_args(data, data, "--format", "jsonl")))
    assert line == (f"{ERROR_PREFIX}--output {data} would overwrite the input {data}: name an output that is "
                    "neither the input nor inside it (nor holds it)")
    assert data.read_bytes() == before and not (tmp_path / "data.jsonl-run").exists()


def test_an_output_that_holds_the_input_is_refused_even_if_toss_filter_wrote_it(tmp_path):
    save_dataset(table_of(2), tmp_path / "out")
    data = write_jsonl(tmp_path / "out" / "data.jsonl", ROWS)
    assert "would overwrite the input" in error_line(*invoke(*filter_args(data, tmp_path / "out")))
    assert data.exists()


def test_select_refuses_the_input_the_run_directory_was_scored_from(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"input": str(data)}))
    line = error_line(*invoke("select", "--run-dir", tmp_path / "run", "--output", data, "--format", "parquet"))
    assert "would overwrite the input" in line and data.exists()


def test_an_output_inside_the_run_directory_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    run_dir = tmp_path / "run"
    line = error_line(*invoke(*filter_args(data, run_dir / "out", "--run-dir", run_dir)))
    assert line == (f"{ERROR_PREFIX}--output {run_dir / 'out'} is inside the run directory {run_dir}: "
                    "name a path outside it")
    assert not run_dir.exists()


def test_a_run_directory_inside_the_output_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    line = error_line(*invoke(*filter_args(data, tmp_path / "out", "--run-dir", tmp_path / "out" / "run")))
    assert line.startswith(f"{ERROR_PREFIX}the run directory {tmp_path / 'out' / 'run'} is inside --output ")
    line = error_line(*invoke(*filter_args(data, tmp_path / "out", "--run-dir", tmp_path / "out-rejected")))
    assert line == f"{ERROR_PREFIX}--output and --run-dir must be different directories"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ directories of the user's


@pytest.mark.parametrize("where", ["output", "rejected"])
def test_a_users_directory_at_the_output_is_refused_and_kept(tmp_path, user_dir, where):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    output = user_dir if where == "output" else tmp_path / "out"
    if where == "rejected":
        user_dir.rename(tmp_path / "out-rejected")
        user_dir = tmp_path / "out-rejected"
    before = tree(user_dir)
    line = error_line(*invoke(*filter_args(data, output)))
    name = "--output" if where == "output" else "the rejected rows' directory"
    assert line == (f"{ERROR_PREFIX}{name} {user_dir} is a non-empty directory that toss-filter did not write (it "
                    f"holds no {MARKER}): it is left untouched; name another path, or empty or remove it yourself")
    assert tree(user_dir) == before
    assert not (tmp_path / f"{output.name}-run").exists()  # refused before any work


def test_an_empty_directory_or_one_toss_filter_wrote_is_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    save_dataset(table_of(3, seed=1), tmp_path / "empty")
    save_dataset(table_of(3, seed=2), tmp_path / "empty")  # marked by the first write: replaced
    assert json.loads((tmp_path / "empty" / MARKER).read_text())["written_by"] == "toss-filter"
    assert datasets.load_from_disk(str(tmp_path / "empty")).to_list() == table_of(3, seed=2).to_pylist()
    assert os.listdir(tmp_path) == ["empty"]  # the older output was moved aside, then removed


def test_a_marker_that_is_not_toss_filters_does_not_count(tmp_path, user_dir):
    (user_dir / MARKER).write_text('{"written_by": "someone else"}')
    with pytest.raises(ConfigError, match="toss-filter did not write"):
        save_dataset(table_of(2), user_dir)
    assert (user_dir / "notes.txt").read_text() == "mine"


def test_a_users_directory_is_refused_again_right_before_the_move(tmp_path, user_dir):
    """A directory that appears after the checks (or a caller that skips them) is still never deleted."""
    staging = tmp_path / "staging"
    data = ShardedDataset(staging, 1, table_of(2).schema)
    data.write(0, table_of(2))
    before = tree(user_dir)
    with pytest.raises(ConfigError, match="toss-filter did not write"):
        data.finish(user_dir)
    with pytest.raises(ConfigError, match="toss-filter did not write"):
        replace_dir(staging, user_dir)
    assert tree(user_dir) == before
    assert data.missing() == []  # the staged output is kept for a re-run onto another target


def test_select_refuses_a_directory_made_at_the_output_after_its_checks(tmp_path, scored, user_dir):
    config = SelectConfig(str(scored), str(tmp_path / "out"))  # checked here: nothing at the output yet
    user_dir.rename(tmp_path / "out")
    before = tree(tmp_path / "out")
    with pytest.raises(ConfigError, match="toss-filter did not write"):
        select_dataset(config, show_progress=False)
    assert tree(tmp_path / "out") == before and not (tmp_path / "out-rejected").exists()
    assert not (tmp_path / "out.lock").exists() and not (scored / ".lock").exists()  # the locks went with it


def test_a_legacy_sidecar_of_a_run_directory_is_replaced(tmp_path):
    """Versions before the marker wrote RUN_DIR/token_scores without one: a directory of a run directory is
    toss-filter's."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    save_dataset(table_of(2), tmp_path / "run" / "token_scores")
    (tmp_path / "run" / "token_scores" / MARKER).unlink()
    save_dataset(table_of(3), tmp_path / "run" / "token_scores")
    assert len(datasets.load_from_disk(str(tmp_path / "run" / "token_scores"))) == 3


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_arrow_output_replaces_only_a_directory(tmp_path, user_dir, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("my file")
    else:
        target.symlink_to(user_dir, target_is_directory=True)
    with pytest.raises(ConfigError, match="is a symbolic link" if kind == "symlink" else "is not a directory"):
        select_dataset(SelectConfig(str(tmp_path / "run"), str(target)))  # refused before any work
    with pytest.raises(ConfigError):
        save_dataset(table_of(2), target)
    assert (user_dir / "notes.txt").read_text() == "mine"
    assert target.is_symlink() if kind == "symlink" else target.read_text() == "my file"


def test_a_single_file_output_replaces_only_a_regular_file(tmp_path):
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="exists and is not a regular file"):
        select_dataset(SelectConfig(str(tmp_path / "run"), str(fifo), format="jsonl"))
    (tmp_path / "old.parquet").write_text("an older output")
    save_output(table_of(2), tmp_path / "old.parquet", "parquet")  # a regular file: replaced, as before
    assert pq.read_table(tmp_path / "old.parquet").num_rows == 2


# ------------------------------------------------------------------------------------ full disks, read-only targets


def test_write_error_is_one_line_an_oserror_and_pickles():
    error = WriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/shard-00003.arrow")
    assert str(error) == "cannot write /x/shard-00003.arrow: No space left on device"
    assert isinstance(error, OSError) and isinstance(error, TossError) and error.exit_code == 2
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # raised in worker processes too


@pytest.mark.subprocess
def test_real_full_disk_while_writing_a_shard(tmp_path, tmpfs):
    disk = tmpfs("full", "64k")  # REAL: a 64 kB filesystem, the table is ~1 MB
    with pytest.raises(WriteError) as failed:
        save_output(table_of(1000), disk / "out")
    assert failed.value.errno == errno.ENOSPC
    message = str(failed.value)
    assert message.startswith(f"cannot write {disk}/.out.tmp-") and "/data-00000-of-00001.arrow: " in message
    assert message.endswith(": No space left on device") and "\n" not in message
    assert os.listdir(disk) == []  # no temporary file, no staging directory, no output


@pytest.mark.subprocess
def test_real_full_disk_during_a_single_file_export(tmp_path, tmpfs, monkeypatch):
    disk = tmpfs("full", "64k")  # REAL ENOSPC from the write itself: only the free-space pre-check is bypassed
    data = ShardedDataset(tmp_path / "staging", 1, table_of(1000).schema)
    data.write(0, table_of(1000))
    monkeypatch.setattr(files, "free_space", lambda directory: None)
    with pytest.raises(WriteError) as failed:
        export(data, disk / "out.jsonl", "jsonl")
    assert str(failed.value) == f"cannot write {disk / 'out.jsonl'}: No space left on device"
    assert os.listdir(disk) == []
    assert data.missing() == []  # the staged shards stay for a re-run


@pytest.mark.subprocess
def test_a_single_file_export_is_refused_early_without_room(tmp_path, tmpfs):
    disk = tmpfs("small", "64k")  # REAL free space of a real filesystem
    data = ShardedDataset(tmp_path / "staging", 1, table_of(1000).schema)
    data.write(0, table_of(1000))
    with pytest.raises(WriteError) as refused:
        export(data, disk / "out.parquet", "parquet")
    assert str(refused.value).startswith(f"cannot write {disk / 'out.parquet'}: No space left on device (it needs "
                                         "about ")
    assert str(refused.value).endswith(" are free there)")
    assert os.listdir(disk) == [] and data.missing() == []


@pytest.mark.subprocess
def test_an_arrow_output_across_filesystems_is_refused_early_without_room(tmp_path, tmpfs):
    disk = tmpfs("small", "64k")  # REAL: staging on tmp_path's disk, the target on a tmpfs: a real EXDEV
    data = ShardedDataset(tmp_path / "staging", 1, table_of(1000).schema)
    data.write(0, table_of(1000))
    with pytest.raises(WriteError, match=r"No space left on device \(it needs about 1\.\d MB"):
        data.finish(disk / "out")
    assert os.listdir(disk) == [] and data.missing() == []
    roomy = tmpfs("roomy", "8m")
    assert datasets.load_from_disk(str(data.finish(roomy / "out"))).num_rows == 1000  # copied, then renamed


@pytest.mark.subprocess
def test_real_read_only_filesystem(tmp_path, tmpfs):
    disk = tmpfs("ro", "1m", readonly=True)  # REAL: a tmpfs mounted read-only (EROFS, even for root)
    for format in ("arrow", "parquet"):
        with pytest.raises(WriteError) as failed:
            save_output(table_of(2), disk / "out", format)
        assert str(failed.value) == f"cannot write {disk / 'out'}: Read-only file system"


@pytest.mark.subprocess
def test_filter_onto_a_read_only_filesystem_is_one_line(tmp_path, tmpfs):
    disk = tmpfs("ro", "1m", readonly=True)  # REAL
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    line = error_line(*invoke(*filter_args(data, disk / "out")))
    assert line == f"{ERROR_PREFIX}cannot write {disk / 'out-run' / '.lock'}: Read-only file system"


def test_real_forbidden_target_even_for_root(tmp_path):
    """sysfs refuses new files (EACCES) and directories (EPERM) to root as well: REAL."""
    try:
        atomic_write_text(Path("/sys/fs/toss-filter-probe.json"), "{}")
    except WriteError as error:
        assert str(error) == "cannot write /sys/fs/toss-filter-probe.json: Permission denied"
    except OSError as error:
        pytest.skip(f"/sys/fs fails otherwise here: {error}")
    else:
        Path("/sys/fs/toss-filter-probe.json").unlink()
        pytest.skip("/sys/fs is writable here")
    with pytest.raises(WriteError, match=r"^cannot write /sys/fs/toss-filter-probe/shard-00000.arrow: "
                                         r"Operation not permitted$"):
        write_table(Path("/sys/fs/toss-filter-probe/shard-00000.arrow"), table_of(2))


def test_simulated_quota_while_renaming_a_shard_leaves_no_temporary_file(tmp_path, monkeypatch):
    def over_quota(source, target):  # SIMULATED: os.replace, the last step of every atomic write
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "replace", over_quota)
    with pytest.raises(WriteError, match=r"^cannot write .*/shard-00003\.arrow: Disk quota exceeded$"):
        write_table(tmp_path / "tokens" / "shard-00003.arrow", table_of(2))
    with pytest.raises(WriteError, match=r"^cannot write .*/manifest\.json: Disk quota exceeded$"):
        atomic_write_text(tmp_path / "tokens" / "manifest.json", "{}")
    assert os.listdir(tmp_path / "tokens") == []


def test_simulated_full_disk_while_writing_json(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):  # SIMULATED: the text write of atomic_write_text
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError, match=r"^cannot write .*/run\.json: No space left on device$"):
        atomic_write_text(tmp_path / "run.json", "{}")
    assert os.listdir(tmp_path) == []


def test_other_oserrors_are_not_rewritten(tmp_path, monkeypatch):
    def broken(source, target):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError) as failed:
        atomic_write_text(tmp_path / "x.json", "{}")
    assert not isinstance(failed.value, WriteError) and failed.value.errno == errno.EIO


def test_simulated_full_disk_in_select_is_one_line_and_nothing_looks_finished(tmp_path, scored, monkeypatch):
    real = pa.OSFile

    def full(path, mode="r"):  # SIMULATED: pyarrow's file, the lowest write call of every shard
        if "w" in mode and f"{os.sep}select{os.sep}" in str(path):
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(path, mode)

    shutil.rmtree(scored / "select", ignore_errors=True)  # shards staged by an earlier test would not be written
    monkeypatch.setattr(pa, "OSFile", full)
    line = error_line(*invoke("select", "--run-dir", scored, "--output", tmp_path / "out", "--no-report"))
    assert line.startswith(f"{ERROR_PREFIX}cannot write {scored / 'select'}{os.sep}")
    assert line.endswith("/output/data-00000-of-00001.arrow: No space left on device")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-rejected").exists()
    assert not list((scored / "select").rglob(".data-*"))  # no temporary file
    assert not (scored / ".lock").exists() and not (tmp_path / "out.lock").exists()
    monkeypatch.undo()
    code, _, stderr = invoke("select", "--run-dir", scored, "--output", tmp_path / "out", "--no-report", "--quiet")
    assert code == 0, stderr  # room again: the same command finishes
    assert (tmp_path / "out" / MARKER).exists() and (tmp_path / "out-rejected" / MARKER).exists()
