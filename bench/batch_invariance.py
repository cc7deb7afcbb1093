"""Cost and effect of batch-invariant torch scoring on CPU (each row alone) against length-sorted batches.

    .venv/bin/python bench/batch_invariance.py [--rows 80] [--max-length N] [--repeats 3] [--shard-rows 7] [--threads N]

The first `--rows` rows of the bundled custom set, tokenized with the model's chat template (truncated to
`--max-length` if given), are scored under the bundled safety adapter by toss-filter's own path
(`ReferenceModels` + `TorchScorer.nll`, float32, merged LoRA weights), with `--threads` torch threads (pinned,
as the pipeline pins them; default: torch's choice), two ways:

- batched: `TorchScorer(batch_invariant=False)`, the default: rows sorted by length and packed by the CPU budget of
  2048 padded tokens;
- alone: `TorchScorer(batch_invariant=True)`, each row its own unpadded forward pass.

Timing: all rows as one shard. The batched scheme's batches (`length_sorted_batches` over all rows) are the unit:
each repeat scores every batch both ways back to back (batched, then its rows alone, or the reverse; the order
alternates from batch to batch and between repeats), so drift in machine speed hits both schemes alike. Each
scheme's time is the sum over batches of time.perf_counter around its `nll` call; the two schemes do exactly the
work of a whole one-shard run. The median over repeats, every repeat, and the ratio alone/batched of each repeat
are printed. Effect: each scheme then scores the same rows cut into shards of `--shard-rows` (as `--shard-rows`
does), and the bench counts the scores that differ from its one-shard scores, bit for bit.
The output is printed; bench/results/batch_invariance.txt keeps the runs quoted in docs/scale.md.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toss_filter.data.load import load_conversations  # noqa: E402
from toss_filter.data.tokenize import ConversationTokenizer, resolve_format  # noqa: E402
from toss_filter.default_model import EMBEDDED_MODEL_ID, resolve_model_path  # noqa: E402
from toss_filter.score.models import ReferenceModels, resolve_spec  # noqa: E402
from toss_filter.score.torch_backend import TorchScorer, length_sorted_batches  # noqa: E402

SCHEMES = {"batched": False, "alone": True}


def differing(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[int, int, float]:
    """(scores that differ bit for bit, scores, largest |difference|) over the non-NaN scores."""
    x, y = np.concatenate(a), np.concatenate(b)
    scored = ~np.isnan(x)
    assert (scored == ~np.isnan(y)).all()
    x, y = x[scored], y[scored]
    return int((x.view(np.uint32) != y.view(np.uint32)).sum()), len(x), float(np.abs(x - y).max(initial=0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = resolve_model_path(EMBEDDED_MODEL_ID)
    adapters = REPO / "examples" / "reference-adapters"
    references = ReferenceModels(*(resolve_spec(role, str(adapters / role), base) for role in ("safety", "utility")),
                                 dtype=torch.float32, device="cpu")
    encode = ConversationTokenizer(references.tokenizer, resolve_format(references.tokenizer, "chat"))
    conversations = load_conversations(str(REPO / "examples" / "data" / "custom_mix.jsonl"))
    rows = []
    for _, messages in itertools.islice(conversations, args.rows):
        tokens = encode(messages)
        ids, labels = np.asarray(tokens.input_ids), np.asarray(tokens.labels)
        rows.append((ids[: args.max_length], labels[: args.max_length]))
    lengths = [len(ids) for ids, _ in rows]
    scorers = {name: TorchScorer(references, "cpu", batch_invariant=flag) for name, flag in SCHEMES.items()}
    references.model_for("safety")  # load and merge before any timing
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{len(rows)} rows of custom_mix.jsonl (max length {args.max_length}), {sum(lengths)} tokens, "
          f"lengths {min(lengths)}..{max(lengths)} (median {int(np.median(lengths))}); safety adapter, float32")

    batches = length_sorted_batches(lengths, scorers["batched"].max_batch_tokens)
    print(f"batched: {len(batches)} batches of up to {scorers['batched'].max_batch_tokens} padded tokens; "
          f"{sum(len(b) * lengths[b[0]] for b in batches) - sum(lengths)} padding tokens")
    for name in SCHEMES:  # warm-up: the scorer's one-off head check, allocator, caches
        scorers[name].nll("safety", rows[:1])
    seconds: dict[str, list[float]] = {name: [] for name in SCHEMES}
    one_shard: dict[str, list[np.ndarray]] = {}
    for repeat in range(args.repeats):
        spent = dict.fromkeys(SCHEMES, 0.0)
        results: dict[str, list] = {name: [None] * len(rows) for name in SCHEMES}
        for k, batch in enumerate(batches):
            for name in (list(SCHEMES) if (repeat + k) % 2 == 0 else list(reversed(SCHEMES))):
                started = time.perf_counter()
                nll = scorers[name].nll("safety", [rows[i] for i in batch])
                spent[name] += time.perf_counter() - started
                for i, values in zip(batch, nll):
                    results[name][i] = values
        for name in SCHEMES:
            seconds[name].append(spent[name])
            if name in one_shard:
                assert differing(one_shard[name], results[name])[0] == 0, f"{name}: two repeats gave different bits"
            one_shard[name] = results[name]
        print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {spent[name]:.1f} s" for name in SCHEMES)
              + f", alone/batched {spent['alone'] / spent['batched']:.3f}", flush=True)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name in SCHEMES:
        print(f"{name:8s} median {median[name]:7.1f} s  ({sum(lengths) / median[name]:6.0f} tokens/s)  "
              f"repeats {' '.join(f'{s:.1f}' for s in seconds[name])}")
    ratios = sorted(a / b for a, b in zip(seconds["alone"], seconds["batched"]))
    print(f"alone / batched: {median['alone'] / median['batched']:.3f} (ratio of medians), "
          f"{statistics.median(ratios):.3f} (median of per-repeat ratios, range {ratios[0]:.3f}..{ratios[-1]:.3f})")

    for name in SCHEMES:
        sharded = [nll for start in range(0, len(rows), args.shard_rows)
                   for nll in scorers[name].nll("safety", rows[start: start + args.shard_rows])]
        n_diff, n, largest = differing(one_shard[name], sharded)
        print(f"{name:8s} 1 shard vs shards of {args.shard_rows} rows: {n_diff} of {n} scores differ "
              f"(largest {largest:.3g})")


if __name__ == "__main__":
    main()
