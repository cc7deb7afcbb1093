"""Step 3 over the shard plan: per-token NLL of every response token under both references, one shard file per
role and shard.

    score_step(config, executor, show_progress) -> run summary (also RUN_DIR/run.json)

The driver tokenizes first (`steps.tokenize`), so bad input stops the run before any model loads or any remote
work starts. It then hands the missing (roles, shard) units to the executor, whose workers each build one
`ShardScorer` and score whole shards with it: the local executor in this process, the Ray executor in one actor
per replica. Both run the same `ShardScorer.score`, so a shard's bytes do not depend on where it ran.

A unit scores one role over one shard when the scorer holds one role's weights at a time (LoRA merged in place,
or two vLLM engines): units then come role-major, so each worker switches roles about once. Otherwise a unit
scores both roles of a shard together.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from toss_filter.config import ExecutorConfig, ScoreConfig, as_dict
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format
from toss_filter.data.write import list_array
from toss_filter.errors import ConfigError
from toss_filter.files import atomic_write_text, link_or_copy
from toss_filter.plan import ShardPlan, parse_slice, write_table
from toss_filter.run import RunDir, content_key, list_column, model_fingerprint, package_versions
from toss_filter.score.base import TokenRow
from toss_filter.score.models import ROLES, ReferenceModels, resolve_device, resolve_dtype, resolve_spec
from toss_filter.steps.tokenize import tokenize_step

Unit = tuple[tuple[str, ...], int]  # (roles, shard)


def token_rows(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, indices: Any) -> list[TokenRow]:
    return [(ids[offsets[i]:offsets[i + 1]], labels[offsets[i]:offsets[i + 1]]) for i in indices]


@dataclass(frozen=True)
class ScoreJob:
    """All a worker needs to score shards. Picklable: it travels to Ray actors."""

    config: ScoreConfig
    tokens_key: str
    score_key: str
    threads: int | None = None
    deterministic: bool = False


def build_references(config: ScoreConfig) -> ReferenceModels:
    device = resolve_device(config.device)
    specs = {role: resolve_spec(role, getattr(config, f"{role}_model"), config.base_model, config.allow_pickle_weights)
             for role in ROLES}
    return ReferenceModels(specs["safety"], specs["utility"], resolve_dtype(config.dtype, device), device,
                           config.trust_remote_code)


class ShardScorer:
    """One worker's scorer: the references and the backend, built once; `score` writes whole shards."""

    def __init__(self, job: ScoreJob):
        import torch

        if job.threads:
            torch.set_num_threads(job.threads)  # results must not depend on the cores a worker happens to see
        if job.deterministic:
            # vLLM schedules requests by timing, so its batches differ run to run: its batch-invariant kernels make
            # a token's score independent of its batch. The torch backend's batches are a function of the shard,
            # so deterministic kernels are all it needs. Both must be set before any CUDA work starts.
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.job, self.run = job, RunDir(job.config.run_dir)
        self.references = build_references(job.config)
        config = job.config
        if config.backend == "vllm":
            from toss_filter.score.vllm_backend import VllmScorer

            self.scorer: Any = VllmScorer(self.references, self.run.path / "merged", config.merge_adapters,
                                          config.gpu_memory_utilization, config.tensor_parallel_size,
                                          config.vllm_args)
        else:
            from toss_filter.score.torch_backend import TorchScorer

            self.scorer = TorchScorer(self.references, self.references.device, config.max_batch_tokens)

    @property
    def one_model_at_a_time(self) -> bool:
        return self.scorer.one_model_at_a_time

    def score(self, unit: Unit, on_batch: Any = None) -> dict[str, Any]:
        """Score `unit` and write its role files; returns `{"shard", "roles", "tokens", "seconds"}`."""
        roles, shard = unit
        started = time.perf_counter()
        table = self.run.read_token_shard(self.job.tokens_key, shard)
        ids, offsets = list_column(table, "input_ids")
        labels, _ = list_column(table, "labels")
        nll = self.scorer.nll_roles(roles, token_rows(ids, labels, offsets, range(table.num_rows)),
                                    {role: on_batch for role in roles} if on_batch else None)
        for role in roles:
            values = np.concatenate(nll[role]) if nll[role] else np.zeros(0, np.float32)
            write_table(self.run.score_shard(self.job.score_key, role, shard),
                        pa.table({"row": table.column("row"), "nll": list_array(values, offsets, pa.float32())}))
        return {"shard": shard, "roles": list(roles), "tokens": int(offsets[-1]) * len(roles),
                "seconds": time.perf_counter() - started}

    def describe(self) -> dict[str, Any]:
        return self.scorer.describe()

    def close(self) -> None:
        close = getattr(self.scorer, "close", None)
        if close:
            close()


