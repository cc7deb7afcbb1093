"""`eval-refs`: how well a pair of references tells harmful rows from benign ones, measured through the real
pipeline.

The labelled inputs are concatenated, in order, into OUTPUT/input.jsonl, filtered by `filter_dataset` at the given
ρ (global top-k over all of them, so every group competes for one budget, as in a real custom set), and the run's
per-token sidecar (RUN_DIR/token_scores) is read back. Per row: the masked share of its scored response tokens and
its mean score S. Per group (a value of the label column): the mean of both, and the share of rows that lose more
than half their response tokens. For the positive group against each other group, and against all of them: the
AUROC of the per-row masked share and of the per-row mean score (0.5 = no separation, 1.0 = every positive row
ranks above every other row). Per source within a group (the `source` field up to its first "/" or "#"), the same
masked share and the AUROC of the masked share: a positive source against each other group, another source
against all positive rows, which shows where a pair of references fails. Rows with no scored response token (e.g. cut off by --max-length) are left out of
the metrics and counted.

Out of source first: a row's source is its family (`data/provenance.py`: its `family` field, else its `source` up
to the first "/" or "#"). Each reference's training.json records the families it trained on, its init adapter's
lineage included; a family is out-of-source only when both references record their families and neither holds it
(an adapter without that record makes every family "unknown", never out-of-source). A group is out-of-source when
every one of its rows is. `out_of_source` repeats the comparisons over the out-of-source rows alone (harmful rows of
unseen families against each group's rows of unseen families): the figure that says what masks are worth on a
user's data.

Written to OUTPUT/: input.jsonl, run/ (the run directory; a re-run resumes from it), filtered/ (the masked
output), eval-refs.json (settings, groups, comparisons and every row's values), eval-refs.png (the per-row masked
share and mean score of each group; skipped with a reason when matplotlib is missing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from toss_filter.config import EvalRefsConfig, RefineConfig, ScoreConfig, SelectConfig, as_dict
from toss_filter.data.provenance import UNKNOWN, row_family
from toss_filter.errors import ConfigError, InputError
from toss_filter.files import atomic_write_text

LOSES_HALF = 0.5  # a row "loses more than half" when its masked share is above this


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(a random positive value > a random negative one) + ½ P(equal): the Mann-Whitney U statistic from
    average ranks, so ties count half. None when either side is empty."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    values = np.concatenate([positive, negative]).astype(np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based mean rank of each distinct value
    rank_sum = average_rank[inverse[:len(positive)]].sum()
    return float((rank_sum - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


class LabelledRow(NamedTuple):
    file: str
    row: int  # 0-based, counting the file's non-blank lines
    label: str
    line: str
    source: str = "-"  # the row's source family (data/provenance.row_family), "-" when it names none
    model: str = "-"  # the model that wrote the response, where the row's `model` field says


def read_labels(paths: list[str], label_column: str, source_column: str = "source") -> list[LabelledRow]:
    """Every non-blank line of the JSONL files, in order, with its label and source; a row without a string label
    is an InputError naming the file, row and field."""
    rows = []
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(path, None, None, f"cannot read it: {err}") from None
        for row, line in enumerate(line for line in lines if line.strip()):
            try:
                record = json.loads(line)
                label = record.get(label_column)
            except (ValueError, AttributeError):
                raise InputError(path, row, None, "not a JSON object") from None
            if not isinstance(label, str) or not label:
                raise InputError(path, row, label_column, f"expected a non-empty string label, got {label!r}")
            model = record.get("model")
            rows.append(LabelledRow(path, row, label, line, row_family(record, source_column=source_column) or "-",
                                    model if isinstance(model, str) and model else "-"))
    return rows


def row_metrics(run_dir: str | Path) -> dict[str, np.ndarray]:
    """Per input row, from RUN_DIR/token_scores: `response_tokens` (scored), `masked_share` of them and
    `mean_score` (NaN for a row with no scored response token), indexed by the input's row number."""
    from toss_filter.run import RunDir, ShardFiles, check_output_set

    run = RunDir(run_dir)
    check_output_set(run)
    files = ShardFiles.current(run)
    per_shard = []
    for shard in map(files.sidecar, range(len(run.sidecar_files()))):
        scored = ~np.isnan(shard.score)
        token_row, rows = shard.token_row[scored], len(shard.row_ids)
        count = np.bincount(token_row, minlength=rows)
        masked = np.bincount(token_row, weights=shard.unsafe[scored].astype(np.float64), minlength=rows)
        total = np.bincount(token_row, weights=shard.score[scored].astype(np.float64), minlength=rows)
        per_shard.append((shard.row_ids, count, masked, total))
    size = max((int(ids.max()) + 1 for ids, *_ in per_shard if len(ids)), default=0)
    result = {name: np.full(size, np.nan) for name in ("masked_share", "mean_score")}
    result["response_tokens"] = np.zeros(size, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for ids, count, masked, total in per_shard:
            result["masked_share"][ids], result["mean_score"][ids] = masked / count, total / count
            result["response_tokens"][ids] = count
    return result


def separation(labels: list[str], metrics: dict[str, np.ndarray], positive: str) -> dict[str, Any]:
    """Per group and per comparison of `positive` against each other group and against all of them ("rest"), over
    the rows with a scored response token."""
    labels_array = np.array(labels)
    scored = metrics["response_tokens"][:len(labels)] > 0
    share, score = metrics["masked_share"][:len(labels)], metrics["mean_score"][:len(labels)]
    groups = {}
    for group in sorted(set(labels)):
        chosen = scored & (labels_array == group)
        groups[group] = {
            "rows": int(chosen.sum()), "rows_without_scored_tokens": int(((labels_array == group) & ~scored).sum()),
            "masked_share_mean": _mean(share[chosen]), "mean_score_mean": _mean(score[chosen]),
            "share_losing_over_half": _mean(share[chosen] > LOSES_HALF)}
    is_positive = scored & (labels_array == positive)
    others = {group: scored & (labels_array == group) for group in groups if group != positive}
    others["rest"] = scored & (labels_array != positive)
    comparisons = {group: {
        "rows": int(chosen.sum()), "masked_share_mean": _mean(share[chosen]), "mean_score_mean": _mean(score[chosen]),
        "auroc_masked_share": auroc(share[is_positive], share[chosen]),
        "auroc_mean_score": auroc(score[is_positive], score[chosen]),
        "share_losing_over_half": _mean(share[chosen] > LOSES_HALF)} for group, chosen in others.items()}
    return {"positive": positive, "groups": groups, "comparisons": comparisons}


def by_source(rows: list[LabelledRow], metrics: dict[str, np.ndarray], positive: str,
              trained: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One entry per (label, source), over rows with a scored response token: its rows, the models that wrote
    them, whether the references trained on that source (`in_source`: True, False, or None when unknown) and its
    mean masked share; for a positive source, the AUROC of the masked share against each other group, for another
    source the AUROC of all positive rows against it."""
    labels = np.array([row.label for row in rows])
    sources = np.array([row.source for row in rows])
    scored = metrics["response_tokens"][:len(rows)] > 0
    share = metrics["masked_share"][:len(rows)]
    is_positive = scored & (labels == positive)
    entries = []
    for label, source in sorted({(row.label, row.source) for row in rows}):
        chosen = scored & (labels == label) & (sources == source)
        if label == positive:
            versus = {group: auroc(share[chosen], share[scored & (labels == group)])
                      for group in sorted(set(labels.tolist()) - {positive})}
        else:
            versus = {positive: auroc(share[is_positive], share[chosen])}
        models = sorted({row.model for row in rows if (row.label, row.source) == (label, source)} - {"-"})
        entries.append({"label": label, "source": source, "models": models,
                        "in_source": in_source(source, trained or {UNKNOWN: 0}), "rows": int(chosen.sum()),
                        "masked_share_mean": _mean(share[chosen]), "auroc_masked_share": versus})
    return entries


def in_source(family: str, trained: dict[str, int]) -> bool | None:
    """Whether references that trained on `trained` (rows per family) saw `family`: None when that cannot be known
    (a reference without a family record, a row naming no family)."""
    if family in trained:
        return True
    return None if UNKNOWN in trained or family == "-" else False


def reference_families(safety_model: str, utility_model: str) -> dict[str, dict[str, int]]:
    """Per reference role, rows per family over its whole training lineage; {UNKNOWN: 0} for a model that is not an
    adapter trained by `train-ref` (its data is not known)."""
    from toss_filter.train import trained_families

    return {"safety": trained_families(Path(safety_model)), "utility": trained_families(Path(utility_model))}


def source_standing(rows: list[LabelledRow], trained: dict[str, int]) -> dict[str, Any]:
    """Per group: "out-of-source" when no row's family was trained on, "in-source" when every row's was, else
    "mixed" (or "unknown" when the references' data is not known), and the families in each state."""
    standing = {}
    for group in sorted({row.label for row in rows}):
        states = {row.source: in_source(row.source, trained) for row in rows if row.label == group}
        values = set(states.values())
        standing[group] = {
            "standing": ("unknown" if None in values else "out-of-source" if values == {False}
                         else "in-source" if values == {True} else "mixed"),
            "in_source": sorted(f for f, v in states.items() if v),
            "out_of_source": sorted(f for f, v in states.items() if v is False),
            "unknown": sorted(f for f, v in states.items() if v is None)}
    return standing


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def evaluate_references(config: EvalRefsConfig, show_progress: bool = True,
                        refine: RefineConfig | None = None) -> dict[str, Any]:
    """Filter the concatenated inputs with the references at `config.ratio` (with TOSS-Pro's rounds when
    `refine.rounds > 1`: the separation of the final round's masks) and measure the separation; writes and returns
    eval-refs.json's content (with `plot`: the PNG's path, or `plot_skipped`: why there is none)."""
    from toss_filter.api import filter_dataset

    started = time.perf_counter()
    out = Path(config.output)
    rows = read_labels(config.inputs, config.label_column, config.source_column)
    if config.positive not in {row.label for row in rows}:
        raise ConfigError(f"no row of {', '.join(config.inputs)} has {config.label_column} = {config.positive!r}")
    out.mkdir(parents=True, exist_ok=True)
    combined = out / "input.jsonl"
    text = "".join(row.line + "\n" for row in rows)
    if not combined.exists() or combined.read_text(encoding="utf-8") != text:  # unchanged: the run resumes
        atomic_write_text(combined, text)
    score = ScoreConfig(input=str(combined), run_dir=str(out / "run"), **config.models())
    select = SelectConfig(run_dir=score.run_dir, output=str(out / "filtered"), ratio=config.ratio, keep_empty=True,
                          report=False)
    try:
        stats = filter_dataset(score, select, show_progress=show_progress, refine=refine)
    except InputError as err:  # name the user's file and row, not the concatenation's
        if err.row is None or err.source != str(combined):
            raise
        raise InputError(rows[err.row].file, rows[err.row].row, err.field, err.problem) from None
    metrics = row_metrics(score.run_dir)
    if len(metrics["masked_share"]) != len(rows):
        raise ConfigError(f"{score.run_dir} scored {len(metrics['masked_share'])} rows but the inputs hold {len(rows)}")
    by_role = reference_families(config.safety_model, config.utility_model)
    trained = {family: max(counts.get(family, 0) for counts in by_role.values())
               for family in set().union(*by_role.values())}
    unseen = np.array([in_source(row.source, trained) is False for row in rows])
    # Rows of trained or unknown families are put out of the comparison by giving them no scored token.
    out_of_source = separation([row.label for row in rows], {**metrics, "response_tokens": np.where(
        unseen, metrics["response_tokens"][:len(rows)], 0)}, config.positive) if unseen.any() else None
    result = {"config": as_dict(config), "refine": as_dict(refine) if refine else None,
              "masked_share": stats["masked_share"],
              "scored_tokens": stats["scored_tokens"], "masked_tokens": stats["masked_tokens"],
              "trained_families": by_role, "standing": source_standing(rows, trained),
              "out_of_source": out_of_source,
              **separation([row.label for row in rows], metrics, config.positive),
              "sources": by_source(rows, metrics, config.positive, trained),
              "rows": [{"file": row.file, "row": row.row, "label": row.label, "source": row.source,
                        "model": row.model, "in_source": in_source(row.source, trained),
                        "response_tokens": int(metrics["response_tokens"][i]),
                        "masked_share": _finite(metrics["masked_share"][i]),
                        "mean_score": _finite(metrics["mean_score"][i])}
                       for i, row in enumerate(rows)]}
    result |= write_plot(result, out / "eval-refs.png")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "eval-refs.json", json.dumps(result, indent=1) + "\n")
    return result


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def write_plot(result: dict[str, Any], path: Path) -> dict[str, str]:
    """A PNG of each group's per-row masked share and mean score: {"plot": path}, or {"plot_skipped": why}."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError as err:
        return {"plot_skipped": f"matplotlib is not installed ({err}); pip install 'toss-filter[reproduce]'"}
    groups = list(result["groups"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(groups) + 1.8))
    for axis, key, title in ((axes[0], "masked_share", f"masked share per row (ratio {result['config']['ratio']})"),
                             (axes[1], "mean_score", "mean score S per row")):
        values = [[row[key] for row in result["rows"] if row["label"] == group and row[key] is not None]
                  for group in groups]
        for y, group_values in enumerate(values, start=1):
            axis.scatter(group_values, np.full(len(group_values), y) + np.linspace(-0.25, 0.25, len(group_values)),
                         s=5, alpha=0.4)
            if group_values:
                axis.plot([np.mean(group_values)] * 2, [y - 0.35, y + 0.35], color="black")  # the group's mean
        axis.set_yticks(range(1, len(groups) + 1), groups)
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return {"plot": str(path)}


def summary_table(result: dict[str, Any], out_of_source: bool = False) -> Any:
    """A rich Table: one line per group, with its comparison against the positive group; over the out-of-source rows
    alone with `out_of_source` (None when there are none)."""
    from rich.table import Table

    block = result.get("out_of_source") if out_of_source else result
    if block is None:
        return None
    where = "OUT OF SOURCE (families no reference trained on)" if out_of_source else "all rows (in-source included)"
    table = Table(title=f"{where}: {result['positive']} against each group, ratio {result['config']['ratio']}")
    for name in ("group", "standing", "rows", "masked share (mean per row)", "mean score", "rows losing > half",
                 "AUROC masked share", "AUROC mean score"):
        table.add_column(name, justify="left" if name in ("group", "standing") else "right", no_wrap=name == "group")
    comparisons = block["comparisons"]
    for group in [*block["groups"], *(["rest"] if len(comparisons) > 2 else [])]:  # rest = the one other group
        stats = block["groups"].get(group) or comparisons[group]
        versus = comparisons.get(group, {})
        standing = result.get("standing", {}).get(group, {}).get("standing", "")
        table.add_row(group, standing, str(stats["rows"]), _percent(stats["masked_share_mean"]),
                      _number(stats["mean_score_mean"]), _percent(stats["share_losing_over_half"]),
                      _number(versus.get("auroc_masked_share")), _number(versus.get("auroc_mean_score")))
    return table


def source_table(result: dict[str, Any]) -> Any:
    """A rich Table: one line per (group, source), with its masked share and AUROC against the other side."""
    from rich.table import Table

    groups = [group for group in result["groups"] if group != result["positive"]]
    table = Table(title=f"per source: AUROC of the masked share, {result['positive']} rows against each group")
    for name in ("group", "source", "trained on", "rows", "masked share", *groups):
        table.add_column(name, justify="left" if name in ("group", "source", "trained on") else "right", no_wrap=True)
    for entry in result["sources"]:
        versus = entry["auroc_masked_share"]
        if entry["label"] == result["positive"]:
            cells = [_number(versus[group]) for group in groups]
        else:  # the positive rows against this source, in its own group's column
            cells = [_number(versus[result["positive"]]) if group == entry["label"] else "" for group in groups]
        trained = {True: "in-source", False: "OUT", None: "unknown"}[entry.get("in_source")]
        table.add_row(entry["label"], entry["source"], trained, str(entry["rows"]),
                      _percent(entry["masked_share_mean"]), *cells)
    return table


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
