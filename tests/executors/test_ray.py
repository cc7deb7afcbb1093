"""The Ray executor on a real local Ray (2 CPUs, 2 logical GPUs), with the tiny models: the same shard bytes as the
local executor, a replica killed mid-run, logical GPUs, `map_shards`, the run-directory probe, a worker's error."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from functools import partial
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import write_jsonl  # noqa: E402
from toss_filter.config import ExecutorConfig, ScoreConfig  # noqa: E402
from toss_filter.errors import ConfigError  # noqa: E402
from toss_filter.executors import make_executor  # noqa: E402
from toss_filter.executors import ray as ray_executor  # noqa: E402
from toss_filter.executors.ray import RayExecutor  # noqa: E402
from toss_filter.executors.base import Placement  # noqa: E402
from toss_filter.steps import score as score_module  # noqa: E402
from toss_filter.steps.score import ShardScorer, absolute_paths, placed_config, score_step  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    """One Ray for the module (start-up takes seconds). Its workers cannot import this test module, so what it
    sends them (the crashing scorer, the map_shards functions) travels by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * (i % 7 + 1)},
                          {"role": "assistant", "content": f"answer {i} " * (i % 11 + 2)}]} for i in range(57)]
    return write_jsonl(tmp_path_factory.mktemp("ray-data") / "data.jsonl", rows)


def config(data: Path, models: dict, run_dir: Path, **overrides) -> ScoreConfig:
    return ScoreConfig(str(data), str(models["safety"]), str(models["utility"]), run_dir=str(run_dir), shard_rows=10,
                       device="cpu", **overrides)


def shard_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under tokens/ and scores/, by relative path (temporary files included)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in ("tokens", "scores") for p in sorted((run_dir / top).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data, tiny_models):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    # one torch thread, as each replica has (--cpus-per-replica 1): the same kernels, so the same bits
    summary = score_step(config(data, tiny_models, run_dir), make_executor(ExecutorConfig(threads=1)),
                         show_progress=False)
    assert summary["shards"] == 6
    return summary, shard_digests(run_dir)


def assert_same_as_local(run_dir: Path, summary: dict, local_run) -> None:
    local_summary, local_digests = local_run
    assert summary["score_key"] == local_summary["score_key"]
    assert shard_digests(run_dir) == local_digests  # the same files, byte for byte: no extra, temporary or missing
    assert not list(run_dir.glob(".ray-probe-*"))


def ray_score(data, models, run_dir, executor_config):
    with RayExecutor(executor_config) as executor:
        summary = score_step(config(data, models, run_dir), executor, show_progress=False)
        return summary, executor.last_run


@pytest.mark.ray
@pytest.mark.slow
def test_ray_matches_local(ray_session, data, tiny_models, local_run, tmp_path):
    summary, last = ray_score(data, tiny_models, tmp_path / "run", ExecutorConfig(executor="ray", replicas=2))
    assert_same_as_local(tmp_path / "run", summary, local_run)
    assert summary["provenance"]["executor"] == "ray" and summary["scorer"]["backend"] == "torch"
    assert sum(worker["units"] for worker in last["workers"]) == 12  # 6 shards × 2 roles
    assert ray.is_initialized()  # a Ray the executor did not start stays up


class CrashOnceScorer(ShardScorer):
    """Kills its worker process on the first unit of the run, once (the marker file beside the run directory)."""

    def __call__(self, unit, on_progress=None):
        marker = Path(self.job.config.run_dir).parent / "crashed"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().__call__(unit, on_progress)
        os._exit(1)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_replica_is_restarted(ray_session, data, tiny_models, local_run, tmp_path, monkeypatch):
    monkeypatch.setattr(score_module, "ShardScorer", CrashOnceScorer)  # the workers the pool builds
    summary, last = ray_score(data, tiny_models, tmp_path / "run", ExecutorConfig(executor="ray", replicas=2))
    assert (tmp_path / "crashed").exists()
    assert_same_as_local(tmp_path / "run", summary, local_run)
    assert sum(worker["units"] for worker in last["workers"]) == 12  # every unit once, the retried one too


