"""Real faults on a real process: `toss-filter filter` (a subprocess, tiny models, 40 rows, 10 shards) killed with
SIGKILL at seeded random moments across the run, several kills in a row on one run directory, then the same
command again; and SIGTERM / SIGINT, which exit 130 with one line and keep the completed shards.

Each kill aims at a phase: while tokenizing (the first token shard has appeared), while loading the models or
scoring (after the n-th score file), selecting (the decide passes, once the score step wrote run.json), writing
(the first staged output shard of this attempt), finishing (the output has been renamed into place: the rejected
rows, the sidecar and stats.json come next), or at a random time. Where it landed is read back from the run
directory. After every kill no output may look finished unless it is complete and equal to the uninterrupted
reference; after the last kill on a run directory the same command must finish and give the reference's bytes
(output, rejected rows, sidecar, token and score shards) and leave no temporary (dot-named) file anywhere.

TOSS_FILTER_FAULT_KILLS (default 8) sets the number of kills, TOSS_FILTER_FAULT_SEED (default 0) their seed;
`pytest -s` shows the summary line.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO, chat, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset
from toss_filter.data.write import rejected_path

ROWS = [chat(f"Question {i}: " + "why? " * (i % 5), f"Answer {i}. " + "because " * (i % 9 + 1)) for i in range(40)]
KILLS = int(os.environ.get("TOSS_FILTER_FAULT_KILLS", "8"))
SEED = int(os.environ.get("TOSS_FILTER_FAULT_SEED", "0"))
KILLS_PER_RUN_DIR = 4
TIMEOUT_S = 300
ENV = os.environ | {"PYTHONPATH": str(REPO)}
INTERRUPTED = "toss-filter: interrupted; completed shards are kept, re-run to resume"
STALE_LOCK = re.compile(r"toss-filter: taking over the stale lock .* of a process that is gone .*")
LOCKS = re.compile(r"^(\.lock(-slice-\d+-of-\d+)?|.*\.lock)$")  # toss_filter.lock: RUN_DIR/.lock, OUTPUT.lock

PHASES = ("startup", "tokenize", "score", "select", "write", "finish", "done")
AIMS = ("tokenize", "score", "select", "write", "finish", "score", "random")  # cycled, then shuffled
RANK = {"tokenize": 0, "score": 1, "select": 2, "write": 3, "finish": 4}


def file_digests(root: Path, *parts: str) -> dict[str, str]:
    """sha256 of every shard file under root/parts, by relative path (as tests/steps/test_score.py; temporary
    files are checked on their own)."""
    base = root.joinpath(*parts)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def output_bytes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


class Paths:
    """One run's places: ROOT/run (the run directory), ROOT/out, ROOT/out-rejected, ROOT/run/token_scores."""

    def __init__(self, root: Path, score_files: int = 0):
        self.root, self.run_dir, self.out = root, root / "run", root / "out"
        self.expected_score_files = score_files  # of a finished score step (the reference's count)
        self.outputs = {"output": self.out, "rejected": rejected_path(self.out),
                        "token_scores": self.run_dir / "token_scores"}

    def command(self, data: Path, models: dict[str, Path]) -> list[str]:
        return [sys.executable, "-m", "toss_filter.cli", "filter", str(data), "--safety-model",
                str(models["safety"]), "--utility-model", str(models["utility"]), "-o", str(self.out),
                "--run-dir", str(self.run_dir), "--shard-rows", "4", "--device", "cpu", "--no-report", "-q"]

    def token_shards(self) -> int:
        return len(list(self.run_dir.glob("tokens/*/shard-*.arrow")))

    def tokenized(self) -> bool:
        return any(self.run_dir.glob("tokens/*/manifest.json"))

    def score_files(self) -> int:
        return len(list(self.run_dir.glob("scores/*/*/shard-*.arrow")))

    def staged_since(self, since_ns: int) -> bool:
        return any(fresh(p, since_ns) for p in self.run_dir.glob("select/*/*/data-*.arrow"))

    def temporary_files(self) -> list[str]:
        """Dot-named files and directories (temporary files, staging, RUN_DIR/.lock) and OUTPUT.lock."""
        return sorted(str(p.relative_to(self.root)) for p in [*self.root.rglob(".*"), *self.root.glob("*.lock")])

    def temporary_files_but_locks(self) -> list[str]:
        return [name for name in self.temporary_files() if not LOCKS.match(Path(name).name)]

    def snapshot(self) -> dict[str, dict[str, str]]:
        return {**{name: output_bytes(path) for name, path in self.outputs.items()},
                "tokens": file_digests(self.run_dir, "tokens"), "scores": file_digests(self.run_dir, "scores")}


