"""Publish a toss-filter output on the Hugging Face Hub, with a dataset card written from its run directory.

    dataset_card(output, run_dir, repo_id) -> str          the README.md, computed from local files only
    push_output(output, repo_id, run_dir=None, private=False, revision=None, token=None) -> dict

What lands in the dataset repo (branch `revision`, default `main`):
- `data/train-NNNNN-of-NNNNN.parquet`: the output's rows, in order, exactly its three columns, written by
  `datasets.Dataset.push_to_hub` in shards of about SHARD_BYTES of Arrow data at most (counted by the size of the
  output's Arrow files on disk). The output is read memory-mapped, however many Arrow files it has: push_to_hub
  converts one Hub shard at a time;
- `README.md`: `dataset_card(...)`, uploaded in a second commit. It replaces the card `push_to_hub` writes, and
  carries the same `configs` entry (split `train`, files `data/train-*`), so `load_dataset(repo_id)` reads it.

The masked-share-by-position chart is a markdown table, not a picture: a PNG would need matplotlib (not a
dependency) and a second file to keep in step with the card, and a table is exact, renders on the Hub and diffs.

Only the `arrow` output format (a `save_to_disk` directory) can be pushed; the single-file formats are for local
trainers. The token is handed to huggingface_hub and nowhere else: it is not logged, not written, not returned,
and a Hub error message is cut to one line with the token blanked out.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, constants
from huggingface_hub.errors import HFValidationError

from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.errors import ConfigError, TossError
from toss_filter.report import fmt, per_row
from toss_filter.run import COMMIT_FILE, RunDir, ShardFiles, check_output_set, default_run_dir

SPLIT, DATA_DIR = "train", "data"
SHARD_BYTES = 500 * 10**6  # datasets' own default shard size; fixed here so the uploaded file names are known
README = "README.md"
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PAPER = "https://arxiv.org/abs/2603.01185"
# Response positions grouped as the masked share changes most near the start of a response.
BUCKETS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32))
SIZE_CATEGORIES = ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                   (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"))
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
BIBTEX = """@inproceedings{li2026toss,
  title         = {Token-level Data Selection for Safe {LLM} Fine-tuning},
  author        = {Li, Yanping and Liu, Zhening and Li, Zijian and Lin, Zehong and Zhang, Jun},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2603.01185},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2603.01185}
}"""
log = logging.getLogger(__name__)


def dataset_card(output: Path, run_dir: Path, repo_id: str) -> str:
    """The dataset card (README.md) of the arrow output `output`, described from `run_dir`, for the Hub dataset
    `repo_id` ("ORG/NAME").

    Reads `output` (`load_from_disk`: row count and columns) and, in `run_dir`, `stats.json` (required: written by
    `select`), `run.json`, `config.json` (package versions; optional) and `tokens.arrow` (response lengths, to
    weigh the masked share by position). Touches no network: the source's licence is read from its
    `dataset_info.json` for a `save_to_disk` input, or from the README.md already in the local Hub cache for a
    Hub dataset, and is `unknown` otherwise; it is never guessed. Local paths are shown relative as given, or by
    their last part only when absolute, so the card does not publish the user's directory layout.
    The same inputs always give the same text (no timestamps). Raises ConfigError when `repo_id` is not
    ORG/NAME, `output` is not a `save_to_disk` directory, `run_dir` lacks stats.json or tokens.arrow, or the
    stats count another number of rows than `output` holds.
    """
    check_repo_id(repo_id)
    dataset = _load_output(Path(output))
    run = RunDir(run_dir)
    if not (run.path / "stats.json").exists() and not (run.path / COMMIT_FILE).exists():
        raise ConfigError(f"{run.path} holds no stats.json: name the run directory of {output} with --run-dir")
    stats = check_output_set(run)
    if stats.get("rows_out") != len(dataset):
        raise ConfigError(f"{run.path}/stats.json counts {stats.get('rows_out')} output rows but {output} holds "
                          f"{len(dataset)}: this run directory describes another output")
    state = run.read_json("run.json") if (run.path / "run.json").exists() else {}
    versions = (run.read_json("config.json") if (run.path / "config.json").exists() else {}).get("versions") or {}
    score_config = state.get("score_config") or {}
    source = str(stats.get("input") or score_config.get("input") or "")
    split = score_config.get("split")
    hub_source = _is_hub_name(source)
    licence = _source_licence(source, split, hub_source)
    models = stats.get("models") or state.get("models") or {}
    tokenizer = _base_name(models.get("safety") or {}, score_config, "safety")

    metadata = DatasetCardData(
        license=licence or "unknown", pretty_name=repo_id.split("/")[1], task_categories=["text-generation"],
        tags=["toss-filter", "safety", "token-level-masking", "pre-tokenized"],
        size_categories=[_size_category(len(dataset))], source_datasets=[source] if hub_source else None,
        configs=[{"config_name": "default", "data_files": [{"split": SPLIT, "path": f"{DATA_DIR}/{SPLIT}-*"}]}],
    )
    sections = [
        f"---\n{metadata.to_yaml()}\n---",
        _intro(repo_id, dataset, stats),
        _method(),
        _selection(stats),
        _models(models, score_config),
        _source(source, split, hub_source, licence, stats),
        _statistics(stats),
        _positions(stats, run),
        _training(repo_id, tokenizer, dataset),
        _provenance(versions, stats),
        f"## Citation\n\n```bibtex\n{BIBTEX}\n```",
    ]
    return "\n\n".join(section.strip("\n") for section in sections) + "\n"


def push_output(output: Path, repo_id: str, run_dir: Path | None = None, private: bool = False,
                revision: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Push the arrow output `output` to the Hub dataset `repo_id`, then its card as README.md, both on branch
    `revision` (default `main`; created from main if missing). Returns
    `{"repo_id", "revision", "url", "rows", "files", "created"}`: `files` are the repo paths uploaded (the Parquet
    shards, then README.md), `created` whether this push created the repo.

    `run_dir` defaults to OUTPUT-run. The card is built before anything is uploaded, so a missing run directory
    fails without a half-published repo. `private` applies only when the repo is created (private, or else the
    account's default visibility); for an existing repo with `private=True`, a warning is logged and the
    visibility is left as it is. `token` (default: HF_TOKEN or the saved login) goes to huggingface_hub only.
    Errors: ConfigError for a bad `repo_id`/`output`/`run_dir` (see `dataset_card`) or a repo id the Hub refuses;
    TossError, one line without the token, for anything the Hub or the network answers.
    """
    output = Path(output)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(output)
    card = dataset_card(output, run_dir, repo_id)
    dataset = _load_output(output)
    num_shards = max(1, math.ceil(_data_bytes(output) / SHARD_BYTES))
    files = [f"{DATA_DIR}/{SPLIT}-{i:05d}-of-{num_shards:05d}.parquet" for i in range(num_shards)] + [README]
    try:
        api = HfApi(token=token)
        exists = api.repo_exists(repo_id, repo_type="dataset")
        if exists and private:
            log.warning("%s already exists: --private applies only when the repo is created, so its visibility "
                        "is left as it is (change it in the repo's settings)", repo_id)
        # None, not False: a new repo then takes the account's default visibility, which may be private.
        dataset.push_to_hub(repo_id, split=SPLIT, data_dir=DATA_DIR, private=True if private else None,
                            revision=revision, token=token, num_shards=num_shards)
        api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo=README, repo_id=repo_id,
                        repo_type="dataset", revision=revision, commit_message="Add the toss-filter dataset card")
    except HFValidationError as error:
        raise ConfigError(f"--repo-id {repo_id}: {_one_line(error, token)}") from None
    except _hub_errors() as error:
        # `from None`: the chained exception's text could hold a request's details.
        raise TossError(f"pushing to the Hub dataset {repo_id} failed: {_one_line(error, token)}") from None
    url = f"{api.endpoint}/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")
    return {"repo_id": repo_id, "revision": revision or "main", "url": url, "rows": len(dataset), "files": files,
            "created": not exists}


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What the Hub and the network raise. HfHubHTTPError, a missing login and requests' errors are OSErrors; the
    HTTP clients of huggingface_hub 1.x (httpx) and 2.x (httpx2) raise their own HTTPError, which is not."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _one_line(error: BaseException, token: str | None) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text.replace(token, "***") if token else text


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id):
        raise ConfigError(f"--repo-id must be ORG/NAME (or USER/NAME), got {repo_id!r}")