@pytest.mark.ray
@pytest.mark.slow
def test_logical_gpus(ray_session, data, tiny_models, local_run, tmp_path):
    summary, last = ray_score(data, tiny_models, tmp_path / "run",
                              ExecutorConfig(executor="ray", replicas=2, gpus_per_replica=1))
    replicas = last["workers"]
    assert len({replica["worker"] for replica in replicas}) == 2
    assert sorted(replica["gpu_ids"] for replica in replicas) == ["0", "1"]
    assert summary["scorer"]["device"] == "cpu"  # a logical GPU is not a real one: torch stays on the CPU
    assert_same_as_local(tmp_path / "run", summary, local_run)


def scaled(factor: int, shard: int) -> tuple[int, int, int]:
    return shard, factor * shard, os.getpid()


def refuse(shard: int) -> None:
    raise ConfigError(f"shard {shard} is unusable")


@pytest.mark.ray
@pytest.mark.slow
def test_map_shards(ray_session):
    executor = RayExecutor(ExecutorConfig(executor="ray"))
    shards = [5, 3, 9, 0, 7, 1]
    results = executor.map_shards(partial(scaled, 10), shards)
    assert [(shard, value) for shard, value, _ in results] == [(s, 10 * s) for s in shards]
    assert os.getpid() not in {pid for _, _, pid in results}  # they ran as Ray tasks
    with pytest.raises(ConfigError, match=r"^shard 2 is unusable$"):
        executor.map_shards(refuse, [2])
    assert executor.map_shards(refuse, []) == []


def wait_for_free_cpus() -> None:
    """A failed run must release its replicas (the next test needs the CPUs)."""
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"replicas left running: {ray.available_resources()}"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
def test_run_dir_the_workers_do_not_see(ray_session, data, tiny_models, tmp_path, monkeypatch):
    def unseen_probe(run_dir):  # as if the workers mounted another directory at the same path
        path, token = write_probe(run_dir)
        path.unlink()
        return path, token

    write_probe = ray_executor.write_probe
    monkeypatch.setattr(ray_executor, "write_probe", unseen_probe)
    with pytest.raises(ConfigError) as caught:
        ray_score(data, tiny_models, tmp_path / "run", ExecutorConfig(executor="ray", replicas=1))
    message = str(caught.value)
    assert "\n" not in message and "does not see the driver's probe file" in message
    assert str((tmp_path / "run").resolve()) in message and os.uname().nodename in message
    assert not list((tmp_path / "run" / "scores").rglob("*.arrow"))
    wait_for_free_cpus()


@pytest.mark.ray
@pytest.mark.slow
def test_worker_error_is_one_line(ray_session, data, tiny_models, tmp_path):
    """An adapter that does not fit its base fails when the replica loads it: the user gets the ConfigError of the
    local path, in one line, with the shard and role."""
    bad = config(data, tiny_models, tmp_path / "run", base_model=str(tiny_models["other_base"]))
    with RayExecutor(ExecutorConfig(executor="ray")) as executor, pytest.raises(ConfigError) as caught:
        score_step(bad, executor, show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and "does not fit the base model" in message
    assert re.match(r"score: shard \d+ \(safety\) on ", message), message
    wait_for_free_cpus()


def test_vllm_workers_run_tensor_parallel_over_their_gpus(tmp_path):
    """Only the config: vLLM on Ray needs a GPU cluster, which the tests do not have."""
    vllm = ScoreConfig("in.jsonl", "safety", "utility", str(tmp_path / "run"), backend="vllm")
    assert placed_config(vllm, Placement(threads=4, gpus=2)).tensor_parallel_size == 2
    assert placed_config(vllm, Placement(gpus=1)).tensor_parallel_size == 1
    assert absolute_paths(vllm).run_dir == str((tmp_path / "run").resolve())
    torch_config = ScoreConfig("in.jsonl", "safety", "utility", str(tmp_path))
    assert placed_config(torch_config, Placement(gpus=2)).tensor_parallel_size == 1
    with pytest.raises(ConfigError, match="--tensor-parallel-size 4"):
        placed_config(ScoreConfig("in.jsonl", "s", "u", str(tmp_path), backend="vllm", tensor_parallel_size=4),
                      Placement(gpus=2))
