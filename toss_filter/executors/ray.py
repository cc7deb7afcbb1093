"""The Ray executor: the same units and workers as the local executor, placed on a Ray cluster (or a local Ray).

    with RayExecutor(ExecutorConfig(executor="ray", replicas=4, gpus_per_replica=1)) as executor:
        score_step(config, executor)

A pool (`run_pool`) is Ray Data over unit descriptors: the driver makes a dataset of the units (small picklable
values, never data), one block per unit, and maps it with one actor per replica (`replicas`, each with
`cpus_per_replica` CPUs, which are also its torch threads, and `gpus_per_replica` GPUs). Each actor builds one
worker with `make_worker(placement)` and calls it on whole units: the code of the local path. For scoring, a worker
reads its token shard from the run directory and writes the score files there, so no token crosses Ray: a unit's
output row is the unit, its token count, seconds and where it ran.

- The pool's `shared_dir` (the run directory) must be on a filesystem every worker sees. The driver writes a probe
  file with a random token into it (`.ray-probe-<token>`, removed at the end); every actor checks it before it
  builds its worker and otherwise fails with a `ConfigError` naming its node and the path.
- A replica that dies (killed, out of memory, a lost node) is restarted and its unit retried, up to `RETRIES`
  times each (`max_restarts`, `max_task_retries`). An exception in a worker is not retried: it comes back as the
  unit's row, and the driver raises it as a one-line `TossError` (a `ConfigError` stays a `ConfigError`) naming the
  shard, the role and the node. Shard files are written atomically, so a failed or killed run leaves no
  finished-looking file, and a re-run resumes from the complete ones (a replica killed in the middle of a write
  can leave a dot-named temporary file beside the shards; it never looks finished).
- `toss-filter` (and Ray, `pip install 'toss-filter[ray]'`) must be installed on every node of a cluster.

Ray is imported here only, lazily: the local executor never needs it, and errors found on the driver (bad input,
bad options) stop the run before Ray starts. Ray starts at the first `score` or `map_shards`: it joins
`ray_address` (else `RAY_ADDRESS`, else starts a local Ray on every core), unless the caller has initialised Ray
already, whose session is then used as it is. A Ray this executor started is shut down by `close()`; one that was
running already is left running. A replica that no node can hold is refused on a local Ray this executor started,
and only warned about on a cluster (an autoscaler may add a node that fits; Ray waits for it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toss_filter.config import ExecutorConfig
from toss_filter.errors import ConfigError, TossError
from toss_filter.files import atomic_write_text
from toss_filter.executors.base import Placement, PoolTally
from toss_filter.progress import Progress

RETRIES = 2  # restarts of a dead replica, and retries of the unit it was scoring
PROBE_PREFIX = ".ray-probe-"

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"--executor ray needs Ray ({err}): pip install 'toss-filter[ray]'") from err
    return ray


def one_line(err: BaseException) -> str:
    """A worker's error as the one line the CLI prints: a TossError's message; otherwise its type and first line."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(err, TossError) else f"{type(err).__name__}: {first}".rstrip(": ")


def node_name() -> str:
    try:
        import ray.util

        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    except Exception:
        return socket.gethostname()


def write_probe(run_dir: Path) -> tuple[Path, str]:
    """A file only this run's driver wrote (a unique name, holding a random token), for workers to look for."""
    token = secrets.token_hex(16)
    path = run_dir / f"{PROBE_PREFIX}{token}"
    atomic_write_text(path, token + "\n")
    return path, token


def check_probe(path: Path, token: str) -> None:
    """Refuse to score in a run directory that is not the driver's (not mounted here, or another one)."""
    try:
        seen: str | None = path.read_text().strip()
    except FileNotFoundError:
        seen = None
    if seen != token:
        problem = "does not see" if seen is None else "reads another token from"
        raise ConfigError(f"the Ray worker on {node_name()} {problem} the driver's probe file {path}: the run "
                          "directory must be on a filesystem every node mounts (--run-dir on shared storage)")