def _load_output(output: Path) -> datasets.Dataset:
    """The output as a Dataset; only the arrow format (a save_to_disk directory of one dataset) qualifies."""
    if not (output / "state.json").exists():
        raise ConfigError(f"{output} is not an arrow output (a save_to_disk directory): push needs the output of "
                          "`toss-filter filter` or `select` in the default --format arrow")
    # keep_in_memory=False: memory-mapped whatever HF_DATASETS_IN_MEMORY_MAX_SIZE says, one table per data file.
    loaded = datasets.load_from_disk(str(output), keep_in_memory=False)
    if not isinstance(loaded, datasets.Dataset):
        raise ConfigError(f"{output} holds several splits, not one toss-filter output")
    return loaded


def _data_bytes(output: Path) -> int:
    """The size on disk of the output's Arrow data files (those state.json lists), read from the file system:
    nothing of the data is read. It is about the Arrow size datasets would count (IPC adds only a little)."""
    state = json.loads((output / "state.json").read_text(encoding="utf-8"))
    return sum((output / data_file["filename"]).stat().st_size for data_file in state["_data_files"])


def _size_category(rows: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if rows < limit), "1B<n<10B")


def _is_hub_name(source: str) -> bool:
    """Whether `load_conversations` read `source` with `datasets.load_dataset` (the rule of `read_records`):
    not a local path, not path-like, and not named like a data file."""
    if not source or Path(source).expanduser().exists():
        return False
    return not source.startswith((".", "/", "~")) and not source.lower().endswith(DATA_SUFFIXES)


