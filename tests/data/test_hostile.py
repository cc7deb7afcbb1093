"""Hostile input files through the real CLI (a subprocess, as a user runs it): each case ends in one line on stderr
naming the file, the row and the field, exit code 2 and no output, or is handled; and `--skip-invalid` /
`--max-invalid`, which send bad rows to OUTPUT-rejected instead of stopping the run.

A subprocess spends most of its seconds importing torch, so the module's CLI cases run two at a time as soon as
the module starts (`cli_runs`), and each test waits for its own."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, assistant, chat, user, write_jsonl
from toss_filter.data.load import count_rows, iter_conversations, load_conversations, read_records
from toss_filter.data.tokenize import ChatFormat, ConversationTokenizer, resolve_format
from toss_filter.errors import ConfigError, InputError

ERROR_PREFIX = "toss-filter: error: "
GOOD = [chat("Hi", "Hello there."), chat("What is 2+2?", "It is 4."), chat("Name a colour.", "Blue."),
        chat("Say yes.", "Yes.")]
# A chat template whose own raise_exception refuses one conversation (as templates refuse e.g. a system turn).
REFUSING_TEMPLATE = (
    "{% for message in messages %}{% if 'forbidden' in message['content'] %}"
    "{{ raise_exception('this template does not take forbidden words') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
)
TEN_THOUSAND_TURNS = [turn for i in range(5000) for turn in (user(f"question {i}"), assistant(f"answer {i}"))]


def cli(directory: Path, data: Path, models: dict, *options: str) -> subprocess.CompletedProcess:
    """`python -m toss_filter.cli filter DATA ... --output DIRECTORY/out --device cpu --no-report`."""
    args = [sys.executable, "-m", "toss_filter.cli", "filter", str(data), "--safety-model", str(models["safety"]),
            "--utility-model", str(models["utility"]), "--output", str(directory / "out"), "--device", "cpu",
            "--no-report", "--quiet", *options]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    environment.pop("TOSS_FILTER_MAX_ROW_BYTES", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=environment, cwd=directory)


@dataclass
class CliRun:
    directory: Path  # OUTPUT is directory/out
    data: Path
    done: subprocess.CompletedProcess
    seconds: float


# case name → (a function that writes its input into a directory and returns (input, options), the tests that
# read its run)
CLI_CASES: dict[str, tuple[Callable[[Path], tuple[Path, tuple[str, ...]]], tuple[str, ...]]] = {}


def cli_case(*tests: str) -> Callable:
    def register(build: Callable) -> Callable:
        CLI_CASES[build.__name__] = (build, tests)
        return build
    return register


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory, tiny_models) -> Callable[[str], CliRun]:
    """Starts the CLI cases of the selected tests of this module, two subprocesses at a time; `cli_runs(case)`
    waits for that case's run."""
    selected = {item.originalname for item in request.session.items if item.module.__name__ == __name__}
    root = tmp_path_factory.mktemp("cli")

    def run(name: str) -> CliRun:
        directory = root / name
        directory.mkdir()
        data, options = CLI_CASES[name][0](directory)
        started = time.perf_counter()
        done = cli(directory, data, tiny_models, *options)
        return CliRun(directory, data, done, time.perf_counter() - started)

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(run, name) for name, (_, tests) in CLI_CASES.items() if selected & set(tests)}
    yield lambda name: futures[name].result()
    pool.shutdown(cancel_futures=True)


def assert_one_error(run: CliRun, *expected: str) -> str:
    """Exit 2, stderr exactly one line (starting with the file), no traceback, no OUTPUT nor OUTPUT-rejected."""
    done = run.done
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{ERROR_PREFIX}{run.data}: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not (run.directory / "out").exists() and not (run.directory / "out-rejected").exists()
    assert not (run.directory / "out-run" / "stats.json").exists()
    return lines[0]


def assert_success(run: CliRun) -> dict:
    assert run.done.returncode == 0, run.done.stderr[-3000:]
    return json.loads((run.directory / "out-run" / "stats.json").read_text())


def template_file(directory: Path) -> Path:
    path = directory / "refusing.jinja"
    path.write_text(REFUSING_TEMPLATE, encoding="utf-8")
    return path


# -------------------------------------------------------------------------------- each hostile case, by the CLI


@cli_case("test_lone_surrogate_names_row_and_field")
def lone_surrogate(directory: Path) -> tuple[Path, tuple[str, ...]]:
    data = write_jsonl(directory / "data.jsonl", [GOOD[0], chat("q", "half a pair: \ud800.")])
    assert '"half a pair: \\ud800."' in data.read_text(encoding="utf-8")  # as JSON escapes it
    return data, ()


