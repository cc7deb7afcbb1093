"""Peak RSS against dataset size: is toss-filter's memory flat in the number of tokens N?

    .venv/bin/python bench/scale_rss.py [--part a|b|both] [--sizes 1e6,1e7,1e8,1e9]
                                        [--pipeline-sizes 1e5,1e6] [--work /tmp/scale-bench]

Part A, select + write: a synthetic, already scored run directory of N tokens is written straight in the layout
of `toss_filter.run` (token shards and manifest, two roles' score shards and key.json, run.json as `score_step`
leaves it), one shard at a time, so the generator itself stays small; then `toss-filter select --run-dir RUN
--output OUT --no-report -q` runs as a child process, timed as a whole process. Rows are 200..800 tokens (mean
500), a prompt prefix of 8..len/2 tokens (0.5% of rows have no response, 1% are flagged truncated), NLLs from a
seeded RNG (exponential, 30% of them rounded to 1/8 so that scores tie), NaN outside responses and at position 0.
The shard size (`--shard-rows`, default 2000 rows ≈ 10^6 tokens) is the same at every N, so a flat RSS is what
the sharded design promises. A synthetic run directory that is complete (run.json written last) is reused; a
partial one resumes shard by shard. Outputs (OUT, OUT-rejected, RUN/token_scores) are deleted after each size;
`--delete-data` also deletes the synthetic run directory.

Part B, the whole pipeline: a tiny random Llama (hidden 32, 2 layers, SmolLM2's tokenizer) and two random LoRA
adapters on it (q/v, r=4, seeds 1 and 2), synthetic chat JSONL of ~200..500 tokens a row, and `toss-filter filter
DATA --safety-model S --utility-model U -o OUT --no-report -q --shard-rows R` as a child process. The tiny model
scores ~5k tokens/s per reference on a small CPU, hence the default sizes 1e5,1e6 (add 1e7 with --pipeline-sizes,
about an hour).

Each child is timed by GNU time (`/usr/bin/time -v`: wall seconds, peak RSS = the kernel's ru_maxrss) when it
exists, else by os.wait4's rusage; meanwhile /proc/PID/status is sampled (RssAnon vs RssFile: the memory-mapped
shards count as file-backed RSS) for a timeline of where memory goes. Results are merged by N into
bench/results/scale_rss.json and bench/results/scale_rss_pipeline.json, and printed as markdown tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"
GNU_TIME = Path("/usr/bin/time")

ROW_MIN, ROW_MAX = 200, 800  # tokens per synthetic row (mean 500)
VOCAB = 49_152  # SmolLM2's vocabulary
SEED = 20240
# Bytes on disk per token: tokens (input_ids + labels, int32) + two roles' nll (float32); then the outputs:
# training rows (int32 + int8 + int64), the sidecar (float32 + bool), and some slack for offsets and rejected rows.
DATA_BYTES_PER_TOKEN = 16.5
OUTPUT_BYTES_PER_TOKEN = 19.0
DISK_MARGIN = 3 * 2**30


def parse_sizes(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def label(n: int) -> str:
    exponent = len(str(n)) - 1
    return f"1e{exponent}" if n == 10**exponent else str(n)


# ---------------------------------------------------------------- measuring a child process


def _status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of `pid` in KiB, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
        match = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            fields[name] = int(match.group(1))
    return fields


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


class Sampler(threading.Thread):
    """Samples /proc/PID/status of the measured process (the child of GNU time, if it wraps it) every `every`
    seconds: the peaks of RssAnon and RssFile and a timeline of (seconds, VmRSS MiB, RssAnon MiB)."""

    def __init__(self, pid: int, wrapped: bool, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.wrapped, self.every = pid, wrapped, every
        self.stop = threading.Event()
        self.timeline: list[tuple[float, float, float]] = []
        self.peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self.started = time.perf_counter()

    def run(self) -> None:
        target = None
        while not self.stop.is_set():
            if target is None:
                target = _child_of(self.pid) if self.wrapped else self.pid
            if target is not None:
                status = _status(target)
                if status:
                    for name in self.peaks:
                        self.peaks[name] = max(self.peaks[name], status.get(name, 0))
                    self.timeline.append((round(time.perf_counter() - self.started, 2),
                                          round(status.get("VmRSS", 0) / 1024, 1),
                                          round(status.get("RssAnon", 0) / 1024, 1)))
            self.stop.wait(self.every)

    def summary(self, points: int = 300) -> dict[str, Any]:
        step = max(1, len(self.timeline) // points)
        return {"sampled_peak_rss_mib": round(self.peaks["VmRSS"] / 1024, 1),
                "sampled_peak_anon_mib": round(self.peaks["RssAnon"] / 1024, 1),
                "sampled_peak_file_mib": round(self.peaks["RssFile"] / 1024, 1),
                "timeline_s_rss_anon_mib": self.timeline[::step]}


def _parse_gnu_time(text: str) -> dict[str, Any]:
    def field(name: str) -> str:
        match = re.search(rf"^\s*{re.escape(name)}: (.*)$", text, re.MULTILINE)
        return match.group(1).strip() if match else ""

    elapsed = [float(part) for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60**i for i, value in enumerate(reversed(elapsed)))
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(int(field("Maximum resident set size (kbytes)")) / 1024, 1),
            "user_s": float(field("User time (seconds)")), "system_s": float(field("System time (seconds)")),
            "major_faults": int(field("Major (requiring I/O) page faults")),
            "fs_inputs": int(field("File system inputs")), "fs_outputs": int(field("File system outputs")),
            "measured_by": "GNU time -v"}


def _cpu_pressure_us() -> int | None:
    """Microseconds in which some runnable task waited for a CPU (PSI), machine-wide: other work on a shared
    machine shows here, and makes the wall seconds of that measurement unreliable."""
    try:
        match = re.search(r"^some .*total=(\d+)", Path("/proc/pressure/cpu").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def measure(command: list[str], log: Path) -> dict[str, Any]:
    """Run `command` to the end; its wall seconds, peak RSS and a sampled RSS timeline. Raises on failure, with
    the tail of its output."""
    wrapped = GNU_TIME.exists()
    report = Path(tempfile.mkstemp(suffix=".time")[1])
    full = [str(GNU_TIME), "-v", "-o", str(report), *command] if wrapped else command
    started, pressure = time.perf_counter(), _cpu_pressure_us()
    with log.open("w") as sink:
        process = subprocess.Popen(full, stdout=sink, stderr=subprocess.STDOUT)
        sampler = Sampler(process.pid, wrapped)
        sampler.start()
        if wrapped:
            returncode = process.wait()
            usage = None
        else:
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    stalled = _cpu_pressure_us()
    stalled_share = None if pressure is None or stalled is None else round((stalled - pressure) / 1e6 / wall, 3)
    sampler.stop.set()
    sampler.join()
    if returncode != 0:
        tail = log.read_text()[-6000:]
        report.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command)} exited with {returncode}:\n{tail}")
    if wrapped:
        result = _parse_gnu_time(report.read_text())
    else:
        result = {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                  "user_s": usage.ru_utime, "system_s": usage.ru_stime, "major_faults": usage.ru_majflt,
                  "measured_by": "os.wait4 rusage"}
    report.unlink(missing_ok=True)
    return result | {"cpu_pressure_some_share": stalled_share} | sampler.summary()


def _disk_free(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _merge_results(path: Path, entries: list[dict[str, Any]], key: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Merge `entries` into the results file by `key` (a re-measured size replaces the older entry)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    by_size = {entry[key]: entry for entry in old.get("results", [])}
    by_size |= {entry[key]: entry for entry in entries}
    result = {**old, **meta, "results": [by_size[n] for n in sorted(by_size)]}
    ok = [entry for entry in result["results"] if "peak_rss_mib" in entry]
    if len(ok) >= 2:
        low, high = ok[0]["peak_rss_mib"], ok[-1]["peak_rss_mib"]
        result["peak_rss_ratio_largest_over_smallest"] = round(high / low, 3)
        result["flat_within_20_percent"] = bool(max(e["peak_rss_mib"] for e in ok) <= 1.2 * min(e["peak_rss_mib"]
                                                                                             for e in ok))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _machine() -> dict[str, Any]:
    import platform

    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return {"cpus": os.cpu_count(), "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
            "python": platform.python_version(), "machine": platform.machine()}


# ---------------------------------------------------------------- part A: a synthetic scored run


def synthetic_shard(shard: int, start: int, stop: int) -> dict[str, Any]:
    """The token table and both roles' score tables of shard `shard` (rows start..stop), from a seed of its own:
    a shard's content does not depend on N."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng([SEED, shard])
    rows = stop - start
    lengths = rng.integers(ROW_MIN, ROW_MAX + 1, rows)
    prompt = rng.integers(8, lengths // 2 + 1)
    no_response = rng.random(rows) < 0.005
    prompt = np.where(no_response, lengths, prompt)
    truncated = rng.random(rows) < 0.01
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = rng.integers(0, VOCAB, total, dtype=np.int32)
    starts = np.repeat(offsets[:-1], lengths)
    position = np.arange(total, dtype=np.int64) - starts
    response = position >= np.repeat(prompt, lengths)
    del starts
    labels = np.where(response, ids, np.int32(-100)).astype(np.int32)
    offsets32 = pa.array(offsets.astype(np.int32))
    row = pa.array(np.arange(start, stop, dtype=np.int64))
    tokens = pa.table({"row": row,
                       "input_ids": pa.ListArray.from_arrays(offsets32, pa.array(ids)),
                       "labels": pa.ListArray.from_arrays(offsets32, pa.array(labels)),
                       "truncated": pa.array(truncated, pa.bool_())})
    scored = response & (position > 0)
    scores = {}
    for role in ("safety", "utility"):
        nll = rng.standard_exponential(total, dtype=np.float32) * np.float32(2.0)
        tie = rng.random(total, dtype=np.float32) < 0.3
        nll[tie] = np.round(nll[tie] * 8) / 8
        nll[~scored] = np.nan
        scores[role] = pa.table({"row": row, "nll": pa.ListArray.from_arrays(offsets32, pa.array(nll))})
    return {"tokens": tokens, "scores": scores, "rows": rows, "total": total,
            "response_tokens": int(response.sum()), "longest_row": int(lengths.max(initial=0)),
            "truncated_rows": int(truncated.sum())}


def synthetic_run(n: int, shard_rows: int, work: Path) -> tuple[Path, dict[str, Any]]:
    """A complete synthetic scored run directory of about `n` tokens under `work` (reused when complete, resumed
    shard by shard when partial); returns (run dir, what was generated)."""
    from toss_filter.plan import ShardPlan, write_table
    from toss_filter.run import RunDir
    from toss_filter.fingerprint import content_key, tokens_digest

    root = work / f"data-{label(n)}-r{shard_rows}"
    run = RunDir(root / "run")
    gen = root / "gen"
    plan = ShardPlan(shard_rows, max(1, round(n / ((ROW_MIN + ROW_MAX) / 2))))
    tokens_key = content_key({"synthetic": "scale_rss-v1", "seed": SEED, "rows": plan.rows, "shard_rows": shard_rows})
    if (run.path / "run.json").exists() and run.tokens_manifest(tokens_key) is not None:
        state = run.read_json("run.json")
        print(f"[{label(n)}] synthetic run directory complete: {run.path} ({state['shards']} shards, "
              f"{state['tokens']:,} tokens)", flush=True)
        return run.path, {"generated_s": None, "reused": True}
    gen.mkdir(parents=True, exist_ok=True)
    score_key = content_key({"synthetic-scores": "scale_rss-v1", "tokens_key": tokens_key})
    started = time.perf_counter()
    summaries = []
    for shard in range(plan.shards):
        summary_file = gen / f"shard-{shard:05d}.json"
        files = [run.token_shard(tokens_key, shard)] + [run.score_shard(score_key, role, shard)
                                                         for role in ("safety", "utility")]
        if summary_file.exists() and all(f.exists() for f in files):
            summaries.append(json.loads(summary_file.read_text()))
            continue
        span = plan.span(shard)
        data = synthetic_shard(shard, span.start, span.stop)
        for role, table in data["scores"].items():
            run.score_shard(score_key, role, shard).parent.mkdir(parents=True, exist_ok=True)
            write_table(run.score_shard(score_key, role, shard), table)
        run.tokens_dir(tokens_key).mkdir(parents=True, exist_ok=True)
        write_table(run.token_shard(tokens_key, shard), data["tokens"])
        summary = {"digest": tokens_digest(data["tokens"]), "rows": data["rows"], "tokens": data["total"],
                   **{k: data[k] for k in ("response_tokens", "longest_row", "truncated_rows")}}
        summary_file.write_text(json.dumps(summary))
        summaries.append(summary)
        del data
        if shard % 25 == 0 or shard == plan.shards - 1:
            done = sum(s["tokens"] for s in summaries)
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"[{label(n)}] generated shard {shard + 1}/{plan.shards}: {done:,} tokens "
                  f"({rate / 1e6:.1f} M tokens/s)", flush=True)
    digests = [s["digest"] for s in summaries]
    manifest = {
        "rows": sum(s["rows"] for s in summaries), "shards": len(summaries), "shard_rows": shard_rows,
        **{field: sum(s[field] for s in summaries) for field in ("tokens", "response_tokens", "truncated_rows")},
        "longest_row": max(s["longest_row"] for s in summaries),
        "digests": digests, "digest": hashlib.sha256("".join(digests).encode()).hexdigest(),
    }
    (run.tokens_dir(tokens_key) / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    key_payload = {"tokens_digest": manifest["digest"], "models": {"safety": "synthetic", "utility": "synthetic"},
                   "bases": {"safety": None, "utility": None}, "backend": "synthetic", "dtype": "torch.float32"}
    (run.scores_dir(score_key) / "key.json").write_text(json.dumps(key_payload, indent=1) + "\n")
    models = {role: {"path": f"synthetic-{role}", "kind": "full-model"} for role in ("safety", "utility")}
    run.write_json("run.json", {
        "tokens_key": tokens_key, "score_key": score_key, "shard_rows": shard_rows, "rows": plan.rows,
        "shards": plan.shards, "tokens": manifest["tokens"], "resumed_shards": 0,
        "input": f"synthetic:scale_rss:{plan.rows}", "template": "synthetic", "models": models | {"shared_base": False},
        "score_config": {"input": f"synthetic:scale_rss:{plan.rows}", "shard_rows": shard_rows, "synthetic": True},
        "device": "cpu", "dtype": "torch.float32", "scorer": None,
        "provenance": {"executor": "synthetic (bench/scale_rss.py)", "shard_slice": "0/1"},
        "timings": {"tokenize_s": 0.0, "load_models_s": None, "score_s": 0.0, "model_tokens_scored_this_run": 0,
                    "model_tokens_per_s": None},
    })
    generated = time.perf_counter() - started
    print(f"[{label(n)}] synthetic run directory written in {generated:.0f} s: {run.path}", flush=True)
    return run.path, {"generated_s": round(generated, 1), "reused": False}


def _remove_outputs(run_dir: Path, out: Path) -> None:
    for path in (out, out.with_name(out.name + "-rejected"), run_dir / "token_scores", run_dir / "select"):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def part_a(sizes: list[int], shard_rows: int, work: Path, delete_data: bool) -> None:
    entries = []
    for n in sizes:
        root = work / f"data-{label(n)}-r{shard_rows}"
        complete = (root / "run" / "run.json").exists()
        need = (0 if complete else max(0, n * DATA_BYTES_PER_TOKEN - _du(root))) + n * OUTPUT_BYTES_PER_TOKEN
        free = _disk_free(work)
        if free < need + DISK_MARGIN:
            print(f"[{label(n)}] STOP: {need / 2**30:.1f} GiB needed (+{DISK_MARGIN / 2**30:.0f} GiB margin), "
                  f"{free / 2**30:.1f} GiB free under {work}; delete older synthetic dirs there (data-*) or "
                  "pass --delete-data", flush=True)
            entries.append({"tokens_target": n, "error": f"not enough disk: {need / 2**30:.1f} GiB needed, "
                                                          f"{free / 2**30:.1f} GiB free"})
            break
        run_dir, generated = synthetic_run(n, shard_rows, work)
        state = json.loads((run_dir / "run.json").read_text())
        out = root / "out"
        _remove_outputs(run_dir, out)
        command = [str(BIN / "toss-filter"), "select", "--run-dir", str(run_dir), "--output", str(out),
                   "--no-report", "-q"]
        print(f"[{label(n)}] {' '.join(command)}", flush=True)
        entry: dict[str, Any] = {"tokens_target": n, "tokens": state["tokens"], "rows": state["rows"],
                                 "shards": state["shards"], "shard_rows": shard_rows,
                                 "tokens_per_shard": round(state["tokens"] / state["shards"]),
                                 "command": " ".join(command), **generated,
                                 "started_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            entry |= measure(command, root / "select.log")
        except RuntimeError as error:
            print(f"[{label(n)}] FAILED: {error}", flush=True)
            entry["error"] = str(error)
            entries.append(entry)
            break
        stats = json.loads((run_dir / "stats.json").read_text())
        entry["output_bytes"] = _du(out) + _du(out.with_name(out.name + "-rejected")) + _du(run_dir / "token_scores")
        entry["s_per_1e8_tokens"] = round(entry["wall_s"] / state["tokens"] * 1e8, 2)
        entry["select_s"], entry["write_s"] = stats["timings"]["select_s"], stats["timings"]["write_s"]
        entry["in_process_s_per_1e8_tokens"] = round((entry["select_s"] + entry["write_s"]) / state["tokens"] * 1e8, 2)
        entry["stats"] = {k: stats[k] for k in ("rows_in", "rows_out", "rows_rejected", "response_tokens",
                                                "scored_tokens", "masked_tokens", "masked_share", "score_cutoff")}
        entry["stats"]["selection_passes"] = stats["selection"]["selection_passes"]
        entries.append(entry)
        print(f"[{label(n)}] wall {entry['wall_s']} s, peak RSS {entry['peak_rss_mib']} MiB (anon "
              f"{entry['sampled_peak_anon_mib']}, file {entry['sampled_peak_file_mib']}), select "
              f"{entry['select_s']} s + write {entry['write_s']} s", flush=True)
        _remove_outputs(run_dir, out)
        if delete_data:
            shutil.rmtree(root)
        # merged after every size, so a long run that is stopped keeps what it measured
        _merge_results(RESULTS / "scale_rss.json", entries, "tokens_target", _meta_a(shard_rows, work))
    result = _merge_results(RESULTS / "scale_rss.json", entries, "tokens_target", _meta_a(shard_rows, work))
    print(table_a(result))


def _meta_a(shard_rows: int, work: Path) -> dict[str, Any]:
    return {"what": "toss-filter select + write over a synthetic scored run directory (bench/scale_rss.py part A)",
            "shard_rows": shard_rows, "row_tokens": [ROW_MIN, ROW_MAX], "work": str(work), "machine": _machine()}


def flatness(result: dict[str, Any]) -> list[str]:
    """The table's footer: how much peak RSS grew from the smallest N to the largest."""
    if "peak_rss_ratio_largest_over_smallest" not in result:
        return []
    return [f"\npeak RSS largest/smallest N: {result['peak_rss_ratio_largest_over_smallest']}; flat within 20%: "
            f"{result['flat_within_20_percent']}"]


def table_a(result: dict[str, Any]) -> str:
    lines = ["| N tokens | shards | wall s | peak RSS MiB | s per 10^8 tokens | in-process select + write s | "
             "in-process s per 10^8 tokens | CPU pressure |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in result["results"]:
        if "peak_rss_mib" in e:
            lines.append(f"| {e['tokens']:,} | {e['shards']} | {e['wall_s']:.1f} | {e['peak_rss_mib']:.0f} | "
                         f"{e['s_per_1e8_tokens']:.1f} | {e['select_s']:.1f} + {e['write_s']:.1f} | "
                         f"{e['in_process_s_per_1e8_tokens']:.1f} | {e.get('cpu_pressure_some_share')} |")
        else:
            lines.append(f"| {e['tokens_target']:,} | - | - | - | - | - | - | - ({e.get('error', '').splitlines()[0][:80]}) |")
    return "\n".join(lines + flatness(result))


# ---------------------------------------------------------------- part B: the whole pipeline, tiny model

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might "
         "us great old year off come since against go came right used take three water small place found home "
         "house light answer question model safety data train token score write read system value number simple "
         "reason mind story example result change follow around animal point mother country school father keep "
         "tree start city earth eye head night river").split()


def build_tiny_models(root: Path) -> dict[str, Path]:
    """A tiny random Llama with SmolLM2's tokenizer and two LoRA adapters on it (tests/conftest.py's fixtures)."""
    paths = {name: root / name for name in ("base", "safety", "utility")}
    if all((paths[name] / ("config.json" if name == "base" else "adapter_config.json")).exists() for name in paths):
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from toss_filter.default_model import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )).save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for seed, role in enumerate(("safety", "utility"), start=1):
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(paths["base"])
        adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
        adapter.peft_config["default"].base_model_name_or_path = str(paths["base"])
        adapter.save_pretrained(paths[role])
    return paths


