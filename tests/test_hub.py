"""Hub publishing, tested at the huggingface_hub boundary: no Hub is reachable from here, and no maintained local
Hub server installs from PyPI (docs/hub.md). `FakeHub` stands in for the HfApi methods that `push_output` and
`Dataset.push_to_hub` call, and for the HfFileSystem that push_to_hub reads the repo through. It keeps every
file's bytes, so the tests read back exactly what would have been uploaded. Any HTTP request that slips past it
fails: offline mode is forced on."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import httpx2
import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest

import toss_filter
import yaml
from datasets import Dataset, DatasetInfo, load_from_disk
from fsspec.implementations.memory import MemoryFileSystem
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from conftest import chat, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset
from toss_filter import hub as toss_hub
from toss_filter.data.write import ShardedDataset
from toss_filter.errors import ConfigError, TossError
from toss_filter.hub import BUCKETS, dataset_card, push_output
from toss_filter.run import RunDir
from toss_filter.arrow import list_column

TOKEN = "hf_TESTtoken0123456789abcdefSECRET"
LONG = " ".join(f"Step {i}: keep going with the explanation." for i in range(12))  # > 32 response tokens
ROWS = [
    chat("What is 2+2?", "Sure, 2+2 is 4."),
    chat("Explain rain in detail.", LONG),
    chat("Name a colour.", "Blue.", system_text="Be brief."),
    chat("Capital of France?", "Paris is the capital of France."),
    chat("Say yes.", "Yes."),
]


def response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("POST", "https://hub.invalid/api"))


class RepoFS(MemoryFileSystem):
    """A memory filesystem of its own (MemoryFileSystem's store is shared by all instances)."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.store, self.pseudo_dirs = {}, [""]


class FakeHub:
    """The repos as {repo_id: {"private": ..., "branches": {name: {path: bytes}}}}, and a record of every call."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple[str, dict]] = []
        self.tokens: set = set()
        self.commits: list[dict] = []
        self.lfs: dict[str, bytes] = {}

    def add_repo(self, repo_id: str, private: bool | None = None) -> None:
        self.repos[repo_id] = {"private": private, "branches": {"main": {".gitattributes": b""}}}

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    def sha(self, repo_id: str, branch: str) -> str:
        files = self.files(repo_id, branch)
        return hashlib.sha1(json.dumps({p: hashlib.sha1(b).hexdigest() for p, b in sorted(files.items())}).encode()).hexdigest()

    def _record(self, api: HfApi, name: str, kwargs: dict) -> None:
        self.tokens.add(kwargs.pop("token", None) or api.token)
        self.calls.append((name, kwargs))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        hub = self

        def repo_exists(api, repo_id, **kwargs):
            hub._record(api, "repo_exists", {"repo_id": repo_id, **kwargs})
            return repo_id in hub.repos

        def repo_info(api, repo_id, **kwargs):
            hub._record(api, "repo_info", {"repo_id": repo_id, **kwargs})
            if repo_id not in hub.repos:
                raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response(404))
            return SimpleNamespace(id=repo_id, sha=hub.sha(repo_id, kwargs.get("revision") or "main"))

        def create_repo(api, repo_id, **kwargs):
            hub._record(api, "create_repo", {"repo_id": repo_id, **kwargs})
            hub.add_repo(repo_id, kwargs.get("private"))
            return SimpleNamespace(repo_id=repo_id)

        def create_branch(api, repo_id, *, branch, **kwargs):
            hub._record(api, "create_branch", {"repo_id": repo_id, "branch": branch, **kwargs})
            branches = hub.repos[repo_id]["branches"]
            branches.setdefault(branch, dict(branches["main"]))

        def preupload_lfs_files(api, repo_id, additions, **kwargs):
            hub._record(api, "preupload_lfs_files", {"repo_id": repo_id, **kwargs})
            for addition in additions:  # datasets deletes the temporary file right after this call
                hub.lfs[addition.upload_info.sha256.hex()] = Path(addition.path_or_fileobj).read_bytes()

        def create_commit(api, repo_id, operations, **kwargs):
            hub._record(api, "create_commit", {"repo_id": repo_id, **kwargs})
            files = hub.files(repo_id, kwargs.get("revision") or "main")
            paths = []
            for operation in operations:
                if isinstance(operation, CommitOperationDelete):
                    files.pop(operation.path_in_repo)
                    continue
                assert isinstance(operation, CommitOperationAdd)
                content = operation.path_or_fileobj
                if not isinstance(content, bytes):
                    content = hub.lfs[operation.upload_info.sha256.hex()]
                assert hashlib.sha256(content).digest() == operation.upload_info.sha256
                files[operation.path_in_repo] = content
                paths.append(operation.path_in_repo)
            hub.commits.append({"revision": kwargs.get("revision"), "paths": paths, "message": kwargs["commit_message"]})
            return SimpleNamespace(commit_url=f"https://hub.invalid/commit/{len(hub.commits)}", oid=str(len(hub.commits)))

        def filesystem(endpoint=None, token=None):
            """HfFileSystem as push_to_hub uses it: files under datasets/REPO@SHA/ (it reads the card and lists the
            old shards at the commit it builds on)."""
            hub.tokens.add(token)
            fs = RepoFS()
            for repo_id, repo in hub.repos.items():
                for branch, files in repo["branches"].items():
                    for path, content in files.items():
                        fs.pipe_file(f"datasets/{repo_id}@{hub.sha(repo_id, branch)}/{path}", content)
            return fs

        for name, method in [("repo_exists", repo_exists), ("repo_info", repo_info), ("create_repo", create_repo),
                             ("create_branch", create_branch), ("preupload_lfs_files", preupload_lfs_files),
                             ("create_commit", create_commit)]:
            monkeypatch.setattr(HfApi, name, method)
        monkeypatch.setattr(datasets.arrow_dataset, "HfFileSystem", filesystem)
        # Anything not faked that tries HTTP fails at once instead of reaching a network.
        monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: True)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, tiny_models) -> tuple[Path, Path]:
    """(output, run_dir) of a real filter run on the tiny models; run_dir is the default OUTPUT-run."""
    root = tmp_path_factory.mktemp("hub")
    data = write_jsonl(root / "data.jsonl", ROWS)
    output, run = root / "out", root / "out-run"
    filter_dataset(ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), str(run)),
                   SelectConfig(str(run), str(output), ratio=0.3), show_progress=False)
    return output, run


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    fake.install(monkeypatch)
    return fake


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def copy_run(run_dir: Path, tmp_path: Path, score_config: dict | None = None, **stats_changes) -> Path:
    """A copy of `run_dir` with stats.json keys replaced, and run.json's score_config updated."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    stats = json.loads((copy / "stats.json").read_text()) | stats_changes
    (copy / "stats.json").write_text(json.dumps(stats))
    state = json.loads((copy / "run.json").read_text())
    state["score_config"] |= score_config or {}
    (copy / "run.json").write_text(json.dumps(state))
    return copy


def parquet_rows(content: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(content)).to_pylist()


# --- the card -------------------------------------------------------------------------------------------------


def test_card_covers_method_selection_models_source_stats_and_training(filtered):
    output, run = filtered
    card = dataset_card(output, run, "org/toss-demo")
    stats = json.loads((run / "stats.json").read_text())
    meta = front_matter(card)
    assert meta["license"] == "unknown"  # a local JSONL declares none, and none is made up
    assert "text-generation" in meta["task_categories"] and {"toss-filter", "safety"} <= set(meta["tags"])
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert "source_datasets" not in meta
    for text in ("labels", "-100", "S(t) = nll_u(t) − nll_s(t)", "@inproceedings{li2026toss", "2603.01185",
                 "| ratio | 0.3 |", "| strategy | toss |", "| scope | global |", "lora-adapter", "q_proj, v_proj",
                 "a local file, `data.jsonl`", f"| rows in | {len(ROWS)} |", f"| rows out (this dataset) | {len(load_from_disk(str(output)))} |",
                 f"| masked (unsafe) tokens | {stats['masked_tokens']:,} |", "DataCollatorForSeq2Seq",
                 "DataCollatorForLanguageModeling", 'load_dataset("org/toss-demo", split="train")',
                 f"| toss-filter | {toss_filter.__version__} |"):
        assert text in card, text
    assert card.count("| lora-adapter | `base` (local) | 4 |") == 2  # both references, with their base
    assert str(output.parent) not in card  # absolute local paths are not published
    assert dataset_card(output, run, "org/toss-demo") == card  # deterministic


def test_card_position_table_matches_the_masks_in_the_sidecar(filtered):
    """Each bucket's share, recomputed from token_scores/ (unsafe) and tokens.arrow (labels), not from stats."""
    output, run = filtered
    card = dataset_card(output, run, "org/toss-demo")
    labels, offsets = list_column(RunDir(run).read_tokens(), "labels")
    unsafe, _ = list_column(load_from_disk(str(run / "token_scores")).data.table, "unsafe")
    position = np.concatenate([np.arange(n) for n in np.bincount(
        np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[labels != -100], minlength=len(offsets) - 1)])
    hits = unsafe.astype(bool)[labels != -100]
    assert position.max() >= 32  # the long row reaches the last bucket
    buckets = [(lo, hi, str(lo) if hi - lo == 1 else f"{lo}–{hi - 1}") for lo, hi in BUCKETS]
    for lo, hi, label in [*buckets, (32, position.max() + 1, "32 and later")]:
        chosen = (position >= lo) & (position < hi)
        assert f"| {label} | {int(chosen.sum()):,} | {hits[chosen].mean():.1%} |" in card, label


def test_card_reads_the_licence_of_a_saved_dataset_input(filtered, tmp_path):
    output, run = filtered
    source = tmp_path / "source"
    Dataset.from_list([{"text": "x"}], info=DatasetInfo(license="mit")).save_to_disk(str(source))
    card = dataset_card(output, copy_run(run, tmp_path, input=str(source)), "org/x")
    assert front_matter(card)["license"] == "mit"
    assert "`mit`, as the source declares it" in card and "a local `save_to_disk` directory, `source`" in card


def test_card_reads_the_licence_of_a_hub_input_from_the_local_cache_only(filtered, tmp_path, monkeypatch):
    output, run = filtered
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    run_copy = copy_run(run, tmp_path, input="someorg/some-data")
    unknown = dataset_card(output, run_copy, "org/x")  # nothing cached: unknown, and no network call
    assert front_matter(unknown)["license"] == "unknown"
    # What `load_dataset` leaves: the card in a snapshot named by commit, with no refs/main.
    snapshot = cache / "datasets--someorg--some-data" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# some data\n")
    card = dataset_card(output, run_copy, "org/x")
    meta = front_matter(card)
    assert meta["license"] == "cc-by-4.0" and meta["source_datasets"] == ["someorg/some-data"]
    assert "[`someorg/some-data`](https://huggingface.co/datasets/someorg/some-data), split `train`" in card


def test_card_names_hub_models_by_their_hub_id_and_trains_with_it(filtered, tmp_path):
    """Full models given as Hub ids and resolved into the Hub cache: the card links the ids, not the cache paths,
    and the training snippet loads the same id. TOSS-Pro rounds are reported."""
    output, run = filtered
    cached = "/root/.cache/huggingface/hub/models--someorg--{}/snapshots/" + "b" * 40
    models = {role: {"path": cached.format(role), "kind": "full-model"} for role in ("safety", "utility")}
    run_copy = copy_run(run, tmp_path, {"safety_model": "someorg/safety", "utility_model": "someorg/utility",
                                        "base_model": None}, models=models | {"shared_base": False},
                        rounds=[{"round": 1}, {"round": 2}], refine={"epochs": 1.0})
    card = dataset_card(output, run_copy, "org/x")
    assert "| safety | [`someorg/safety`](https://huggingface.co/someorg/safety) | full-model | — | — | — |" in card
    assert "| utility | [`someorg/utility`](https://huggingface.co/someorg/utility) | full-model |" in card
    assert 'BASE = "someorg/safety"' in card and "/root/.cache" not in card
    assert "| TOSS-Pro rounds | 2 |" in card and "| refinement epochs | 1 |" in card


@pytest.mark.parametrize("problem", ["repo_id", "no_stats", "not_arrow", "other_output"])
def test_card_refuses_what_it_cannot_describe(filtered, tmp_path, problem):
    output, run = filtered
    repo_id = "not-a-repo-id" if problem == "repo_id" else "org/x"
    if problem == "no_stats":
        run = tmp_path / "empty-run"
        run.mkdir()
    if problem == "not_arrow":
        output = tmp_path / "out.parquet"
        output.write_bytes(b"")
    if problem == "other_output":
        run = copy_run(run, tmp_path, rows_out=999)
    with pytest.raises(ConfigError):
        dataset_card(output, run, repo_id)


# --- the push -------------------------------------------------------------------------------------------------


def test_push_uploads_exactly_the_rows_and_the_card_to_a_new_private_repo_on_a_branch(filtered, hub, caplog):
    output, run = filtered
    caplog.set_level(logging.DEBUG)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = push_output(output, "org/toss-demo", private=True, revision="toss-v1", token=TOKEN)

    created = [kwargs for name, kwargs in hub.calls if name == "create_repo"]
    assert created == [{"repo_id": "org/toss-demo", "repo_type": "dataset", "private": True, "exist_ok": True}]
    assert ("create_branch", {"repo_id": "org/toss-demo", "branch": "toss-v1", "repo_type": "dataset", "exist_ok": True}) in hub.calls
    assert [commit["revision"] for commit in hub.commits] == ["toss-v1", "toss-v1"]  # data, then the card
    assert hub.commits[1]["paths"] == ["README.md"]
    files = hub.files("org/toss-demo", "toss-v1")
    assert hub.files("org/toss-demo", "main") == {".gitattributes": b""}  # main untouched
    assert sorted(files) == [".gitattributes", "README.md", "data/train-00000-of-00001.parquet"]

    expected = load_from_disk(str(output))
    assert parquet_rows(files["data/train-00000-of-00001.parquet"]) == expected.to_list()
    assert files["README.md"] == dataset_card(output, run, "org/toss-demo").encode("utf-8")
    assert result == {"repo_id": "org/toss-demo", "revision": "toss-v1",
                      "url": "https://huggingface.co/datasets/org/toss-demo/tree/toss-v1", "rows": len(expected),
                      "files": ["data/train-00000-of-00001.parquet", "README.md"], "created": True}

    assert hub.tokens == {TOKEN}  # every Hub call authenticated with the given token...
    assert TOKEN not in caplog.text and TOKEN not in repr(result)  # ...which appears nowhere else
    assert all(TOKEN.encode() not in content for content in files.values())
    after = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert after == before  # the run directory is only read


def test_a_multi_file_output_is_pushed_memory_mapped_in_shards_sized_by_its_files(filtered, hub, tmp_path, monkeypatch):
    """An output written shard by shard (three Arrow files, one empty): push_to_hub gets it memory-mapped, file by
    file, never as an in-memory table, and the Hub shard count comes from the files' sizes on disk."""
    output, run = filtered
    table = load_from_disk(str(output)).data.table
    half = table.num_rows // 2
    data = ShardedDataset(tmp_path / "staging", 3, table.schema)
    for shard, (start, rows) in enumerate([(0, half), (half, 0), (half, table.num_rows - half)]):
        data.write(shard, table.slice(start, rows))
    resharded = data.finish(tmp_path / "out")
    on_disk = sum(path.stat().st_size for path in resharded.glob("data-*.arrow"))
    monkeypatch.setattr(toss_hub, "SHARD_BYTES", on_disk // 2 + 1)  # two Hub shards
    seen = []
    real = Dataset.push_to_hub

    def spy(self, *args, **kwargs):
        seen.append({"tables": {type(block).__name__ for blocks in self.data.blocks for block in blocks},
                     "files": len(self.cache_files), "num_shards": kwargs["num_shards"]})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "push_to_hub", spy)
    result = push_output(resharded, "org/multi", run_dir=run, token=TOKEN)
    assert seen == [{"tables": {"MemoryMappedTable"}, "files": 3, "num_shards": 2}]
    shards = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert result["files"] == shards + ["README.md"] and result["rows"] == table.num_rows
    files = hub.files("org/multi")
    assert sorted(files) == [".gitattributes", "README.md", *shards]
    assert [row for shard in shards for row in parquet_rows(files[shard])] == load_from_disk(str(output)).to_list()


def test_pushed_repo_loads_back_with_load_dataset(filtered, hub, tmp_path):
    """The card's `configs` entry is what `load_dataset` reads: a local copy of the repo must load as the output."""
    output, _ = filtered
    push_output(output, "org/toss-demo", token=TOKEN)
    copy = tmp_path / "repo"
    for path, content in hub.files("org/toss-demo").items():
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_bytes(content)
    loaded = datasets.load_dataset(str(copy), split="train")
    expected = load_from_disk(str(output))
    assert loaded.to_list() == expected.to_list() and loaded.features == expected.features


def test_private_is_not_applied_to_an_existing_repo_and_says_so(filtered, hub, caplog):
    output, _ = filtered
    hub.add_repo("org/existing", private=False)
    with caplog.at_level(logging.WARNING, logger="toss_filter.hub"):
        result = push_output(output, "org/existing", private=True, token=TOKEN)
    assert not [name for name, _ in hub.calls if name == "create_repo"]
    assert hub.repos["org/existing"]["private"] is False
    warnings = [record.getMessage() for record in caplog.records if record.name == "toss_filter.hub"]
    assert len(warnings) == 1 and "org/existing already exists" in warnings[0] and TOKEN not in warnings[0]
    assert result["created"] is False and result["revision"] == "main"
    assert hub.files("org/existing")["README.md"].decode("utf-8").startswith("---\n")


def test_public_push_to_an_existing_repo_warns_nothing_and_new_repos_take_the_account_default(filtered, hub, caplog):
    output, _ = filtered
    hub.add_repo("org/existing")
    with caplog.at_level(logging.WARNING, logger="toss_filter.hub"):
        push_output(output, "org/existing", token=TOKEN)
        push_output(output, "org/new", token=TOKEN)
    assert not [record for record in caplog.records if record.name == "toss_filter.hub"]
    assert [kwargs["private"] for name, kwargs in hub.calls if name == "create_repo"] == [None]


def test_hub_and_network_errors_become_one_line_toss_errors_without_the_token(filtered, hub, monkeypatch):
    output, _ = filtered

    def refused(api, repo_id, operations, **kwargs):
        raise HfHubHTTPError(f"401 Client Error: Unauthorized (token {TOKEN} is invalid)\nbody: ...",
                             response=response(401))

    monkeypatch.setattr(HfApi, "create_commit", refused)
    with pytest.raises(TossError) as refusal:
        push_output(output, "org/toss-demo", token=TOKEN)
    assert "401" in str(refusal.value) and "\n" not in str(refusal.value) and TOKEN not in str(refusal.value)
    assert refusal.value.__cause__ is None and refusal.value.__suppress_context__

    def offline(api, repo_id, **kwargs):
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "repo_exists", offline)
    with pytest.raises(TossError, match="Name or service not known"):
        push_output(output, "org/toss-demo", token=TOKEN)


def test_a_missing_run_directory_fails_before_anything_is_uploaded(filtered, hub, tmp_path):
    output, _ = filtered
    with pytest.raises(ConfigError, match="stats.json"):
        push_output(output, "org/toss-demo", run_dir=tmp_path / "nowhere", token=TOKEN)
    assert hub.calls == [] and hub.repos == {}
