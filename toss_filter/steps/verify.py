"""`--verify N` (vLLM backend): re-score N random rows with the torch backend and compare both roles' scores."""

from __future__ import annotations

from typing import Any

import numpy as np

from toss_filter.config import ScoreConfig
from toss_filter.plan import ShardPlan
from toss_filter.run import RunDir, ShardFiles
from toss_filter.score.base import scored_positions
from toss_filter.score.base import REFERENCE_ROLES
from toss_filter.score.models import ReferenceModels
from toss_filter.score.torch_backend import TorchScorer
from toss_filter.score.vllm_backend import agreement

VERIFY_SEED = 0


def verify_against_torch(run: RunDir, tokens_key: str, score_key: str, plan: ShardPlan,
                         references: ReferenceModels, config: ScoreConfig) -> dict[str, Any]:
    """Re-score `config.verify` random rows (seeded, among rows with a scored token) with the torch backend and
    compare them with the stored scores of both roles: `{"rows", "seed", **agreement(...)}`."""
    files = ShardFiles(str(run.path), tokens_key, score_key)
    candidates: list[tuple[int, int]] = []  # (shard, row in shard): one pass over the labels, no tokens kept
    for shard in range(plan.shards):
        tokens = files.tokens(shard)
        candidates += [(shard, i) for i, (_, labels) in enumerate(tokens.rows(range(len(tokens.row_ids))))
                       if scored_positions(labels).any()]
    rng = np.random.default_rng(VERIFY_SEED)
    chosen = sorted(candidates[i] for i in rng.choice(len(candidates), min(config.verify, len(candidates)),
                                                       replace=False))
    rows, stored = [], {role: [] for role in REFERENCE_ROLES}
    for shard in sorted({s for s, _ in chosen}):
        data = files.scored(shard)
        scores = {"safety": data.nll_safety, "utility": data.nll_utility}
        for _, i in (c for c in chosen if c[0] == shard):
            span = slice(data.offsets[i], data.offsets[i + 1])
            rows.append((data.input_ids[span], data.labels[span]))
            for role in REFERENCE_ROLES:
                stored[role].append(scores[role][span])
    scorer = TorchScorer(references, references.device, config.max_batch_tokens)
    theirs, ours = [], []
    for role in REFERENCE_ROLES:
        theirs += stored[role]
        ours += scorer.nll(role, rows)
    empty = np.zeros(0, np.float32)
    return {"rows": len(chosen), "seed": VERIFY_SEED,
            **agreement(np.concatenate(theirs or [empty]), np.concatenate(ours or [empty]), references.dtype)}