@pytest.mark.slow
@pytest.mark.subprocess
def test_lone_surrogate_names_row_and_field(cli_runs):
    assert_one_error(cli_runs("lone_surrogate"),
                     "row 1: field 'messages[1].content': a lone surrogate U+D800 at character 13")


@cli_case("test_nul_characters_are_text_kept_end_to_end", "test_ten_thousand_turns_through_the_cli")
def handled(directory: Path) -> tuple[Path, tuple[str, ...]]:
    rows = [GOOD[0], chat("nul\u0000here", "a\u0000b\u0000c"), {"messages": TEN_THOUSAND_TURNS}]
    return write_jsonl(directory / "data.jsonl", rows), ("--ratio", "0", "--max-length", "256")


@pytest.mark.slow
@pytest.mark.subprocess
def test_nul_characters_are_text_kept_end_to_end(cli_runs, tokenizer):
    """NUL (`\\u0000`) is a valid character: the row is tokenized with it, scored and written, nothing dropped."""
    import datasets

    run = cli_runs("handled")
    assert assert_success(run)["rows_out"] == 3
    output = datasets.load_from_disk(str(run.directory / "out"))
    assert "nul\x00here" in tokenizer.decode(output[1]["input_ids"])
    assert tokenizer.decode([t for t in output[1]["labels"] if t != -100]).startswith("a\x00b\x00c")


@pytest.mark.slow
@pytest.mark.subprocess
def test_ten_thousand_turns_through_the_cli(cli_runs):
    """A row of 10,000 turns is tokenized whole, then truncated to --max-length: no hang, no crash."""
    stats = assert_success(cli_runs("handled"))
    assert (stats["rows_in"], stats["rows_out"], stats["rows_truncated"]) == (3, 3, 1)


@cli_case("test_invalid_utf8_in_jsonl_names_its_line_and_row")
def invalid_utf8(directory: Path) -> tuple[Path, tuple[str, ...]]:
    data = directory / "data.jsonl"
    # A byte-order mark, a blank line, then a Latin-1 "é" in the third row: rows count non-blank lines.
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\n\n" + json.dumps(GOOD[1]).encode()
                     + b'\n{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n')
    return data, ()


@pytest.mark.slow
@pytest.mark.subprocess
def test_invalid_utf8_in_jsonl_names_its_line_and_row(cli_runs):
    assert_one_error(cli_runs("invalid_utf8"),
                     "row 2: not valid UTF-8 on line 4: byte 0xe9 at byte 47 of the line")


@cli_case("test_gzip_file_named_jsonl")
def gzip_named_jsonl(directory: Path) -> tuple[Path, tuple[str, ...]]:
    data = directory / "data.jsonl"
    data.write_bytes(gzip.compress(b"".join(json.dumps(row).encode() + b"\n" for row in GOOD)))
    return data, ()


@pytest.mark.slow
@pytest.mark.subprocess
def test_gzip_file_named_jsonl(cli_runs):
    line = assert_one_error(cli_runs("gzip_named_jsonl"), "looks like a gzip-compressed file", "1f 8b",
                            "decompress it first, e.g. gzip -dc")
    assert "row" not in line


@cli_case("test_50_mb_line_is_refused_fast")
def huge_line(directory: Path) -> tuple[Path, tuple[str, ...]]:
    data = directory / "data.jsonl"
    with data.open("wb") as handle:
        handle.write(json.dumps(GOOD[0]).encode() + b"\n")
        handle.write(b'{"messages": [{"role": "user", "content": "' + b"x" * (50 * 2**20) + b'"}]}\n')
    return data, ()


@pytest.mark.slow
@pytest.mark.subprocess
def test_50_mb_line_is_refused_fast(cli_runs):
    run = cli_runs("huge_line")
    assert_one_error(run, "row 1: line 2: the row is longer than 16,777,216 bytes", "TOSS_FILTER_MAX_ROW_BYTES")
    assert run.seconds < 120  # mostly imports: the reading itself is timed and measured below


@cli_case("test_template_raise_exception_names_row_and_message")
def template_refuses(directory: Path) -> tuple[Path, tuple[str, ...]]:
    data = write_jsonl(directory / "data.jsonl", [GOOD[0], chat("a forbidden question", "x"), GOOD[1]])
    return data, ("--template", str(template_file(directory)))