def fresh(path: Path, since_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= since_ns
    except OSError:  # not there (yet), or moved meanwhile
        return False


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("fault-data") / "data.jsonl", ROWS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, tiny_models) -> dict:
    """The uninterrupted run's bytes (in-process: the same bytes as the command, tests/steps/test_score.py)."""
    paths = Paths(tmp_path_factory.mktemp("fault-reference"))
    filter_dataset(ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]),
                               str(paths.run_dir), shard_rows=4, device="cpu"),
                   SelectConfig(str(paths.run_dir), str(paths.out)), show_progress=False)
    return paths.snapshot() | {"score_files": paths.score_files()}


def landed(paths: Paths, since_ns: int) -> str:
    """The phase a dead attempt (started at `since_ns`) was in, read from what it left."""
    if not paths.token_shards():
        return "startup"
    if not paths.tokenized():
        return "tokenize"
    if paths.score_files() < paths.expected_score_files:
        return "score"
    if fresh(paths.out / "state.json", since_ns):
        return "done" if fresh(paths.run_dir / "stats.json", since_ns) else "finish"
    return "write" if paths.staged_since(since_ns) else "select"


def aim(target: str, paths: Paths, rng: random.Random, since_ns: int,
        estimate_s: float) -> tuple[str, Callable[[], bool], float]:
    """(the aim, a condition, a delay): SIGKILL `delay` seconds after `condition()` first holds. An aim the run
    directory is already past (tokenize once tokenized, score once scored) becomes a random one."""
    expected, scored = paths.expected_score_files, paths.score_files()
    if target == "tokenize" and not paths.tokenized():
        return target, lambda: paths.token_shards() > 0, rng.uniform(0, 0.015)
    if target == "score" and scored < expected:
        n = rng.randrange(expected - scored)
        if n == 0:  # from the manifest on: the models loading, or the first unit
            return target, paths.tokenized, rng.uniform(0, 3.0)
        return target, lambda: paths.score_files() >= scored + n, rng.uniform(0, 0.2)
    if target == "select":  # the score step writes run.json last
        return target, lambda: fresh(paths.run_dir / "run.json", since_ns), rng.uniform(0, 0.08)
    if target == "write":
        return target, lambda: paths.staged_since(since_ns), rng.uniform(0, 0.01)
    if target == "finish":
        return target, lambda: fresh(paths.out / "state.json", since_ns), rng.uniform(0, 0.003)
    return "random", lambda: True, rng.uniform(0, estimate_s)


