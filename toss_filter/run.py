"""The run directory: every file the steps write and read, its schema, the one reader of its shards, and how the
output set is committed, so each step can run on its own, resume after a kill, and be re-run with other settings
without redoing the steps before it.

    RUN_DIR/
      run.json                    the run's state: the shard plan, the tokens and score keys, models, timings
      config.json                 the resolved config of the last command, with package versions
      tokens/<tokens_key>/        shard-00000.arrow ...   TOKENS_SCHEMA, one row per valid input row
                                  invalid-00000.arrow ... INVALID_SCHEMA, the shard's rows that --skip-invalid left out
                                  manifest.json           once every shard is written (steps/tokenize.py)
      scores/<score_key>/<role>/  shard-00000.arrow ...   SCORES_SCHEMA, one directory per reference role
      scores/<score_key>/key.json what the score key was made of (the tokens digest, the models)
      select/<select_key>/        output/, rejected/, token_scores/: shard by shard until they are complete
                                  (the output: data/write.training_schema; REJECTED_SCHEMA; SIDECAR_SCHEMA)
      token_scores/               the sidecar `save_to_disk` dataset, SIDECAR_SCHEMA (written by `select`)
      stats.json                  counts, masked shares and timings of the last run; written last (below)
      commit.json                 only while `select` puts an output set in place (below)

Token and score shards of one shard hold the same rows, in the same order, with the same list lengths: `read`
checks it for every file it joins (`check_aligned`), so a step, TOSS-Pro, the report and the Hub card read shards
one way. A token shard's `labels` are the response tokens to SCORE (the response contract of data/tokenize.py);
the output's `labels` are the tokens to TRAIN on, after masking.

The output set (OUTPUT, OUTPUT-rejected, the sidecar and stats.json) is committed as one unit
(`commit_output_set`): commit.json is written and the old stats.json removed before anything moves, and stats.json
(naming the set's select key as `commit`) is written after everything has, then commit.json goes. A set is finished
only with stats.json and without commit.json (`check_output_set`), so a run killed at any step leaves a set that
does not look finished, whichever of its members already moved, and re-running the command completes it.

`tokens_key` hashes everything that changes the tokens (the input's identity, the columns, the template, the
tokenizer, the maximum length, the shard plan); `score_key` hashes the tokens' digest (their content, shard by
shard) and everything that changes a score (models by content, dtype, backend). How or where a shard was scored
(the executor, the replicas, a shard slice) is provenance in run.json, never part of a key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from toss_filter.arrow import list_column
from toss_filter.data.write import training_schema
from toss_filter.errors import ConfigError
from toss_filter.files import atomic_write_text
from toss_filter.plan import ShardPlan, read_table, shard_path
from toss_filter.score.base import REFERENCE_ROLES

TOKENS_SCHEMA = pa.schema([
    ("row", pa.int64()),  # the input row's position
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),  # the token id where the token is scored, IGNORE_INDEX elsewhere
    ("truncated", pa.bool_()),  # --max-length cut the row
])
# Only in runs with --no-score-reasoning: positions trained but not scored (the reasoning), per row.
UNSCORED_FIELD = pa.field("unscored", pa.list_(pa.int32()))
INVALID_SCHEMA = pa.schema([("row", pa.int64()), ("field", pa.string()), ("problem", pa.string())])
SCORES_SCHEMA = pa.schema([("row", pa.int64()), ("nll", pa.list_(pa.float32()))])  # NaN where not scored
SIDECAR_SCHEMA = pa.schema([("row", pa.int64()), ("score", pa.list_(pa.float32())), ("unsafe", pa.list_(pa.bool_()))])
REJECTED_SCHEMA = training_schema().append(pa.field("row", pa.int64())).append(pa.field("reason", pa.string()))


COMMIT_FILE = "commit.json"


def _after_commit_step(step: str) -> None:
    """Called after each step of `commit_output_set`; the tests kill the process here, at every step in turn."""


def commit_output_set(run: RunDir, commit: str, moves: list[tuple[str, Callable[[], Any]]],
                      stats: Callable[[], dict[str, Any]]) -> None:
    """Put an output set in place as one unit (module docstring): `moves` are (name, callable) that each move one
    member into place; `stats()`, called once they have, becomes stats.json, with `commit` (the set's select key)."""
    run.write_json(COMMIT_FILE, {"commit": commit, "moves": [name for name, _ in moves]})
    _after_commit_step("begin")
    (run.path / "stats.json").unlink(missing_ok=True)
    _after_commit_step("old stats removed")
    for name, move in moves:
        move()
        _after_commit_step(name)
    run.write_json("stats.json", stats() | {"commit": commit})
    _after_commit_step("stats written")
    (run.path / COMMIT_FILE).unlink()
    _after_commit_step("end")


def check_output_set(run: RunDir) -> dict[str, Any]:
    """The stats.json of a finished output set; a ConfigError when `select` has not finished one in `run` (never
    run, or killed while it put the set in place: re-running it completes the set)."""
    if (run.path / COMMIT_FILE).exists():
        raise ConfigError(f"{run.path}: a `select` was interrupted while putting its output in place, so the output, "
                          "the rejected rows and stats.json may come from different runs: re-run the same command")
    if not (run.path / "stats.json").exists():
        raise ConfigError(f"{run.path} holds no stats.json: run `toss-filter select` (or `filter`) into it first")
    return run.read_json("stats.json")


def default_run_dir(output: Path) -> Path:
    """The run directory of an output when none is named: `OUTPUT-run`, beside it."""
    return output.with_name(output.name + "-run")


def invalid_path(token_shard: Path) -> Path:
    """Where the invalid rows of a token shard are recorded: `invalid-NNNNN.arrow` beside `shard-NNNNN.arrow`."""
    return token_shard.with_name(token_shard.name.replace("shard-", "invalid-", 1))


def read_invalid(token_shard: Path) -> pa.Table:
    """The invalid rows of a token shard (`INVALID_SCHEMA`, by row), empty if it has none."""
    path = invalid_path(token_shard)
    return read_table(path) if path.exists() else INVALID_SCHEMA.empty_table()


@dataclass
class TokenShard:
    """One token shard as flat arrays: row i of the shard is `[offsets[i]:offsets[i + 1]]` of each."""

    row_ids: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray  # scored response positions (TOKENS_SCHEMA)
    offsets: np.ndarray
    truncated: np.ndarray
    unscored: np.ndarray  # flat token indices trained but not scored (--no-score-reasoning), usually empty
    invalid: pa.Table  # INVALID_SCHEMA: the shard's input rows that are not here

    @classmethod
    def of(cls, table: pa.Table, invalid: pa.Table) -> TokenShard:
        ids, offsets = list_column(table, "input_ids")
        labels, _ = list_column(table, "labels")
        unscored = np.zeros(0, np.int64)
        if "unscored" in table.column_names:
            positions, position_offsets = list_column(table, "unscored")
            unscored = positions + np.repeat(offsets[:-1], np.diff(position_offsets))
        return cls(table.column("row").to_numpy(), ids, labels, offsets,
                   table.column("truncated").to_numpy(zero_copy_only=False), unscored, invalid)

    @cached_property
    def token_row(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.row_ids)), np.diff(self.offsets))

    def rows(self, indices: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, labels) of the rows `indices`: what a scorer takes."""
        return [(self.input_ids[self.offsets[i]:self.offsets[i + 1]], self.labels[self.offsets[i]:self.offsets[i + 1]])
                for i in indices]

    def check_aligned(self, table: pa.Table, column: str, what: str) -> np.ndarray:
        """`table`'s list column `column`, after checking that it holds this shard's rows with this shard's row
        lengths; a mismatch (a file of another run, or a bug) is a ConfigError naming `what`."""
        values, offsets = list_column(table, column)
        if not (np.array_equal(table.column("row").to_numpy(), self.row_ids) and np.array_equal(offsets, self.offsets)):
            raise ConfigError(f"{what} does not hold the rows of its token shard: re-run the step that wrote it")
        return values


@dataclass
class ScoredShard(TokenShard):
    """A token shard with both references' per-token NLL (NaN where not scored)."""

    nll_safety: np.ndarray
    nll_utility: np.ndarray

    @property
    def score(self) -> np.ndarray:
        """S(t) = nll_u(t) − nll_s(t), float32."""
        return (self.nll_utility - self.nll_safety).astype(np.float32)