@pytest.mark.slow
@pytest.mark.subprocess
def test_template_raise_exception_names_row_and_message(cli_runs):
    assert_one_error(cli_runs("template_refuses"),
                     "row 1: field 'messages': the file:refusing.jinja template refused this conversation: "
                     "this template does not take forbidden words")


# ------------------------------------------------------------------------------ --skip-invalid, --max-invalid

BAD_REASONS = {2: "invalid: not valid UTF-8 on line 3", 3: "invalid: field 'messages[1].content': a lone surrogate",
               5: "invalid: field 'messages': the file:refusing.jinja template refused this conversation"}


def write_mixed(directory: Path) -> Path:
    """Rows 0, 1, 4, 6 good; row 2 not UTF-8 (read), row 3 a lone surrogate (load), row 5 refused by the template
    (tokenize). With --shard-rows 2, shard 1 (rows 2-3) holds no valid row at all."""
    lines = [json.dumps(GOOD[0]).encode(), json.dumps(GOOD[1]).encode(),
             b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}',
             json.dumps(chat("q", "\udc80 alone")).encode(), json.dumps(GOOD[2]).encode(),
             json.dumps(chat("forbidden", "no")).encode(), json.dumps(GOOD[3]).encode()]
    data = directory / "mixed.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    return data


@cli_case("test_skip_invalid_end_to_end")
def skip_invalid(directory: Path) -> tuple[Path, tuple[str, ...]]:
    return write_mixed(directory), ("--skip-invalid", "--template", str(template_file(directory)), "--ratio", "0",
                                    "--shard-rows", "2")


@cli_case("test_skip_invalid_end_to_end")
def good_rows_alone(directory: Path) -> tuple[Path, tuple[str, ...]]:
    return write_jsonl(directory / "good.jsonl", GOOD), ("--template", str(template_file(directory)), "--ratio", "0",
                                                          "--shard-rows", "2")


@pytest.mark.slow
@pytest.mark.subprocess
def test_skip_invalid_end_to_end(cli_runs):
    import datasets

    run = cli_runs("skip_invalid")
    stats = assert_success(run)
    assert (stats["rows_in"], stats["rows_invalid"], stats["rows_out"]) == (7, 3, 4)
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    rejected = datasets.load_from_disk(str(run.directory / "out-rejected"))
    invalid = {r["row"]: r for r in rejected if r["reason"].startswith("invalid: ")}
    assert sorted(invalid) == sorted(BAD_REASONS)
    for row, reason in BAD_REASONS.items():
        assert invalid[row]["reason"].startswith(reason), invalid[row]["reason"]
        assert invalid[row]["input_ids"] == invalid[row]["labels"] == invalid[row]["attention_mask"] == []
    assert rejected["row"] == sorted(rejected["row"])  # input order
    sidecar = datasets.load_from_disk(str(run.directory / "out-run" / "token_scores"))
    assert sidecar["row"] == [0, 1, 4, 6]  # the valid rows keep their input positions

    alone = cli_runs("good_rows_alone")
    assert_success(alone)
    mixed_out = datasets.load_from_disk(str(run.directory / "out"))
    good_out = datasets.load_from_disk(str(alone.directory / "out"))
    assert len(good_out) == len(GOOD)
    assert mixed_out["input_ids"] == good_out["input_ids"] and mixed_out["labels"] == good_out["labels"]


@cli_case("test_max_invalid_stops_at_the_row_over_the_limit")
def max_invalid(directory: Path) -> tuple[Path, tuple[str, ...]]:
    return write_mixed(directory), ("--skip-invalid", "--max-invalid", "1", "--template",
                                    str(template_file(directory)), "--shard-rows", "2")


@pytest.mark.slow
@pytest.mark.subprocess
def test_max_invalid_stops_at_the_row_over_the_limit(cli_runs):
    assert_one_error(cli_runs("max_invalid"),
                     "row 3: field 'messages[1].content': a lone surrogate U+DC80",
                     "(more than --max-invalid 1 invalid rows)")


# ----------------------------------------------------------------------------------------- the same, in-process


def test_invalid_utf8_in_json_list_names_the_row(tmp_path):
    data = tmp_path / "data.json"
    data.write_bytes(b'\xef\xbb\xbf[' + json.dumps(GOOD[0]).encode() + b',\n {"prompt": "caf\xe9", "completion": "x"}]')
    with pytest.raises(InputError) as info:
        list(load_conversations(str(data)))
    assert str(info.value).startswith(f"{data}: row 1: not valid UTF-8: byte 0xe9 at byte ")
    data.write_bytes(b'[' + json.dumps(GOOD[0]).encode() + b']\n\xff')  # after the list: no row to name
    with pytest.raises(InputError) as info:
        list(load_conversations(str(data)))
    assert str(info.value).startswith(f"{data}: not valid UTF-8: byte 0xff at byte ")