def wait_until(process: subprocess.Popen, condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` (every 2 ms) while `process` runs; True once it holds, False if the process ended first."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        try:
            if condition():
                return True
        except OSError:  # a file moved between listing and reading
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no kill point within {timeout_s} s")
        time.sleep(0.002)
    return False


def _interruptible() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then rightly leaves Ctrl-C ignored: a suite run
    # in the background would see SIGINT do nothing. The run under test is a foreground command, as a user's is.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as stderr:
        return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_interruptible)


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_nothing_half_finished(paths: Paths, reference: dict, when: str) -> None:
    """Every output that exists is complete (renamed into place whole) and is the reference's bytes."""
    for name, path in paths.outputs.items():
        if path.exists():
            assert output_bytes(path) == reference[name], f"{when}: {name} ({path}) looks finished but is not"


def assert_reference(paths: Paths, reference: dict, when: str) -> list[str]:
    """A finished run directory: the reference's bytes everywhere, no staging left; returns the temporary files
    left (the caller asserts there are none once every run directory has been tried)."""
    snapshot = paths.snapshot()
    for name in ("output", "rejected", "token_scores", "tokens", "scores"):
        assert snapshot[name] == reference[name], f"{when}: {name} differs from the uninterrupted run"
    assert not list((paths.run_dir / "select").iterdir()), f"{when}: a staging directory is left"
    return paths.temporary_files()


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_at_random_moments_resumes_byte_identical(tmp_path, data, tiny_models, reference):
    """KILLS SIGKILLs, KILLS_PER_RUN_DIR in a row on each run directory, aimed across the phases; each run
    directory is then finished by the same command and compared byte for byte with the uninterrupted run."""
    rng = random.Random(SEED)
    aims = [AIMS[i % len(AIMS)] for i in range(KILLS)]
    rng.shuffle(aims)
    campaigns = [sorted(aims[i:i + KILLS_PER_RUN_DIR], key=lambda a: RANK.get(a, rng.uniform(0, 4)))
                 for i in range(0, KILLS, KILLS_PER_RUN_DIR)]
    phases: Counter[str] = Counter()
    aimed: Counter[str] = Counter()
    left_by_kill: Counter[str] = Counter()  # phase -> kills that left a temporary file (not a lock) behind
    left_after: dict[str, list[str]] = {}  # run dir -> temporary files still there after the finishing re-run
    completed = 0
    estimate_s = 12.0  # the length of a whole run, for random kills; updated from the attempts
    started_test = time.monotonic()
    for number, targets in enumerate(campaigns):
        paths = Paths(tmp_path / f"run-dir-{number}", reference["score_files"])
        command = paths.command(data, tiny_models)
        for attempt, target in enumerate(targets):
            since_ns = time.time_ns()
            target, condition, delay = aim(target, paths, rng, since_ns, estimate_s)
            aimed[target] += 1
            started = time.monotonic()
            process = start(command, paths.root / "logs" / f"attempt-{attempt}.txt")
            try:
                if wait_until(process, condition, TIMEOUT_S):
                    time.sleep(delay)
                    process.kill()  # SIGKILL (a no-op once it has exited)
            finally:
                code = finish(process)
            elapsed = time.monotonic() - started
            when = f"run dir {number}, kill {attempt} (aimed at {target})"
            if code == 0:  # it finished before the kill point
                completed += 1
                estimate_s = elapsed
                if left := assert_reference(paths, reference, when + ", completed first"):
                    left_after[f"{paths.root.name} attempt {attempt}"] = left
                continue
            assert code == -signal.SIGKILL, (when, code, (paths.root / "logs" / f"attempt-{attempt}.txt").read_text())
            phase = landed(paths, since_ns)
            phases[phase] += 1
            if PHASES.index(phase) >= PHASES.index("score"):
                estimate_s = max(estimate_s, elapsed)
            left_by_kill[phase] += bool(paths.temporary_files_but_locks())
            assert_nothing_half_finished(paths, reference, f"{when}, landed in {phase}")
            if phase in ("finish", "done"):
                assert (paths.out / "state.json").exists(), when
        process = start(command, paths.root / "logs" / "final.txt")
        assert finish(process) == 0, (paths.root / "logs" / "final.txt").read_text()
        stderr = (paths.root / "logs" / "final.txt").read_text().splitlines()
        assert all(STALE_LOCK.fullmatch(line) for line in stderr), stderr  # a SIGKILL leaves its locks behind
        if left := assert_reference(paths, reference, f"run dir {number}, after the re-run"):
            left_after[paths.root.name] = left
    kills = sum(phases.values())
    print(f"\nfault kills: {KILLS} kill points tried over {len(campaigns)} run dirs (seed {SEED}), {kills} killed, "
          f"{completed} finished first; landed in: "
          + ", ".join(f"{phase} {phases[phase]}" for phase in PHASES if phases[phase])
          + "; aimed at: " + ", ".join(f"{name} {count}" for name, count in sorted(aimed.items()))
          + "; every output byte-identical; kills that left temporary files (not locks): "
          + (", ".join(f"{phase} {n}" for phase, n in left_by_kill.items() if n) or "none")
          + f"; run dirs with temporary files after the re-run: {len(left_after)} "
          f"({time.monotonic() - started_test:.0f} s)")
    assert kills + completed == KILLS
    assert not left_after, f"temporary files left after a finished re-run: {left_after}"


def started_run(paths: Paths, data: Path, models: dict[str, Path]) -> tuple[subprocess.Popen, list[Path]]:
    """The command, once its first score file exists; returns it and the score files then complete."""
    process = start(paths.command(data, models), paths.root / "logs" / "signalled.txt")
    try:
        assert wait_until(process, lambda: paths.score_files() > 0, TIMEOUT_S), \
            (paths.root / "logs" / "signalled.txt").read_text()
    except BaseException:
        process.kill()
        finish(process)
        raise
    return process, sorted(paths.run_dir.glob("scores/*/*/shard-*.arrow"))


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_exit_130_and_keep_the_completed_shards(tmp_path, data, tiny_models, reference, signum):
    """A scheduler's stop (SIGTERM) or Ctrl-C (SIGINT) mid-scoring: exit 130, one line on stderr, the finished
    shards kept, no temporary file and no output; the same command then resumes to the reference's bytes."""
    paths = Paths(tmp_path, reference["score_files"])
    process, scored = started_run(paths, data, tiny_models)
    process.send_signal(signum)
    code = finish(process)
    stderr = (paths.root / "logs" / "signalled.txt").read_text()
    assert code == 130, (code, stderr)
    assert stderr.splitlines() == [INTERRUPTED], stderr
    assert all(path.exists() for path in scored) and paths.tokenized(), "the completed shards are kept"
    assert not paths.temporary_files(), paths.temporary_files()  # nor a lock: released on the way out
    assert not any(path.exists() for path in paths.outputs.values()), "no output that looks finished"
    done = subprocess.run(paths.command(data, tiny_models), env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no stale lock to take over
    assert_reference(paths, reference, "after the re-run")


COMMIT_STEPS = ("begin", "old stats removed", "rejected", "sidecar", "output", "staging removed", "stats written",
                "end")
KILL_AT_COMMIT_STEP = """
import os, signal, sys
import toss_filter.run
from toss_filter import SelectConfig, select_dataset

def kill(step):
    if step == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

toss_filter.run._after_commit_step = kill
select_dataset(SelectConfig(sys.argv[1], sys.argv[2], ratio=0.9), show_progress=False)
"""


def output_set(run_dir: Path, out: Path) -> dict:
    """What a user sees of an output set: the rows of OUTPUT and OUTPUT-rejected, and stats.json."""
    from datasets import load_from_disk

    from toss_filter.run import RunDir

    stats = RunDir(run_dir).read_json("stats.json") if (run_dir / "stats.json").exists() else None
    return {"rows_out": load_from_disk(str(out)).num_rows, "rejected": load_from_disk(str(rejected_path(out))).num_rows,
            "stats": stats}


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_select_killed_at_any_commit_step_never_leaves_a_finished_looking_mixed_set(tmp_path, data, tiny_models,
                                                                                       step):
    """`filter --ratio 0.2` finished, then `select --ratio 0.9` SIGKILLed after each step of putting its set in place:
    either the set is the old run's or the new run's whole, or it does not look finished; the same command then
    completes it."""
    from toss_filter.errors import ConfigError
    from toss_filter.run import RunDir, check_output_set

    paths = Paths(tmp_path)
    filter_dataset(ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), str(paths.run_dir),
                               shard_rows=4, device="cpu"), SelectConfig(str(paths.run_dir), str(paths.out)),
                   show_progress=False)
    old = output_set(paths.run_dir, paths.out)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_COMMIT_STEP, str(paths.run_dir), str(paths.out), step],
                            env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = RunDir(paths.run_dir)
    if step == "end":
        stats = check_output_set(run)
        assert stats["selection"]["ratio"] == 0.9
    else:
        with pytest.raises(ConfigError, match="interrupted while putting its output in place"):
            check_output_set(run)
    subprocess.run([sys.executable, "-c", KILL_AT_COMMIT_STEP, str(paths.run_dir), str(paths.out), "never"],
                   env=ENV, check=True, capture_output=True, timeout=TIMEOUT_S)
    new = output_set(paths.run_dir, paths.out)
    stats = check_output_set(run)
    assert stats["selection"]["ratio"] == 0.9 and stats["commit"]
    assert (new["rows_out"], new["rejected"]) == (stats["rows_out"], stats["rows_rejected"])
    assert new["rows_out"] < old["rows_out"] == old["stats"]["rows_out"]