@dataclass
class SidecarShard(TokenShard):
    """A token shard with what `select` decided: each token's score (NaN outside the scored response) and mask."""

    score: np.ndarray
    unsafe: np.ndarray


@dataclass(frozen=True)
class ShardFiles:
    """Which tokens and scores of a run to read, shard by shard: picklable, so executors send it to workers."""

    run_dir: str
    tokens_key: str
    score_key: str | None = None

    @classmethod
    def current(cls, run: RunDir) -> ShardFiles:
        """The tokens and scores of the run's last `score` (or TOSS-Pro round)."""
        state = run.read_json("run.json")
        return cls(str(run.path), state["tokens_key"], state.get("score_key"))

    def tokens(self, shard: int) -> TokenShard:
        path = RunDir(self.run_dir).token_shard(self.tokens_key, shard)
        return TokenShard.of(read_table(path), read_invalid(path))

    def scored(self, shard: int) -> ScoredShard:
        tokens, run = self.tokens(shard), RunDir(self.run_dir)
        nll = {role: tokens.check_aligned(read_table(path := run.score_shard(self.score_key, role, shard)), "nll",
                                          str(path)) for role in REFERENCE_ROLES}
        return ScoredShard(**vars(tokens), nll_safety=nll["safety"], nll_utility=nll["utility"])

    def sidecar(self, shard: int) -> SidecarShard:
        """Shard `shard` of the run's finished sidecar (RUN_DIR/token_scores) with its token shard."""
        tokens, paths = self.tokens(shard), RunDir(self.run_dir).sidecar_files()
        table = pa.ipc.open_stream(pa.memory_map(str(paths[shard]))).read_all()
        return SidecarShard(**vars(tokens), score=tokens.check_aligned(table, "score", str(paths[shard])),
                            unsafe=tokens.check_aligned(table, "unsafe", str(paths[shard])).astype(bool))