def test_a_long_line_is_read_with_bounded_memory_and_the_next_rows_keep_their_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("TOSS_FILTER_MAX_ROW_BYTES", str(2**20))
    data = tmp_path / "data.jsonl"
    with data.open("wb") as handle:
        handle.write(json.dumps(GOOD[0]).encode() + b"\n")
        handle.write(b'{"prompt": "' + b"x" * (50 * 2**20) + b'", "completion": "y"}\n')
        handle.write(json.dumps(GOOD[1]).encode() + b"\n")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        rows = list(iter_conversations(str(data)))
        assert count_rows(str(data)) == 3
        elapsed, peak = time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [row for row, _ in rows] == [0, 1, 2]
    assert isinstance(rows[1][1], InputError) and "longer than 1,048,576 bytes" in rows[1][1].problem
    assert rows[2][1].messages == GOOD[1]["messages"]
    assert peak < 4 * 2**20, peak  # about two capped lines (1 MiB here), never the 50 MB one
    assert elapsed < 10


def test_row_size_limit_from_the_environment(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a" * 200)])
    monkeypatch.setenv("TOSS_FILTER_MAX_ROW_BYTES", "100")
    with pytest.raises(InputError, match="row 0: line 1: the row is longer than 100 bytes"):
        list(load_conversations(str(path)))
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([chat("q", "a" * 200), chat("q", "a")]), encoding="utf-8")
    with pytest.raises(InputError, match="row 0: the row is longer than 100 bytes"):
        list(load_conversations(str(json_path)))
    rows = list(iter_conversations(str(json_path)))  # a row that parsed can be stepped over
    assert isinstance(rows[0][1], InputError) and rows[1][1].messages == chat("q", "a")["messages"]
    monkeypatch.setenv("TOSS_FILTER_MAX_ROW_BYTES", "-1")
    with pytest.raises(ConfigError, match="TOSS_FILTER_MAX_ROW_BYTES must be a positive number"):
        list(load_conversations(str(path)))


def test_row_size_guard_before_tokenizing(tokenizer, monkeypatch):
    """Rows from Parquet or a dataset come as strings already: the tokenizer refuses an over-long one before
    tokenizing it (before rendering it, when its contents alone are too long)."""
    monkeypatch.setenv("TOSS_FILTER_MAX_ROW_BYTES", "1000")
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"), max_length=64)
    assert encode([user("q"), assistant("a" * 800)], "d.parquet", 7).input_ids  # the template adds ~110
    with pytest.raises(InputError) as info:
        encode([user("q"), assistant("a" * 1000)], "d.parquet", 7)
    assert str(info.value).startswith("d.parquet: row 7: field 'messages': the conversation is 1,001 characters long")
    with pytest.raises(InputError, match="the conversation is 1,... characters long, over the limit of 1,000"):
        encode([user("q"), assistant("a" * 950)], "d.parquet", 7)  # refused once rendered


def test_ten_thousand_turns_tokenize_in_seconds(tokenizer):
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"), max_length=256)
    started = time.perf_counter()
    tokens = encode(TEN_THOUSAND_TURNS, "d.jsonl", 0)
    assert time.perf_counter() - started < 5
    assert tokens.truncated and len(tokens.input_ids) == 256
    assert sum(label != -100 for label in tokens.labels) > 0


def test_template_that_does_not_compile_is_a_config_error(tokenizer):
    """Refused when the tokenizer is set up (its probes render the template), before any row is read."""
    with pytest.raises(ConfigError, match="file:bad.jinja template does not compile"):
        ConversationTokenizer(tokenizer, ChatFormat("file:bad.jinja", "{% if %}", False))


@pytest.mark.parametrize("compress, kind", [(bz2.compress, "bzip2"), (lzma.compress, "xz"),
                                            (lambda b: b"\x28\xb5\x2f\xfd" + b, "zstd"),
                                            (lambda b: b"PK\x03\x04" + b, "zip"),
                                            (lambda b: b"\xff\xfe" + b.decode().encode("utf-16-le"), "UTF-16")])