def _source_licence(source: str, split: str | None, hub_source: bool) -> str | None:
    """The licence the source itself declares, or None. Read from local files only; never inferred."""
    if hub_source:
        # The README.md that `load_dataset` downloaded into the Hub cache, if it is still there. datasets fetches
        # it by commit hash, which records no refs/main, so take the newest cached snapshot's.
        snapshots = Path(constants.HF_HUB_CACHE) / f"datasets--{source.replace('/', '--')}" / "snapshots"
        cards = sorted(snapshots.glob(f"*/{README}"), key=lambda card: card.stat().st_mtime)
        if not cards:
            return None
        try:
            declared = DatasetCard.load(cards[-1]).data.license
        except Exception:  # an unreadable cached card only costs the licence, which then reads "unknown"
            return None
    else:
        root = Path(source).expanduser()
        declared = None
        for info in (root / "dataset_info.json", root / (split or SPLIT) / "dataset_info.json"):
            if info.is_file():
                declared = datasets.DatasetInfo.from_directory(str(info.parent)).license
                break
    if isinstance(declared, list):
        declared = ", ".join(str(item) for item in declared)
    return str(declared).strip() if declared and str(declared).strip() else None


def _display(name: str | None, kind: str = "models") -> str:
    """A model (`kind` "models") or data set ("datasets") path as the public card shows it: a Hub id as a link, a
    path in the Hub cache as its Hub id, a local path relative as given or, when absolute or climbing out with
    '..', by its last part only."""
    if not name:
        return "—"
    parts = Path(name).parts
    for part in parts:
        if part.startswith(("models--", "datasets--")):  # huggingface_hub's cache: <kind>s--ORG--NAME/snapshots/
            return _hub_link("/".join(part.split("--")[1:]), kind)
    if _is_hub_name(name) and len(parts) == 2:
        return _hub_link(name, kind)
    return f"{_local(name)} (local)"


def _local(name: str) -> str:
    """A local path, relative as given, or by its last part when absolute or climbing out with '..'."""
    private = Path(name).expanduser().is_absolute() or ".." in Path(name).parts or name.startswith("~")
    return f"`{(Path(name).name if private else name).replace('`', '')}`"


def _hub_link(repo_id: str, kind: str) -> str:
    prefix = "" if kind == "models" else f"{kind}/"
    return f"[`{repo_id}`](https://huggingface.co/{prefix}{repo_id})"


def _base_name(info: dict[str, Any], score_config: dict[str, Any], role: str) -> str | None:
    """The base a reference ran on, named as the user or the adapter named it (not the resolved local copy):
    --base-model, else the adapter's recorded `base_model_name_or_path`, else the resolved base; a full model is
    its own base."""
    if info.get("kind") != "lora-adapter":
        return score_config.get(f"{role}_model") or info.get("path")
    if score_config.get("base_model"):
        return score_config["base_model"]
    adapter_config = Path(str(info.get("path"))) / "adapter_config.json"
    try:
        recorded = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):  # gone or broken since the run: the run's own record names it
        recorded = None
    return recorded or info.get("base")


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {fmt(value)} |" for key, value in rows)


def _intro(repo_id: str, dataset: datasets.Dataset, stats: dict[str, Any]) -> str:
    return (f"# {repo_id}\n\n"
            f"A pre-tokenized fine-tuning set of {fmt(len(dataset))} rows, filtered with **toss-filter**, an "
            f"implementation of TOSS (token-level data selection for safe LLM fine-tuning, [arXiv 2603.01185]({PAPER})). "
            f"{fmt(stats.get('masked_tokens'))} response tokens selected as unsafe ({stats.get('masked_share', 0):.1%} of "
            "the scored response tokens) are kept as context but masked out of the loss.\n\n"
            "Columns (split `train`): `input_ids` (the tokenized conversation, unsafe tokens included), "
            "`attention_mask` (all ones: rows are not padded) and `labels` (unshifted: the token id where the "
            "model learns, -100 on prompt and unsafe tokens). Each label is either its `input_ids` entry or -100.")