def _chat_row(rng: Any) -> dict[str, Any]:
    def text(words: int) -> str:
        chosen = rng.choice(len(WORDS), words)
        sentence = " ".join(WORDS[i] for i in chosen)
        return sentence[0].upper() + sentence[1:] + "."

    return {"messages": [{"role": "user", "content": text(int(rng.integers(30, 120)))},
                         {"role": "assistant", "content": text(int(rng.integers(140, 340)))}]}


def chat_jsonl(n: int, base: Path, path: Path) -> dict[str, Any]:
    """Synthetic chat rows, enough for about `n` tokens under the chat template (calibrated on 200 rows)."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    sample_rng = np.random.default_rng(SEED + 1)
    sample = [_chat_row(sample_rng) for _ in range(200)]
    per_row = float(np.mean([len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False),
                                           add_special_tokens=False)["input_ids"]) for r in sample]))
    rows = max(1, round(n / per_row))
    if not path.exists() or sum(1 for _ in path.open()) != rows:
        rng = np.random.default_rng(SEED)
        with path.open("w", encoding="utf-8") as sink:
            for _ in range(rows):
                sink.write(json.dumps(_chat_row(rng)) + "\n")
    return {"rows": rows, "calibrated_tokens_per_row": round(per_row, 1)}


def part_b(sizes: list[int], shard_rows: int, work: Path) -> None:
    root = work / "pipeline"
    root.mkdir(parents=True, exist_ok=True)
    models = build_tiny_models(root / "models")
    entries = []
    for n in sizes:
        data = root / f"chat-{label(n)}.jsonl"
        made = chat_jsonl(n, models["base"], data)
        out, run_dir = root / f"out-{label(n)}", root / f"out-{label(n)}-run"
        for path in (out, out.with_name(out.name + "-rejected"), run_dir):
            shutil.rmtree(path, ignore_errors=True)
        command = [str(BIN / "toss-filter"), "filter", str(data), "--safety-model", str(models["safety"]),
                   "--utility-model", str(models["utility"]), "-o", str(out), "--run-dir", str(run_dir),
                   "--no-report", "-q", "--shard-rows", str(shard_rows)]
        print(f"[pipeline {label(n)}] {made['rows']} rows; {' '.join(command)}", flush=True)
        entry: dict[str, Any] = {"tokens_target": n, **made, "shard_rows": shard_rows, "command": " ".join(command),
                                 "started_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            entry |= measure(command, root / f"filter-{label(n)}.log")
        except RuntimeError as error:
            print(f"[pipeline {label(n)}] FAILED: {error}", flush=True)
            entries.append(entry | {"error": str(error)})
            break
        state = json.loads((run_dir / "run.json").read_text())
        stats = json.loads((run_dir / "stats.json").read_text())
        entry |= {"tokens": state["tokens"], "shards": state["shards"], "timings": stats["timings"],
                  "s_per_1e6_tokens": round(entry["wall_s"] / state["tokens"] * 1e6, 1),
                  "masked_share": stats["masked_share"]}
        entries.append(entry)
        print(f"[pipeline {label(n)}] {state['tokens']:,} tokens: wall {entry['wall_s']} s, peak RSS "
              f"{entry['peak_rss_mib']} MiB", flush=True)
        for path in (out, out.with_name(out.name + "-rejected"), run_dir):
            shutil.rmtree(path, ignore_errors=True)
        _merge_results(RESULTS / "scale_rss_pipeline.json", entries, "tokens_target", _meta_b(shard_rows))
    result = _merge_results(RESULTS / "scale_rss_pipeline.json", entries, "tokens_target", _meta_b(shard_rows))
    print(table_b(result))


def _meta_b(shard_rows: int) -> dict[str, Any]:
    return {"what": "toss-filter filter end to end, tiny random Llama (hidden 32, 2 layers) + two LoRA adapters, "
                    "torch on CPU (bench/scale_rss.py part B)", "shard_rows": shard_rows, "machine": _machine()}


def table_b(result: dict[str, Any]) -> str:
    lines = ["| N tokens | rows | shards | wall s | peak RSS MiB | score s | model tokens/s | s per 10^6 tokens | "
             "CPU pressure |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in result["results"]:
        if "peak_rss_mib" in e:
            t = e["timings"]
            lines.append(f"| {e['tokens']:,} | {e['rows']} | {e['shards']} | {e['wall_s']:.1f} | "
                         f"{e['peak_rss_mib']:.0f} | {t['score_s']:.1f} | {t['model_tokens_per_s']} | "
                         f"{e['s_per_1e6_tokens']:.1f} | {e.get('cpu_pressure_some_share')} |")
        else:
            lines.append(f"| {e['tokens_target']:,} | - | - | - | - | - | - | - | - (failed) |")
    return "\n".join(lines + flatness(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--sizes", default="1e6,1e7,1e8,1e9", help="part A: tokens per synthetic run directory")
    parser.add_argument("--shard-rows", type=int, default=2000, help="part A: rows per shard (~500 tokens a row)")
    parser.add_argument("--pipeline-sizes", default="1e5,1e6", help="part B: tokens of chat data (1e7: ~1 hour)")
    parser.add_argument("--pipeline-shard-rows", type=int, default=256, help="part B: --shard-rows of filter")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"), help="where the data goes (not the repo)")
    parser.add_argument("--delete-data", action="store_true", help="part A: delete each synthetic run dir after use")
    parser.add_argument("--generate-only", action="store_true", help="part A: write the synthetic run dirs only")
    parser.add_argument("--table", action="store_true", help="print the tables of the saved results and exit")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.table:
        for name, table in (("scale_rss.json", table_a), ("scale_rss_pipeline.json", table_b)):
            if (RESULTS / name).exists():
                print(table(json.loads((RESULTS / name).read_text())) + "\n")
        return
    work = args.work.resolve()
    if work == REPO or REPO in work.parents:
        parser.error(f"--work {work} is inside the repository: put it elsewhere (it holds gigabytes)")
    if args.generate_only:
        for n in parse_sizes(args.sizes):
            synthetic_run(n, args.shard_rows, work)
        return
    if args.part in ("a", "both"):
        part_a(parse_sizes(args.sizes), args.shard_rows, work, args.delete_data)
    if args.part in ("b", "both"):
        part_b(parse_sizes(args.pipeline_sizes), args.pipeline_shard_rows, work)


if __name__ == "__main__":
    main()