class PoolReplica:
    """One Ray Data actor: one worker, built once, running one unit per call. Errors come back as the unit's row
    (`error`, `error_kind`), so the driver reports them in one line rather than as a Ray traceback."""

    def __init__(self, make_worker: Callable[[Placement], Any], placement: Placement, probe: tuple[str, str] | None,
                 units: list[Any]):
        import ray

        started = time.perf_counter()
        context = ray.get_runtime_context()
        self.where = {"node": node_name(), "actor": context.get_actor_id() or "",
                      "gpu_ids": ",".join(str(gpu) for gpu in ray.get_gpu_ids())}
        self.worker: Any = None
        self.units = units  # the dataset's rows carry only an index into them
        self.error: tuple[str, str] | None = None
        try:
            if probe is not None:
                check_probe(Path(probe[0]), probe[1])
            self.worker = make_worker(placement)
            getattr(self.worker, "load", lambda: None)()  # ready only once loaded: every replica takes a share
        except Exception as err:
            self.error = self._caught(err)
        self.load_s = time.perf_counter() - started

    @staticmethod
    def _caught(err: Exception) -> tuple[str, str]:
        if not isinstance(err, TossError):
            log.exception("a pool unit failed")  # the traceback, in the worker's log
        return type(err).__name__ if isinstance(err, TossError) else "other", one_line(err)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = int(batch["index"][0])
        row: dict[str, Any] = {"index": index, "tokens": 0, "seconds": 0.0, "load_s": self.load_s,
                               "started": time.time(), "describe": "", "error": "", "error_kind": "", **self.where}
        error = self.error
        if error is None:
            try:
                result = self.worker(self.units[index])
                row |= {"tokens": result["tokens"], "seconds": result["seconds"],
                        "describe": json.dumps(self.worker.describe(), default=str)}
            except Exception as err:
                error = self._caught(err)
        if error is not None:
            row["error_kind"], row["error"] = error
        return {name: np.array([value]) for name, value in row.items()}

    def __del__(self) -> None:
        if self.worker is not None:
            try:
                self.worker.close()
            except Exception:
                pass


def _apply(fn: Callable[[int], Any], shard: int) -> Any:
    return fn(shard)


