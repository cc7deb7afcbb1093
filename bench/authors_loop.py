"""Baseline for the benchmark: the authors' TOSS scoring + selection loop, re-written from its description.

Written from the description in docs/toss-method.md (sections 1.2-1.6 and 2) of Polly-LYP/TOSS
``train/examples/calculate_token_loss.py`` (run once per reference model) followed by
``train/examples/generate_harmful_token_label.py``. None of their code is copied.

Reproduced on purpose, inefficiencies and quirks included:
  * Template ``"Human: " + user.strip() + "\\n" + "Assistant: " + assistant.strip() + " " + eos``, then
    ``.strip()`` on the whole string. Tokenized with the tokenizer's default special tokens (BOS if it adds one),
    truncated at ``--max-length``. Only the first user turn and the first assistant turn of ``messages`` are used.
  * Prompt mask = the token length of the separately tokenized ``"Human: ...\\nAssistant: "``. Its trailing space
    becomes a lone token, so the mask is one token too long and the first response token is never scored
    whenever the response starts with a letter (the prompt-boundary quirk).
  * The two models are loaded and run one after the other (safety first, then utility), each a full separate
    copy (base + ``PeftModel.from_pretrained`` for a LoRA adapter, nothing shared, adapter not merged). Each run
    loads its tokenizer from its own model path and re-tokenizes the whole dataset. Eval mode, ``torch.no_grad()``.
  * Dataset order, batches of ``--batch-size`` (4), right-padded to the longest row in the batch (pad = eos if
    there is no pad token). A full forward ``model(input_ids, attention_mask).logits`` over the whole sequence,
    prompt included. Then ``logits[:, :-1]`` vs ``labels[:, 1:]``, ``CrossEntropyLoss(reduction='none')`` over the
    full vocabulary (ignored positions give 0). Per sample ``[0] + loss[:len(labels_i) - 1]`` as a Python list
    of floats, so index j = -log p(token_j | tokens_<j).
  * Selection re-tokenizes the data with the utility model's tokenizer. score = loss_utility - loss_safety.
    Every ``(score, i, j)`` with label != -100 goes into one Python list, which is sorted descending with
    Python's stable ``sorted`` (ties: the earlier sample, then the earlier position, is discarded first). The first
    ``int(N * ratio)`` entries are set to -100 in a copy of the labels, giving the retained labels.

Deliberately NOT reproduced:
  * accelerate/FSDP over 2 GPUs, the all-gather and the de-duplication by ``idx``. This is a single CPU process
    (the machine has 2 cores) and the dataset order is kept directly.
  * Adding a ``<pad>`` token and resizing the embeddings when there is no pad token: we pad with eos. With right
    padding and an attention mask, the pad id cannot change the losses of real tokens.
  * float32 instead of bf16. System turns and further turns are ignored: only single-turn rows are rendered.
  * Output: one JSON file (retained labels, counts, timings) instead of the ``.pt`` pickles. No
    ``discarded_harmful_token_labels`` file is written, and no loss files are written between the two stages.
  * The bugs in ``generate_token_mask.sh`` (wrong script name, mismatched data file) are not reproduced.
"""
import argparse
import gc
import json
import time

import torch

from _load import load_model, load_tokenizer


