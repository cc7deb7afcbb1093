"""Scoring rate of the torch backend by batch token budget, beside the bare batched forward rate, in one process.

    .venv/bin/python bench/batch_budget.py [--rows 96] [--budgets 512 1024 2048 4096] [--repeats 3]

The first `--rows` rows of the bundled custom set, tokenized by toss-filter with the model's chat template, are
scored under the bundled safety adapter by toss-filter's own path (`ReferenceModels` + `TorchScorer.nll`, which
merges float32 LoRA weights) at each budget. The bare forward is that of bench/forward_rate.py: the same adapter,
unmerged, on a 8×256 batch of random ids. Budgets alternate within each
repeat (and the bare 8×256 forward of bench/forward_rate.py, best of 3 passes, runs in the same loop), so drift in machine speed
hits them all alike; the median of the repeats is reported. This is what sets the CPU default of
`--max-batch-tokens`. Results are printed and written to bench/results/batch_budget.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _load import load_model  # noqa: E402
from toss_filter.data.load import load_conversations  # noqa: E402
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format  # noqa: E402
from toss_filter.default_model import EMBEDDED_MODEL_ID, resolve_model_path  # noqa: E402
from toss_filter.score.models import ReferenceModels, resolve_spec  # noqa: E402
from toss_filter.score.torch_backend import TorchScorer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = resolve_model_path(EMBEDDED_MODEL_ID)
    adapters = REPO / "examples" / "reference-adapters"
    model = load_model(str(adapters / "safety"), base)
    references = ReferenceModels(*(resolve_spec(role, str(adapters / role), base) for role in ("safety", "utility")),
                                 dtype=torch.float32, device="cpu")
    encode = ConversationTokenizer(references.tokenizer, resolve_format(references.tokenizer, "chat"))
    conversations = load_conversations(str(REPO / "examples" / "data" / "custom_mix.jsonl"))
    rows = []
    for _, messages in itertools.islice(conversations, args.rows):
        tokens = encode(messages)
        rows.append((np.asarray(tokens.input_ids), np.asarray(tokens.labels)))
    n_tokens = sum(len(ids) for ids, _ in rows)
    bare_ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (8, 256))

    rates: dict[str, list[float]] = {}
    with torch.inference_mode():
        references.load()
        model(bare_ids)  # warm-up
        for _ in range(args.repeats):
            passes = []  # the best of 3 passes: the bare rate is the ceiling, so take it at its highest
            for _ in range(3):
                started = time.perf_counter()
                model(bare_ids)
                passes.append(time.perf_counter() - started)
            rates.setdefault("bare_forward_8x256", []).append(bare_ids.numel() / min(passes))
            for budget in args.budgets:
                scorer = TorchScorer(references, max_batch_tokens=budget)
                started = time.perf_counter()
                scorer.nll("safety", rows)
                rates.setdefault(f"score_budget_{budget}", []).append(n_tokens / (time.perf_counter() - started))
    bare = statistics.median(rates["bare_forward_8x256"])
    result = {
        "rows": len(rows), "tokens": n_tokens, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "median_tokens_per_s": {name: round(statistics.median(values), 1) for name, values in rates.items()},
        "share_of_bare_forward": {name: round(statistics.median(values) / bare, 3)
                                  for name, values in rates.items() if name != "bare_forward_8x256"},
        "all_tokens_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()},
    }
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "batch_budget.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "all_tokens_per_s"}, indent=2))


if __name__ == "__main__":
    main()
