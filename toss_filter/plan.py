"""The shard plan: input rows are cut into fixed, contiguous shards of `shard_rows` rows, and every step (tokenize,
score, select, write) works shard by shard.

Contract:
- shard s holds the input rows `[s × shard_rows, (s + 1) × shard_rows)`, the last one possibly shorter;
- a shard file is a pure function of the data and the config: the same inputs give the same bytes, whichever
  process, machine or executor writes it;
- a shard file exists only once complete (`write_table` writes a temporary file beside it and renames it), so a
  re-run redoes exactly the shards that are missing, and a killed run leaves nothing that looks finished.

Shard files are Arrow IPC files, read memory-mapped: a shard costs no copy to read, and list offsets stay local
to the shard while every count across shards is an int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from toss_filter.errors import ConfigError
from toss_filter.files import atomic_file

SHARD_NAME = "shard-{:05d}.arrow"


@dataclass(frozen=True)
class ShardPlan:
    """`rows` input rows in shards of `shard_rows`."""

    shard_rows: int
    rows: int

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def span(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.rows))

    def slice(self, index: int, count: int) -> list[int]:
        """The shards of slice `index` of `count` (`--shard-slice I/N`): every N-th shard from the I-th, so that
        slices of a length-sorted or topic-sorted input still get a fair share of the work."""
        return list(range(index, self.shards, count))


def parse_slice(text: str | None) -> tuple[int, int]:
    """`"I/N"` → (I, N), with 0 <= I < N; None → (0, 1), the whole plan."""
    if text is None:
        return 0, 1
    index, sep, count = text.partition("/")
    try:
        parsed = int(index), int(count)
    except ValueError:
        parsed = None
    if not sep or parsed is None or not 0 <= parsed[0] < parsed[1]:
        raise ConfigError(f"--shard-slice expects I/N with 0 <= I < N, e.g. 0/4; got {text!r}")
    return parsed


def shard_path(directory: Path, shard: int) -> Path:
    return directory / SHARD_NAME.format(shard)


def write_table(path: Path, table: pa.Table) -> None:
    """Write `table` as an Arrow IPC file at `path`, complete or not at all (a full disk or a read-only target is
    a `WriteError` naming `path`, and leaves no temporary file)."""
    with atomic_file(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_table(path: Path) -> pa.Table:
    """A shard file, memory-mapped (no copy until a column is converted)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
