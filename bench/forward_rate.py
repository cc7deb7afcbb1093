"""Bare batched forward-pass rate of a causal LM on CPU, as a reference point for the benchmark.

Random token ids (batch x seq-len, default 8 x 256), ``model(input_ids).logits`` in float32 under
``torch.inference_mode()``. One warm-up pass, then the best of ``--repeats`` (3) timed passes. Prints one JSON
object with tokens/s. The model path is a full model dir or a LoRA adapter dir (+ ``--base-model``), loaded by
the same helper as ``authors_loop.py``; an adapter is not merged.
"""
import argparse
import json
import time

import torch

from _load import load_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="full model dir or LoRA adapter dir")
    p.add_argument("--base-model", help="base for an adapter dir (default: adapter's base_model_name_or_path)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    t0 = time.perf_counter()
    model = load_model(args.model, args.base_model)
    load_s = time.perf_counter() - t0
    vocab = model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab, (args.batch_size, args.seq_len),
                              generator=torch.Generator().manual_seed(args.seed))
    times = []
    with torch.inference_mode():
        model(input_ids).logits  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(input_ids).logits
            times.append(time.perf_counter() - t0)
    n = args.batch_size * args.seq_len
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "tokens_per_s": n / min(times), "best_s": min(times), "times_s": times,
                      "load_s": load_s, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