def _method() -> str:
    return ("## Method\n\n"
            "TOSS scores every response token *t* with two references fine-tuned from the same base model: a "
            "**safety-degraded** model θs (tuned on harmful answers) and a **utility-oriented** model θu (tuned on "
            "benign task data):\n\n"
            "    S(t) = nll_u(t) − nll_s(t),   nll(t) = −log p(t | prefix)\n\n"
            "A high score means the token is much likelier under the safety-degraded model than under the utility "
            "one. The highest-scoring tokens (see Selection) are unsafe. They stay in `input_ids`, so the model still "
            "reads them as context, but their `labels` are -100: the ignore index of PyTorch's cross-entropy and of "
            "the Hugging Face trainers, so they add no loss and no gradient. Prompt tokens are -100 as well. Rows left "
            "with no trainable token are dropped unless the run kept them (`keep_empty`).")


def _selection(stats: dict[str, Any]) -> str:
    selection = stats.get("selection") or {}
    rows = [(key.replace("_", " "), value) for key, value in selection.items()]
    rows.append(("score cut-off (lowest masked score)", stats.get("score_cutoff")))
    rounds = stats.get("rounds")
    if rounds:
        rows.append(("TOSS-Pro rounds", len(rounds) if isinstance(rounds, list) else rounds))
        rows += [(f"refinement {key.replace('_', ' ')}", value) for key, value in (stats.get("refine") or {}).items()]
    return ("## Selection\n\n`ratio` is the share of all scored response tokens of the dataset that is masked: "
            "k = floor(ratio × N) tokens. `strategy` `toss` (the paper) masks the k highest scores, over the whole "
            "dataset (`scope` `global`, the paper's) or within each row (`per-sample`); `sample`, `first-k` and "
            "`random` are baselines with the same budget. `threshold`, when set, masks every token scored above it "
            "instead.\n\n" + _table(rows))


def _models(models: dict[str, Any], score_config: dict[str, Any]) -> str:
    lines = ["| role | model | kind | base | LoRA rank | target modules |", "|---|---|---|---|---|---|"]
    for role in ("safety", "utility"):
        info = models.get(role) or {}
        adapter = info.get("kind") == "lora-adapter"
        given = score_config.get(f"{role}_model") or info.get("path")
        modules = info.get("target_modules")
        # An adapter is always a local directory (resolve_spec reads its adapter_config.json), even one whose
        # relative path no longer resolves here and so looks like a Hub id.
        shown = f"{_local(given)} (local)" if adapter and given else _display(given)
        lines.append(f"| {role} | {shown} | {info.get('kind', '—')} | "
                     f"{_display(_base_name(info, score_config, role)) if adapter else '—'} | "
                     f"{fmt(info.get('r')) if adapter else '—'} | "
                     f"{', '.join(sorted(map(str, modules))) if isinstance(modules, list) else fmt(modules) if adapter else '—'} |")
    shared = models.get("shared_base")
    note = "" if shared is None else f"\n\nOne copy of the base served both adapters: {fmt(bool(shared))}."
    return ("## Reference models\n\nθs is the `safety` reference and θu the `utility` reference. Local paths are "
            "shown as given on the command line, or by their last part when absolute.\n\n" + "\n".join(lines) + note)


def _source(source: str, split: str | None, hub_source: bool, licence: str | None, stats: dict[str, Any]) -> str:
    if hub_source:
        where = f"the Hub dataset {_display(source, 'datasets')}, split `{split or 'train'}`"
    elif Path(source).expanduser().is_dir():
        where = f"a local `save_to_disk` directory, {_local(source)}"
    else:
        where = f"a local file, {_local(source)}, which is not published here"
    found = (f"`{licence}`, as the source declares it" if licence else
             "**unknown**: toss-filter found no licence declared by the source. Check the source's terms before "
             "using or redistributing this dataset")
    return (f"## Source data\n\n- Source: {where}.\n- Licence of the source: {found}. This dataset is derived from "
            "the source (its text, tokenized and partly masked), so the source's terms apply to it.\n"
            f"- Chat template: `{stats.get('template', '—')}`.")