def units(missing: list[tuple[str, int]], one_model_at_a_time: bool) -> list[Unit]:
    """The work for the missing (role, shard) score files, role-major or both roles per shard (module docstring)."""
    if one_model_at_a_time:
        return [((role,), shard) for role in ROLES for r, shard in missing if r == role]
    shards = sorted({shard for _, shard in missing})
    return [(tuple(role for role in ROLES if (role, shard) in missing), shard) for shard in shards]


class Executor(Protocol):
    """Where shards run (`toss_filter.executors`)."""

    name: str

    def score(self, job: ScoreJob, missing: list[tuple[str, int]], show_progress: bool) -> dict[str, Any]:
        """Write every missing (role, shard) score file; return `{"scorer": describe(), "score_s", "tokens"}`."""

    def map_shards(self, fn: Any, shards: Any) -> list[Any]:
        """`[fn(s) for s in shards]`, possibly in other processes (`fn` is picklable)."""

    def close(self) -> None:
        """Release what the executor started (a local Ray)."""


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


def score_step(config: ScoreConfig, executor: Executor, show_progress: bool = True,
               executor_config: ExecutorConfig | None = None) -> dict[str, Any]:
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
    unscored = run.missing_scores(key, ROLES, mine)
    missing = reuse_role_scores(run, key, key_payload, unscored)
    job = ScoreJob(config, tokens_key, key, executor_config.threads if executor_config else None,
                   bool(executor_config and executor_config.deterministic))
    result = executor.score(job, missing, show_progress) if missing else {"scorer": None, "score_s": 0.0,
                                                                          "tokens": 0, "load_models_s": None}
    summary = {
        "tokens_key": tokens_key, "score_key": key, "shard_rows": plan.shard_rows, "rows": plan.rows,
        "shards": plan.shards, "tokens": manifest["tokens"], "resumed_shards": len(mine) - len({s for _, s in missing}),
        "reused_shard_roles": len(unscored) - len(missing),
        "input": config.input, "template": chat_format.name, "models": references.describe(),
        "score_config": as_dict(config), "device": references.device, "dtype": str(references.dtype),
        "scorer": result["scorer"],
        "provenance": {"executor": executor.name, "shard_slice": f"{index}/{count}",
                       **({"executor_config": as_dict(executor_config)} if executor_config else {})},
        "timings": {
            "tokenize_s": round(tokenize_s, 3),
            "load_models_s": result.get("load_models_s"),
            "score_s": round(result["score_s"], 3),
            "model_tokens_scored_this_run": result["tokens"],  # tokens × roles: a resumed run may score one role
            "model_tokens_per_s": round(result["tokens"] / max(result["score_s"], 1e-9), 1) if missing else None,
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
    missing = run.missing_scores(state["score_key"], ROLES, list(range(plan.shards)))
    if missing:
        shards = sorted({s for _, s in missing})
        listed = ", ".join(map(str, shards[:10])) + (" ..." if len(shards) > 10 else "")
        raise ConfigError(f"{run.path}: scoring is incomplete: {len(missing)} of {2 * plan.shards} score files "
                          f"missing (shards {listed}); run `toss-filter score` (every --shard-slice) to finish it")
    return plan