def read_rows(path):
    """(first user content, first assistant content) per JSONL row with a ``messages`` list."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                msgs = json.loads(line)["messages"]
                user = next(m["content"] for m in msgs if m["role"] == "user")
                assistant = next(m["content"] for m in msgs if m["role"] == "assistant")
                rows.append((user, assistant))
    return rows


def encode(tok, user, assistant, max_length):
    """input_ids and labels (prompt masked with -100, one token too far: the authors' quirk)."""
    prompt = "Human: " + user.strip() + "\n" + "Assistant: "
    text = (prompt + assistant.strip() + " " + tok.eos_token).strip()
    ids = tok(text, max_length=max_length, truncation=True)["input_ids"]
    n_prompt = len(tok(prompt, max_length=max_length, truncation=True)["input_ids"])
    labels = [-100 if j < n_prompt else t for j, t in enumerate(ids)]
    return ids, labels


def token_losses(model, tok, rows, batch_size, max_length, timings, name):
    """Per-sample Python lists: entry j = loss of token j, entry 0 = 0 (calculate_token_loss.py)."""
    t0 = time.perf_counter()
    encoded = [encode(tok, u, a, max_length) for u, a in rows]
    t1 = time.perf_counter()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")  # ignore_index=-100
    out, padded = [], 0
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b:b + batch_size]
            width = max(len(ids) for ids, _ in batch)
            padded += width * len(batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            shift_logits = logits[:, :-1, :].contiguous()
            shift_labels = labels[:, 1:].contiguous()
            loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            loss = loss.view(len(batch), -1)
            for k, (_, lab) in enumerate(batch):
                out.append([0.0] + loss[k, :len(lab) - 1].tolist())
    t2 = time.perf_counter()
    n_tokens = sum(len(ids) for ids, _ in encoded)
    timings[f"{name}_tokenize_s"] = t1 - t0
    timings[f"{name}_forward_s"] = t2 - t1
    timings[f"{name}_tokens_per_s"] = n_tokens / (t2 - t1)
    timings[f"{name}_padded_tokens"] = padded
    return out, n_tokens


def select(loss_utility, loss_safety, labels, ratio):
    """Global top-ratio of all response tokens by utility - safety loss (generate_harmful_token_label.py)."""
    pool = []
    for i, (lu, ls, lab) in enumerate(zip(loss_utility, loss_safety, labels)):
        assert len(lu) == len(ls) == len(lab), i
        diff = [u - s for u, s in zip(lu, ls)]
        for j, label in enumerate(lab):
            if label != -100:
                pool.append((diff[j], i, j))
    n = len(pool)
    top = sorted(pool, key=lambda t: t[0], reverse=True)[:int(n * ratio)]
    retained = [list(lab) for lab in labels]
    for _, i, j in top:
        retained[i][j] = -100
    return retained, n, len(top)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="JSONL with a `messages` list per row")
    p.add_argument("--safety-model", required=True, help="full model dir or LoRA adapter dir")
    p.add_argument("--utility-model", required=True, help="full model dir or LoRA adapter dir")
    p.add_argument("--base-model", help="base for adapter dirs (default: adapter's base_model_name_or_path)")
    p.add_argument("--output", required=True, help="output JSON path")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=2048)
    args = p.parse_args()

    start = time.perf_counter()
    timings = {}
    rows = read_rows(args.data)
    losses = {}
    for name, path in (("safety", args.safety_model), ("utility", args.utility_model)):
        t0 = time.perf_counter()
        tok = load_tokenizer(path, args.base_model)
        model = load_model(path, args.base_model)
        timings[f"{name}_load_s"] = time.perf_counter() - t0
        losses[name], n_tokens = token_losses(model, tok, rows, args.batch_size, args.max_length, timings, name)
        del model
        gc.collect()

    t0 = time.perf_counter()
    tok = load_tokenizer(args.utility_model, args.base_model)
    labels = [encode(tok, u, a, args.max_length)[1] for u, a in rows]
    retained, n_resp, n_masked = select(losses["utility"], losses["safety"], labels, args.ratio)
    timings["relabel_select_s"] = time.perf_counter() - t0

    timings["total_s"] = time.perf_counter() - start  # everything but the JSON write below
    forward = timings["safety_forward_s"] + timings["utility_forward_s"]
    timings["model_tokens_per_s_forward"] = 2 * n_tokens / forward
    timings["model_tokens_per_s_end_to_end"] = 2 * n_tokens / timings["total_s"]
    t0 = time.perf_counter()
    with open(args.output, "w") as f:
        json.dump({"retained_labels": retained, "n_response_tokens": n_resp, "n_masked": n_masked,
                   "n_tokens": n_tokens, "timings": timings}, f)
    write_s = time.perf_counter() - t0

    print(f"rows {len(rows)}  tokens {n_tokens}  response tokens {n_resp}  masked {n_masked}")
    for key, value in timings.items():
        print(f"  {key:32s} {value:12.3f}")
    print(f"  {'write_s (not in total_s)':32s} {write_s:12.3f}")


if __name__ == "__main__":
    main()
