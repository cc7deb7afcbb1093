"""Step 3 over the shard plan: per-token NLL of every response token under both references, one shard file per
role and shard.

    score_step(config, executor, show_progress) -> run summary (also RUN_DIR/run.json)

The driver tokenizes first (`steps.tokenize`), so bad input stops the run before any model loads or any remote
work starts. It then hands the missing (roles, shard) units to the executor's worker pool (`run_pool`), whose
workers each build one `ShardScorer` and score whole shards with it: the local executor in this process, the Ray
executor in one actor per replica. Both call the same `ShardScorer`, so a shard's bytes do not depend on where it
ran.

A unit scores one role over one shard when the scorer holds one role's weights at a time (LoRA merged in place,
or two vLLM engines): units then come role-major, so each worker switches roles about once. Otherwise a unit
scores both roles of a shard together.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from toss_filter.arrow import list_array, list_column
from toss_filter.config import ScoreConfig, as_dict
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
from toss_filter.errors import ConfigError
from toss_filter.executors.base import Executor, Placement
from toss_filter.files import atomic_write_text, link_or_copy
from toss_filter.fingerprint import content_key, model_fingerprint, package_versions
from toss_filter.plan import ShardPlan, parse_slice, write_table
from toss_filter.run import SCORES_SCHEMA, RunDir, ShardFiles
from toss_filter.score.base import REFERENCE_ROLES
from toss_filter.score.models import ReferenceModels, resolve_device, resolve_dtype, resolve_spec
from toss_filter.steps.tokenize import tokenize_step

class ScoreUnit(NamedTuple):
    """One unit of scoring work: the shard's files of these roles."""

    roles: tuple[str, ...]
    shard: int

    def describe(self) -> str:
        return f"shard {self.shard} ({', '.join(self.roles)})"


@dataclass(frozen=True)
class ScoreJob:
    """All a worker needs to score shards. Picklable: it travels to Ray actors."""

    config: ScoreConfig
    tokens_key: str
    score_key: str


def build_references(config: ScoreConfig) -> ReferenceModels:
    device = resolve_device(config.device)
    specs = {role: resolve_spec(role, getattr(config, f"{role}_model"), config.base_model, config.allow_pickle_weights)
             for role in REFERENCE_ROLES}
    return ReferenceModels(specs["safety"], specs["utility"], resolve_dtype(config.dtype, device), device,
                           config.trust_remote_code)


def placed_config(config: ScoreConfig, placement: Placement) -> ScoreConfig:
    """The config as a worker with `placement` runs it: a vLLM engine tensor-parallel over the worker's GPUs."""
    gpus = int(placement.gpus)
    if config.backend != "vllm" or gpus < 2:
        return config
    if config.tensor_parallel_size > gpus:
        raise ConfigError(f"--tensor-parallel-size {config.tensor_parallel_size} needs more GPUs than "
                          f"--gpus-per-replica {placement.gpus:g} gives a replica")
    size = config.tensor_parallel_size if config.tensor_parallel_size > 1 else gpus  # an explicit size wins
    return replace(config, tensor_parallel_size=size)