class RunDir:
    """The paths of a run directory (module docstring) and its JSON state."""

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
        """Every token shard of the current run, as one memory-mapped table (for checks and benchmarks; the steps,
        the report and the card read shard by shard)."""
        state = self.read_json("run.json")
        return pa.concat_tables(self.read_token_shard(state["tokens_key"], s) for s in range(state["shards"]))

    # ---- scores
    def scores_dir(self, key: str) -> Path:
        return self.path / "scores" / key

    def score_shard(self, key: str, role: str, shard: int) -> Path:
        return shard_path(self.scores_dir(key) / role, shard)

    def missing_scores(self, key: str, shards: list[int]) -> list[tuple[str, int]]:
        return [(role, s) for role in REFERENCE_ROLES for s in shards if not self.score_shard(key, role, s).exists()]

    # ---- the sidecar
    def sidecar_files(self) -> list[Path]:
        """The data files of RUN_DIR/token_scores, one per shard, in shard order; a ConfigError when there is none
        or it does not have one file per token shard of the run."""
        sidecar = self.path / "token_scores"
        if not (sidecar / "state.json").exists():
            raise ConfigError(f"{self.path}: no token_scores/; run `toss-filter select` (or `filter`) on it first")
        files = [sidecar / f["filename"] for f in json.loads((sidecar / "state.json").read_text())["_data_files"]]
        if len(files) != self.read_json("run.json")["shards"]:
            raise ConfigError(f"{self.path}: token_scores/ does not match the token shards: re-run `toss-filter "
                              "select`")
        return files

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