class RayExecutor:
    """`executors.base.Executor` on Ray (module docstring). A context manager; `close()` shuts down a Ray it
    started."""

    name = "ray"

    def __init__(self, config: ExecutorConfig):
        self.config = config
        self.last_run: dict[str, Any] | None = None  # what `run_pool` returned last, with where each unit ran
        self._started = self._local = False
        import_ray()  # a missing Ray is a ConfigError now, before any work

    # ---- Ray
    def _ray(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            address = self.config.ray_address or os.environ.get("RAY_ADDRESS") or None
            verbose = logging.getLogger().isEnabledFor(logging.INFO)
            # ray.init installs its own SIGTERM handler (sys.exit); the command's handler turns SIGTERM into an
            # interrupt that keeps completed shards and exits 130, so it is put back.
            sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
            try:  # a local Ray (no address) uses every core of this machine
                ray.init(address=address, log_to_driver=verbose,
                         logging_level=logging.INFO if verbose else logging.WARNING)
            except ConnectionError as err:
                raise ConfigError(f"cannot reach the Ray cluster at {address}: {one_line(err)}") from err
            finally:
                if sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
            self._started, self._local = True, address is None
        return ray

    def _check_fits(self, ray: Any) -> None:
        """Ray waits forever for a replica no node can hold: refuse it on a local Ray this executor started (it
        cannot grow); on a cluster, say so, since an autoscaler may add a node that fits."""
        need = {"CPU": self.config.cpus_per_replica, "GPU": self.config.gpus_per_replica}
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        if any(all(resources.get(name, 0) >= amount for name, amount in need.items()) for resources in nodes):
            return
        have = "; ".join(sorted({f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
                                 for resources in nodes})) or "no node"
        message = (f"no node of the Ray cluster can hold one replica (--cpus-per-replica {need['CPU']}, "
                   f"--gpus-per-replica {need['GPU']:g}; the nodes have {have})")
        if self._started and self._local:
            raise ConfigError(message)
        log.warning("%s: waiting for the cluster to grow (Ctrl-C to stop)", message)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- work
    def map_shards(self, fn: Callable[[int], Any], shards: Sequence[int], description: str | None = None,
                   show_progress: bool = False) -> list[Any]:
        """`[fn(s) for s in shards]` as Ray tasks of one CPU each, results in order; a worker's `TossError` is
        raised here as itself."""
        shards = list(shards)
        if not shards:
            return []
        ray = self._ray()
        task = ray.remote(num_cpus=1, max_retries=RETRIES)(_apply)
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, shard) for shard in shards]
        try:
            with Progress(description or "", len(refs), "shards", bool(description) and show_progress) as progress:
                pending = refs
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)  # raises a task's error as soon as it comes in
                    progress.advance(len(done))
            return ray.get(refs)
        except ray.exceptions.RayError as err:
            # Only the tasks still running: cancelling one whose result is already in (the failed one, at least) can
            # race its completion inside Ray, which then aborts this process ("unexpected system state", ray 2.60).
            _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in running:
                ray.cancel(ref)
            cause = getattr(err, "cause", None)
            if isinstance(cause, TossError):
                raise cause from None
            raise TossError(f"a Ray shard task failed: {one_line(cause or err)}") from None

    def run_pool(self, make_worker: Callable[[Placement], Any], units: list[Any], *, description: str,
                 unit_name: str, show_progress: bool, shared_dir: Path | None = None) -> dict[str, Any]:
        if not units:
            return PoolTally(description, 0, unit_name, False).summary()
        ray = self._ray()
        self._check_fits(ray)
        from ray.data import DataContext

        probe = write_probe(shared_dir) if shared_dir is not None else None
        context, data_log = DataContext.get_current(), logging.getLogger("ray.data")
        saved = context.enable_progress_bars, context.print_on_execution_start, data_log.level
        context.enable_progress_bars = context.print_on_execution_start = False  # our bar, on our terms
        if not logging.getLogger().isEnabledFor(logging.INFO):
            data_log.setLevel(logging.CRITICAL)  # Ray Data's notes and tracebacks only with --verbose: we report
        placement = Placement(threads=self.config.cpus_per_replica, gpus=self.config.gpus_per_replica)
        try:
            rows = ray.data.from_items([{"index": i} for i in range(len(units))],
                                       override_num_blocks=len(units))  # one block per unit: one task per unit
            with warnings.catch_warnings():
                # max_restarts / max_task_retries have no named parameter yet: they go as `ray_remote_args`,
                # deprecated from Ray 2.60 on, and still honoured by the pinned line (<2.61)
                warnings.simplefilter("ignore", DeprecationWarning)
                done = rows.map_batches(
                    PoolReplica, fn_constructor_args=(make_worker, placement, probe and (str(probe[0]), probe[1]), units),
                    batch_size=1, compute=ray.data.ActorPoolStrategy(size=self.config.replicas),
                    num_cpus=self.config.cpus_per_replica, num_gpus=self.config.gpus_per_replica or None,
                    max_restarts=RETRIES, max_task_retries=RETRIES)
            self.last_run = self._collect(ray, done, units, description, unit_name, show_progress)
            return self.last_run
        finally:
            context.enable_progress_bars, context.print_on_execution_start, level = saved
            data_log.setLevel(level)
            if probe is not None:
                probe[0].unlink(missing_ok=True)

    def _collect(self, ray: Any, done: Any, units: list[Any], description: str, unit_name: str,
                 show_progress: bool) -> dict[str, Any]:
        pending = set(range(len(units)))
        with PoolTally(description, len(units), unit_name, show_progress) as tally:
            try:
                results = iter(done.iter_rows())
                try:
                    for row in results:
                        if row["error"]:
                            kind = ConfigError if row["error_kind"] == "ConfigError" else TossError
                            raise kind(f"{description}: {describe_unit(units[row['index']])} on {row['node']} "
                                       f"failed: {row['error']}")
                        pending.discard(int(row["index"]))
                        tally.done({"tokens": int(row["tokens"]), "seconds": float(row["seconds"])},
                                   float(row["started"]), row["actor"], float(row["load_s"]),
                                   json.loads(row["describe"]), {"node": row["node"], "gpu_ids": row["gpu_ids"]})
                finally:  # stops the streaming execution, and its replicas, when we stop early
                    getattr(results, "close", lambda: None)()
            except ray.exceptions.RayError as err:
                listed = ", ".join(describe_unit(units[i]) for i in sorted(pending)[:10])
                raise TossError(f"Ray gave up ({one_line(err)}; a dead replica, from running out of memory, a crash "
                                f"or a lost node, is restarted {RETRIES} times: see the Ray worker logs); "
                                f"{len(pending)} unit(s) left undone: {listed}{' ...' if len(pending) > 10 else ''}: "
                                "re-run to resume") from None
        return tally.summary()


def describe_unit(unit: Any) -> str:
    """A unit as an error names it: its own `describe()` if it has one, else its repr."""
    return unit.describe() if hasattr(unit, "describe") else repr(unit)