def test_other_compressed_or_binary_files(tmp_path, compress, kind):
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(compress(json.dumps(GOOD[0]).encode() + b"\n"))
        with pytest.raises(InputError) as info:
            list(iter_conversations(str(path)))  # refused as a whole, even when skipping rows
        assert info.value.row is None and kind in str(info.value), str(info.value)


def test_hostile_json_values_are_row_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n" + "1" * 5000 + "\n",
                    encoding="utf-8")
    rows = list(iter_conversations(str(path)))
    assert rows[0][1].messages == GOOD[0]["messages"]
    assert isinstance(rows[1][1], InputError) and rows[1][1].row == 1 and "nested too deeply" in rows[1][1].problem
    assert isinstance(rows[2][1], InputError) and rows[2][1].row == 2 and "broken JSON on line 3" in str(rows[2][1])


def test_counting_rows_skips_blank_lines_across_chunks(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n \n" + b'{"a": "' + b"x" * (3 * 2**20) + b'"}\n\n{"b": 1}\n  \n{"c": 2}')
    assert count_rows(str(path)) == 3
    assert [row for row, _ in read_records(str(path))] == [0, 1, 2]


def test_iter_conversations_yields_errors_in_place(tmp_path):
    data = write_mixed(tmp_path)
    rows = list(iter_conversations(str(data)))
    assert [row for row, _ in rows] == list(range(7))
    assert [row for row, item in rows if isinstance(item, InputError)] == [2, 3]  # row 5 fails only at tokenizing
    with pytest.raises(InputError, match="row 2: not valid UTF-8"):
        list(load_conversations(str(data)))


def test_max_invalid_needs_skip_invalid():
    from toss_filter.config import ScoreConfig

    with pytest.raises(ConfigError, match="--max-invalid only applies with --skip-invalid"):
        ScoreConfig("d.jsonl", "s", "u", "run", max_invalid=3)


def test_tokenize_step_skips_invalid_rows_alike_in_a_pool_and_on_resume(tmp_path, tokenizer):
    from toss_filter.config import ScoreConfig
    from toss_filter.run import RunDir
    from toss_filter.steps.tokenize import read_invalid, tokenize_step, tokens_key

    data = write_mixed(tmp_path)
    encode = ConversationTokenizer(tokenizer, ChatFormat("file:refusing.jinja", REFUSING_TEMPLATE, False))

    def config(run: str, **options) -> ScoreConfig:
        return ScoreConfig(str(data), "s", "u", str(tmp_path / run), shard_rows=2, skip_invalid=True, **options)

    manifests = {}
    for num_proc in (1, 2):
        key, manifests[num_proc] = tokenize_step(config(f"run{num_proc}", num_proc=num_proc), encode,
                                                 RunDir(tmp_path / f"run{num_proc}"), show_progress=False)
    assert manifests[1] == manifests[2]
    assert (manifests[1]["rows"], manifests[1]["invalid_rows"], manifests[1]["shards"]) == (7, 3, 4)
    run = RunDir(tmp_path / "run1")
    assert [read_invalid(run.token_shard(key, s))["row"].to_pylist() for s in range(4)] == [[], [2, 3], [5], []]
    assert run.read_token_shard(key, 1).num_rows == 0
    assert tokens_key(config("run1"), encode) != tokens_key(ScoreConfig(str(data), "s", "u", "r", shard_rows=2), encode)
    # Complete tokens and a lower --max-invalid: still stops, at the first row over it.
    with pytest.raises(InputError, match=r"row 5: field 'messages': .*\(more than --max-invalid 2 invalid rows\)"):
        tokenize_step(config("run1", max_invalid=2), encode, run, show_progress=False)
    assert tokenize_step(config("run1", max_invalid=3), encode, run, show_progress=False)[1] == manifests[1]


def test_every_row_invalid_is_an_error(tmp_path, tokenizer):
    from toss_filter.config import ScoreConfig
    from toss_filter.run import RunDir
    from toss_filter.steps.tokenize import tokenize_step

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, chat("q", "\ud800")])
    encode = ConversationTokenizer(tokenizer, resolve_format(tokenizer, "chat"))
    config = ScoreConfig(str(data), "s", "u", str(tmp_path / "run"), skip_invalid=True)
    with pytest.raises(InputError, match="row 0: no known row shape .* every other row is invalid too"):
        tokenize_step(config, encode, RunDir(tmp_path / "run"), show_progress=False)


def test_a_file_named_parquet_that_is_not_one(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n'))
    with pytest.raises(InputError) as info:
        list(load_conversations(str(path)))
    assert info.value.row is None and "not a readable Parquet file" in str(info.value)