def _statistics(stats: dict[str, Any]) -> str:
    rows = [("rows in", stats.get("rows_in")), ("rows out (this dataset)", stats.get("rows_out")),
            ("rows dropped (no trainable token left)", stats.get("rows_rejected")),
            ("rows truncated at the maximum length", stats.get("rows_truncated")),
            ("response tokens", stats.get("response_tokens")), ("scored response tokens", stats.get("scored_tokens")),
            ("masked (unsafe) tokens", stats.get("masked_tokens")),
            ("masked share of scored response tokens", f"{stats.get('masked_share', 0):.2%}")]
    return ("## Statistics\n\nCounted over every input row, before rows with no trainable token were dropped.\n\n"
            + _table(rows))


def _positions(stats: dict[str, Any], run: RunDir) -> str:
    """The masked share by response position, in buckets of positions. stats.json holds the share at each of the
    first 32 positions; each is weighted by how many responses reach that position (from the token shards), and the
    rest of the masked tokens fall after position 31."""
    shares = stats.get("masked_share_by_response_position") or []
    files = ShardFiles.current(run)
    lengths = np.concatenate([per_row(shard.labels != IGNORE_INDEX, shard.offsets)
                              for shard in map(files.tokens, range(run.read_json("run.json")["shards"]))])
    counts = np.array([int((lengths > p).sum()) for p in range(len(shares))], dtype=np.int64)
    masked = np.array([(share or 0.0) * count for share, count in zip(shares, counts)])
    buckets = [(f"{lo}" if hi - lo == 1 else f"{lo}–{hi - 1}", counts[lo:hi].sum(), masked[lo:hi].sum())
               for lo, hi in BUCKETS if lo < len(shares)]
    rest = int(stats.get("response_tokens") or 0) - int(counts.sum())
    if rest > 0:
        buckets.append((f"{len(shares)} and later", rest, max(float(stats.get("masked_tokens") or 0) - masked.sum(), 0.0)))
    lines = ["| response positions | tokens | masked share | |", "|---|---:|---:|---|"]
    for label, total, hit in buckets:
        share = hit / total if total else None
        bar = "█" * round(share * 20) if share else ""
        lines.append(f"| {label} | {fmt(int(total))} | {'—' if share is None else f'{share:.1%}'} | {bar} |")
    return ("## Masked share by response position\n\nPosition 0 is the first token of a response; the share is of "
            "all response tokens at those positions, over every input row (one █ is 5%).\n\n" + "\n".join(lines))


def _training(repo_id: str, tokenizer: str | None, dataset: datasets.Dataset) -> str:
    hub_base = bool(tokenizer) and _is_hub_name(tokenizer) and len(Path(tokenizer).parts) == 2
    base = f'"{tokenizer}"' if hub_base else '"BASE"  # the base model the references were tuned from'
    lengths = pc.list_value_length(dataset.data.column("input_ids"))
    longest = int(pc.max(lengths).as_py() or 0) if len(dataset) else 0
    return (f"## Training on it\n\nTrain with the tokenizer the filter ran with, the references' base "
            f"({_display(tokenizer)}): the ids mean nothing under another vocabulary. The longest row has "
            f"{fmt(longest)} tokens; let the trainer's maximum length be at least that, so that it does not cut or "
            "drop rows on its own.\n\n"
            "```python\n"
            "from datasets import load_dataset\n"
            "from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,\n"
            "                          TrainingArguments)\n\n"
            f"BASE = {base}\n"
            f"train = load_dataset(\"{repo_id}\", split=\"train\")  # add revision=\"BRANCH\" for a branch\n"
            "tokenizer = AutoTokenizer.from_pretrained(BASE)\n"
            "model = AutoModelForCausalLM.from_pretrained(BASE)\n"
            "trainer = Trainer(\n"
            "    model=model,\n"
            "    args=TrainingArguments(output_dir=\"ckpt\"),\n"
            "    train_dataset=train,\n"
            "    # pads labels with -100, so the masking survives batching\n"
            "    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),\n"
            ")\n"
            "trainer.train()\n"
            "```\n\n"
            "Keep the `labels` column as it is. **Do not use `DataCollatorForLanguageModeling`**: it overwrites "
            "`labels` with a copy of `input_ids`, which trains on the unsafe tokens again. TRL's `SFTTrainer` keeps "
            "them (tested with TRL 1.16, with and without packing); TRL 1.6 and older rebuild the labels when "
            "packing, which loses the masking.")


def _provenance(versions: dict[str, Any], stats: dict[str, Any]) -> str:
    rows = [(name, version) for name, version in versions.items() if version]
    rows += [("scoring device", stats.get("device")), ("scoring dtype", stats.get("dtype"))]
    return "## Provenance\n\nMade with these package versions:\n\n" + _table(rows)