def absolute_paths(config: ScoreConfig) -> ScoreConfig:
    """Local run and model paths made absolute, on the driver: a remote worker's working directory is not ours."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    return replace(config, run_dir=str(Path(config.run_dir).resolve()), safety_model=absolute(config.safety_model),
                   utility_model=absolute(config.utility_model), base_model=absolute(config.base_model))


class ShardScorer:
    """One worker's scorer (an `executors.base.Worker`): the references and the backend, built once; a call scores
    one `ScoreUnit` and writes its files."""

    def __init__(self, job: ScoreJob, placement: Placement = Placement()):
        import torch

        if placement.threads:
            torch.set_num_threads(placement.threads)  # results must not depend on the cores a worker happens to see
        config = placed_config(job.config, placement)
        if config.deterministic:
            # vLLM schedules requests by timing, so its batches differ run to run: its batch-invariant kernels make
            # a token's score independent of its batch. The torch backend's batches are a function of the shard,
            # so deterministic kernels are all it needs. Both must be set before any CUDA work starts.
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.files = ShardFiles(config.run_dir, job.tokens_key)
        self.job, self.run = job, RunDir(config.run_dir)
        self.references = build_references(config)
        if config.backend == "vllm":
            from toss_filter.score.vllm_backend import VllmScorer

            self.scorer: Any = VllmScorer(self.references, self.run.path / "merged", config.merge_adapters,
                                          config.gpu_memory_utilization, config.tensor_parallel_size,
                                          config.vllm_args)
        else:
            from toss_filter.score.torch_backend import TorchScorer

            self.scorer = TorchScorer(self.references, self.references.device, config.max_batch_tokens)

    def load(self) -> None:
        """Load the weights now (a pool times it as the worker's start, and a worker is ready once loaded)."""
        self.scorer.one_model_at_a_time  # noqa: B018  (the torch scorer loads its weights to answer)

    def arrange(self, units: list[ScoreUnit]) -> list[ScoreUnit]:
        """Role-major units (one model at a time: each switch of roles costs a merge or an engine) when the scorer
        holds one role's weights at a time, else both roles of a shard in one unit."""
        if self.scorer.one_model_at_a_time:
            return units
        shards = sorted({unit.shard for unit in units})
        return [ScoreUnit(tuple(r for r in REFERENCE_ROLES if any(u.shard == shard and r in u.roles for u in units)),
                          shard) for shard in shards]

    def __call__(self, unit: ScoreUnit, on_progress: Any = None) -> dict[str, Any]:
        """Score `unit` and write its role files; returns `{"shard", "roles", "tokens", "seconds"}`."""
        started = time.perf_counter()
        tokens = self.files.tokens(unit.shard)
        nll = self.scorer.nll_roles(unit.roles, tokens.rows(range(len(tokens.row_ids))),
                                    {role: on_progress for role in unit.roles} if on_progress else None)
        for role in unit.roles:
            values = np.concatenate(nll[role]) if nll[role] else np.zeros(0, np.float32)
            write_table(self.run.score_shard(self.job.score_key, role, unit.shard), pa.table(
                {"row": pa.array(tokens.row_ids, pa.int64()), "nll": list_array(values, tokens.offsets, pa.float32())},
                schema=SCORES_SCHEMA))
        return {"shard": unit.shard, "roles": list(unit.roles), "tokens": int(tokens.offsets[-1]) * len(unit.roles),
                "seconds": time.perf_counter() - started}

    def describe(self) -> dict[str, Any]:
        return self.scorer.describe()

    def close(self) -> None:
        close = getattr(self.scorer, "close", None)
        if close:
            close()


def role_major_units(missing: list[tuple[str, int]]) -> list[ScoreUnit]:
    """The work for the missing (role, shard) score files, one role at a time: right for every scorer, and needs no
    model on the driver (a worker may `arrange` them otherwise)."""
    return [ScoreUnit((role,), shard) for role in REFERENCE_ROLES for r, shard in missing if r == role]


def score_key(manifest: dict[str, Any], config: ScoreConfig, references: ReferenceModels) -> tuple[str, dict[str, Any]]:
    """The score key and what it is made of: the tokens' content and everything that changes a score."""
    specs = references.specs
    payload = {
        "tokens_digest": manifest["digest"],
        "models": {role: model_fingerprint(spec.path) for role, spec in specs.items()},
        "bases": {role: spec.base and model_fingerprint(spec.base) for role, spec in specs.items()},
        "backend": config.backend, "dtype": str(references.dtype),
    }
    return content_key(payload), payload


def role_backend(payload: dict[str, Any], role: str) -> str:
    """The backend that scored `role` under a key: TOSS-Pro re-scores θs with torch whatever scored round 1."""
    return payload.get("role_backends", {}).get(role, payload["backend"])


def reuse_role_scores(run: RunDir, key: str, payload: dict[str, Any],
                      missing: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Link each missing (role, shard) that another score key of this run already holds for the same tokens and
    dtype, and the same model, base and backend in that role, and return the rest: a role's NLLs depend on
    nothing else, so changing one reference re-scores only that one. Only keys whose key.json hashes to their own
    name count, so a key.json edited by hand never lends its scores."""
    same = ("tokens_digest", "dtype")
    donors = []
    for folder in sorted(run.scores_dir(key).parent.iterdir()):
        if folder.name != key and (folder / "key.json").exists():
            other = json.loads((folder / "key.json").read_text())
            if content_key(other) == folder.name and all(other.get(field) == payload[field] for field in same):
                donors.append((folder.name, other))
    left = []
    for role, shard in missing:
        source = next((run.score_shard(name, role, shard) for name, other in donors
                       if other["models"].get(role) == payload["models"][role]
                       and other["bases"].get(role) == payload["bases"][role]
                       and role_backend(other, role) == role_backend(payload, role)
                       and run.score_shard(name, role, shard).exists()), None)
        if source is None:
            left.append((role, shard))
        else:
            link_or_copy(source, run.score_shard(key, role, shard))
    return left


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_context(source: str, run: RunDir, tokens_key: str, plan: ShardPlan, manifest: dict[str, Any],
                  references: ReferenceModels) -> None:
    """Refuse, before any model loads, a row longer than the references' context: past it, a model with learned
    positions fails in the middle of the run and one with rotary positions scores tokens it was never trained
    to see. The limit is read from the model configs alone."""
    from transformers import AutoConfig

    limits = []
    for spec in references.specs.values():
        model_config = AutoConfig.from_pretrained(spec.base or spec.path, trust_remote_code=references.trust_remote_code)
        model_config = getattr(model_config, "text_config", None) or model_config
        limits += [getattr(model_config, name) for name in CONTEXT_FIELDS if getattr(model_config, name, None)][:1]
    if not limits or manifest["longest_row"] <= min(limits):
        return
    limit = min(limits)
    for shard in range(plan.shards):  # name the first row that is too long
        table = run.read_token_shard(tokens_key, shard)
        lengths = np.diff(list_column(table, "input_ids")[1])
        if (lengths > limit).any():
            first = int(np.argmax(lengths > limit))
            raise ConfigError(f"{source}: row {table.column('row')[first].as_py()} has {lengths[first]} tokens, "
                              f"more than the references' context of {limit}: truncate with --max-length {limit}")


def score_step(config: ScoreConfig, executor: Executor, show_progress: bool = True) -> dict[str, Any]:
    """Tokenize `config.input` and write per-token NLLs under both references into `config.run_dir`, resuming
    from complete shards. Returns the run summary (also saved as run.json)."""
    run = RunDir(config.run_dir)
    references = build_references(config)
    started = time.perf_counter()
    chat_format = resolve_format(references.tokenizer, config.template)
    encode = ConversationTokenizer(references.tokenizer, chat_format, config.max_length, config.score_reasoning)
    tokens_key, manifest = tokenize_step(config, encode, run, show_progress)
    tokenize_s = time.perf_counter() - started
    plan = ShardPlan(config.shard_rows, manifest["rows"])
    check_context(config.input, run, tokens_key, plan, manifest, references)
    key, key_payload = score_key(manifest, config, references)
    atomic_write_text(run.scores_dir(key) / "key.json", json.dumps(key_payload, indent=1) + "\n")
    run.write_json("config.json", {"command": "score", "score": as_dict(config), "versions": package_versions()})

    index, count = parse_slice(config.shard_slice)
    mine = plan.slice(index, count)
    unscored = run.missing_scores(key, mine)
    missing = reuse_role_scores(run, key, key_payload, unscored)
    job = ScoreJob(absolute_paths(config), tokens_key, key)
    result = executor.run_pool(partial(ShardScorer, job), role_major_units(missing), description="score",
                               unit_name="shard-roles", show_progress=show_progress, shared_dir=run.path)
    summary = {
        "tokens_key": tokens_key, "score_key": key, "shard_rows": plan.shard_rows, "rows": plan.rows,
        "shards": plan.shards, "tokens": manifest["tokens"], "resumed_shards": len(mine) - len({s for _, s in missing}),
        "reused_shard_roles": len(unscored) - len(missing),
        "input": config.input, "template": chat_format.name, "models": references.describe(),
        "score_config": as_dict(config), "device": references.device, "dtype": str(references.dtype),
        "scorer": result["describe"],
        "provenance": {"executor": executor.name, "shard_slice": f"{index}/{count}",
                       "executor_config": executor.describe(), **({"workers": result["workers"]} if missing else {})},
        "timings": {
            "tokenize_s": round(tokenize_s, 3),
            "load_models_s": result["load_s"] if missing else None,
            "score_s": round(result["work_s"], 3),
            "model_tokens_scored_this_run": result["tokens"],  # tokens × roles: a resumed run may score one role
            "model_tokens_per_s": round(result["tokens"] / max(result["work_s"], 1e-9), 1) if missing else None,
        },
    }
    if config.verify:
        from toss_filter.steps.verify import verify_against_torch
        from toss_filter.score.vllm_backend import require_agreement

        summary["verify"] = verify_against_torch(run, tokens_key, key, plan, references, config)
        run.write_json("run.json", summary)
        require_agreement(summary["verify"])
    run.write_json("run.json", summary)
    return summary


def check_scored(run: RunDir, state: dict[str, Any]) -> ShardPlan:
    """Refuse to select from a run whose scores are incomplete or were made for other tokens."""
    plan = run.plan(state)
    manifest = run.tokens_manifest(state["tokens_key"])
    key_file = run.scores_dir(state["score_key"]) / "key.json"
    if manifest is None or not key_file.exists():
        raise ConfigError(f"{run.path}: tokenization or scoring did not finish: re-run `toss-filter score`")
    if json.loads(key_file.read_text())["tokens_digest"] != manifest["digest"]:
        raise ConfigError(f"{run.path}: the scores were made for other tokens than tokens/{state['tokens_key']}: "
                          "re-run `toss-filter score`")
    missing = run.missing_scores(state["score_key"], list(range(plan.shards)))
    if missing:
        shards = sorted({s for _, s in missing})
        listed = ", ".join(map(str, shards[:10])) + (" ..." if len(shards) > 10 else "")
        raise ConfigError(f"{run.path}: scoring is incomplete: {len(missing)} of {2 * plan.shards} score files "
                          f"missing (shards {listed}); run `toss-filter score` (every --shard-slice) to finish it")
    return plan
