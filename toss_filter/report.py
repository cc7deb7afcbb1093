"""`toss-filter report`: one self-contained HTML page that shows what a run masked, and why.

    write_report(run_dir, output, rows_shown=20, seed=0) -> output

Reads the run directory (layout in `toss_filter.run`), after `select`:
- `stats.json`: counts, `masked_share_by_response_position` (32 entries, None where no row is that long),
  `score_cutoff`, `selection`, `models`, `timings`; optionally `rounds` (TOSS-Pro), a list of
  `{"round": n, <metric>: number or None, ...}` (e.g. `masked_share`, `overlap_with_previous`,
  `mean_score_flagged`, `mean_score_unflagged`), drawn as one small chart per metric;
- `token_scores/`: `row`, `score` (NaN outside responses and where unscored), `unsafe`, one Arrow file per shard;
- the token shards (`tokens/<key>/`): `row`, `input_ids`, `labels` (-100 outside responses), `truncated`;
- the tokenizer of the safety model (its base for an adapter), from local files only, to decode the shown rows.
  If it does not load, the rows show token ids.

Writes one HTML file that fetches nothing: inline CSS and SVG drawn here, no executable script, the stats as
JSON in `<script type="application/json" id="stats-json">`, and a Content-Security-Policy of `default-src 'none'`
so that a browser refuses any fetch. Its size does not grow with the run: the histogram is embedded as bins, and
only the shown rows' tokens are embedded (at most MAX_ROW_TOKENS each). Nor does its memory: it reads the run
shard by shard, twice (the scale, the ranking and the row count; then the histogram and the shown rows), and keeps
at most SCALE_SAMPLE scores for the scale (every m-th finite score, exact up to that many).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from toss_filter.data.tokenize import IGNORE_INDEX
from toss_filter.files import atomic_write_text
from toss_filter.run import RunDir, ShardFiles, SidecarShard, check_output_set

BINS = 40
MAX_ROW_TOKENS = 2000
SCALE_SAMPLE = 1_000_000
KEPT_COLOUR, MASKED_COLOUR, HIGH_RGB, LOW_RGB = "#60a5fa", "#dc2626", "220,38,38", "37,99,235"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#111827;margin:0 auto;
 max-width:1180px;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h3{font-size:15px;margin:18px 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.sub,.note,figcaption{color:#6b7280;font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.cards table{align-self:start;border-collapse:collapse;width:100%;background:#f9fafb;border:1px solid #e5e7eb;
 border-radius:6px}
.cards caption{text-align:left;font-weight:600;padding:0 0 4px}
.cards th,.cards td{text-align:left;padding:3px 8px;vertical-align:top;font-weight:normal}
.cards th{color:#4b5563;white-space:nowrap}.cards td{font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.cards .wide{grid-column:span 2}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:0 24px}
figure{margin:0}svg{width:100%;height:auto;font-size:11px;fill:#374151}svg .grid{stroke:#e5e7eb}svg .axis{stroke:#9ca3af}
.small{display:inline-block;width:360px;margin:0 16px 8px 0;vertical-align:top}
.legend span{display:inline-block;margin-right:12px;padding:0 4px}
article.row{border:1px solid #e5e7eb;border-radius:6px;margin:10px 0;padding:6px 10px}
article.row header{font-size:13px;color:#374151;margin-bottom:4px}.tag{background:#fef3c7;border-radius:3px;padding:0 4px}
.tokens{font:12.5px/1.9 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.tokens span{border-radius:2px}
.p{color:#9ca3af}.n{border-bottom:1px dotted #6b7280}
.m{text-decoration:line-through;text-decoration-thickness:2px;outline:1.5px solid #7f1d1d;outline-offset:-1px}
"""


def write_report(run_dir: str | Path, output: str | Path, *, rows_shown: int = 20, seed: int = 0) -> Path:
    """Write the HTML report of `run_dir` to `output` (atomically) and return its path. Shows the `rows_shown`
    most-masked rows and a random sample (seeded by `seed`) of `rows_shown` rows."""
    run = RunDir(run_dir)
    stats = check_output_set(run)
    shards = ReportShards(run)
    cut, cut_label = cutoff(stats)
    # One scale for the histogram and every row, so that a colour means the same score everywhere on the page.
    stride = max(1, -(-int(stats.get("scored_tokens") or 0) // SCALE_SAMPLE))
    sampled, candidates, rows = [], [], 0
    for shard in shards:
        finite = shard.score[np.isfinite(shard.score)]
        sampled.append(finite[::stride])
        masked, response = per_row(shard.unsafe, shard.offsets), per_row(shard.labels != IGNORE_INDEX, shard.offsets)
        top = most_masked(masked, response, rows_shown)
        candidates.append((masked[top], response[top], rows + np.asarray(top, dtype=np.int64)))
        rows += len(shard.row_ids)
    scale = ScoreScale.of(np.concatenate(sampled) if sampled else np.zeros(0, np.float32))
    del sampled
    masked, response, index = (np.concatenate(part) for part in zip(*candidates)) if candidates else ([],) * 3
    top = [int(index[i]) for i in most_masked(np.asarray(masked), np.asarray(response), rows_shown)]
    sample = [int(i) for i in np.sort(np.random.default_rng(seed).choice(rows, min(rows_shown, rows), replace=False))]
    histogram = score_histogram(lambda: ((s.score, s.unsafe) for s in shards), cut, scale)
    tokenizer, tokenizer_note = recorded_tokenizer(stats.get("models") or run.read_json("run.json").get("models", {}))
    wanted = [("top", i) for i in top] + [("sample", i) for i in sample]
    shown: dict[tuple[str, int], str] = {}
    for shard, first in shards.with_first_rows():
        for kind, i in [(kind, i) for kind, i in wanted if first <= i < first + len(shard.row_ids)]:
            j = i - first
            span = slice(shard.offsets[j], shard.offsets[j + 1])
            shown[kind, i] = row_html(f"{kind}-{shard.row_ids[j]}", int(shard.row_ids[j]), shard.input_ids[span],
                                        shard.labels[span], shard.score[span], shard.unsafe[span], tokenizer,
                                        scale, bool(shard.truncated[j]))

    def rows_html(kind: str, chosen: list[int]) -> str:
        if not chosen:
            return '<p class="note">No rows to show.</p>'
        return "\n".join(shown[kind, i] for i in chosen)

    body = [
        f"<h1>toss-filter report</h1><p class=\"sub\">{esc(str(run.path))}</p>",
        f'<section id="summary"><h2>Summary</h2><div class="cards">{summary_html(stats)}</div></section>',
        '<div class="charts"><section id="histogram"><h2>Token scores</h2>'
        f"<figure>{histogram_svg(histogram, cut, cut_label, scale)}<figcaption>All scored response tokens, S(t) = "
        "nll<sub>utility</sub> − nll<sub>safety</sub>: high means likelier under the safety-degraded model. "
        f"Red: masked. The axis is linear within ±{scale.unit:.2g} (the median |S|) and logarithmic beyond."
        "</figcaption></figure></section>",
        '<section id="positions"><h2>Masked share by response position</h2>'
        f"<figure>{positions_svg(stats.get('masked_share_by_response_position') or [], stats.get('masked_share'))}"
        "<figcaption>Share of the tokens at each position of a response (0 = first response token) that are "
        "masked. A position with no response that long has no bar.</figcaption></figure></section></div>",
        f'<section id="rows"><h2>Rows</h2><p class="legend">{legend_html(scale)}</p>{tokenizer_note}'
        f'<div id="most-masked"><h3>Most-masked rows</h3><p class="note">Up to {rows_shown} rows with the highest '
        f"masked share of response tokens.</p>"
        f"{rows_html('top', top)}</div>"
        f'<div id="sample"><h3>Random sample</h3><p class="note">{len(sample)} rows drawn at random '
        f"(seed {seed}), in input order.</p>{rows_html('sample', sample)}</div></section>",
        f'<section id="rounds"><h2>Rounds</h2>{rounds_html(stats.get("rounds"))}</section>',
    ]
    stats_json = json.dumps(stats, indent=1, default=str).replace("<", "\\u003c")  # cannot close the tag early
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>toss-filter report: {esc(run.path.name)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + f'\n<script type="application/json" id="stats-json">{stats_json}</script>\n</body></html>\n'
    )
    output = Path(output)
    atomic_write_text(output, page)
    return output


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def per_row(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """How many of each row's flags are set, for flat `flags` split by `offsets` (empty rows give 0)."""
    total = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return total[offsets[1:]] - total[offsets[:-1]]


def most_masked(masked: np.ndarray, response: np.ndarray, count: int) -> list[int]:
    """Indices of the `count` rows with the highest masked share of response tokens, then the most masked
    tokens, then input order; rows with nothing masked are left out."""
    share = np.divide(masked, response, out=np.zeros(len(masked)), where=response > 0)
    order = np.lexsort((np.arange(len(share)), -masked, -share))
    return [int(i) for i in order[:count] if masked[i] > 0]


def cutoff(stats: dict[str, Any]) -> tuple[float | None, str]:
    """The score that separates masked from kept tokens, and what to call it."""
    selection = stats.get("selection") or {}
    if selection.get("threshold") is not None:
        return float(selection["threshold"]), "threshold"
    if selection.get("scope") == "per-sample" or selection.get("strategy", "toss") != "toss":
        return stats.get("score_cutoff"), "lowest masked score"  # no single cut-off separates the two sets
    return stats.get("score_cutoff"), "cut-off"


@dataclass(frozen=True)
class ScoreScale:
    """The symmetric-log scale of the histogram's axis and of the token colours: linear within ±unit, logarithmic
    beyond. Scores are heavy-tailed (half within ±0.3, a few beyond ±15 on the demo), so on a linear axis the whole
    body, cut-off included, falls into one or two bins, and all but the extreme tokens look uncoloured."""

    unit: float  # the median |S|
    top: float  # the |S| that gets the strongest colour: the 99th percentile

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreScale:
        magnitude = np.abs(scores[np.isfinite(scores)])
        unit = float(np.median(magnitude)) if len(magnitude) else 0.0
        unit = unit if unit > 0 else 1.0
        return cls(unit, max(float(np.percentile(magnitude, 99)) if len(magnitude) else unit, unit))

    def __call__(self, value: Any) -> Any:
        return np.arcsinh(np.asarray(value, dtype=np.float64) / self.unit)

    def colour(self, score: float) -> str:
        strength = min(float(self(abs(score)) / self(self.top)), 1.0) * 0.7
        return f"rgba({HIGH_RGB if score > 0 else LOW_RGB},{strength:.2f})"


def score_histogram(chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], cut: float | None,
                    scale: ScoreScale, bins: int = BINS) -> dict[str, np.ndarray] | None:
    """`{"edges" (on `scale`), "total", "masked"}` over the finite scores of every `(scores, unsafe)` chunk that
    `chunks()` yields (it is called twice: the range, then the counts), or None when nothing was scored. The range
    covers every score and `cut`."""
    lo, hi = np.inf, -np.inf
    for scores, _ in chunks():
        finite = scores[np.isfinite(scores)]
        if len(finite):
            lo, hi = min(lo, float(scale(finite.min()))), max(hi, float(scale(finite.max())))
    if lo > hi:
        return None
    if cut is not None:
        lo, hi = min(lo, float(scale(cut))), max(hi, float(scale(cut)))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    total, masked = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    for scores, unsafe in chunks():
        finite = np.isfinite(scores)
        values = scale(scores[finite])
        total += np.histogram(values, edges)[0]
        masked += np.histogram(values[unsafe[finite]], edges)[0]
    return {"edges": edges, "total": total, "masked": masked}


class ReportShards:
    """The run's token shards beside the sidecar's, one shard at a time (`run.ShardFiles.sidecar`)."""

    def __init__(self, run: RunDir):
        self.files, self.shards = ShardFiles.current(run), len(run.sidecar_files())

    def __iter__(self) -> Iterator[SidecarShard]:
        return (self.files.sidecar(shard) for shard in range(self.shards))

    def with_first_rows(self) -> Iterator[tuple[SidecarShard, int]]:
        first = 0
        for shard in self:
            yield shard, first
            first += len(shard.row_ids)


def recorded_tokenizer(models: dict[str, Any]) -> tuple[Any, str]:
    """(tokenizer or None, an HTML note when it could not be loaded)."""
    safety = models.get("safety") or {}
    path = safety.get("base") or safety.get("path")  # an adapter's tokenizer is its base's
    try:
        # local_files_only: writing a report must never reach the network.
        return AutoTokenizer.from_pretrained(path, local_files_only=True), ""
    except Exception as error:  # any failure only costs the decoded text; the ids are still shown
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return None, (f'<p class="note" id="tokenizer-note">The tokenizer of {esc(str(path))} could not be loaded '
                      f"({esc(reason)}), so tokens are shown as [ids].</p>")


def token_texts(tokenizer: Any, ids: np.ndarray) -> list[str]:
    """Each token's text as it reads in context, or `[id]` without a tokenizer. A token is decoded together with
    its predecessor, whose own text is then cut off, because decoding a token alone drops the leading space of
    SentencePiece word pieces ("▁world" → "world")."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    singles = tokenizer.batch_decode([[i] for i in ids], **options)
    pairs = tokenizer.batch_decode([list(pair) for pair in zip(ids, ids[1:])], **options)
    return singles[:1] + [pair[len(before):] if pair.startswith(before) else alone
                          for before, pair, alone in zip(singles, pairs, singles[1:])]


def row_html(anchor: str, row: int, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray, unsafe: np.ndarray,
               tokenizer: Any, scale: ScoreScale, truncated: bool) -> str:
    """One row as a token heatmap: prompt tokens grey, response tokens coloured by score (score on hover),
    masked tokens struck through and outlined."""
    response = labels != IGNORE_INDEX
    n_response, n_masked = int(response.sum()), int(unsafe.sum())
    share = n_masked / n_response if n_response else 0.0
    tags = ['<span class="tag">truncated</span>'] if truncated else []
    trainable = response & ~unsafe
    trainable[:1] = False  # nothing predicts position 0, so its label never trains
    if not trainable.any():
        tags.append('<span class="tag">no trainable token</span>')
    shown = min(len(ids), MAX_ROW_TOKENS)
    texts = token_texts(tokenizer, ids[:shown])
    parts, prompt = [], []
    for j in range(shown):
        if not response[j]:
            prompt.append(texts[j])  # a prompt run is one span: it needs no per-token colour or title
            continue
        if prompt:
            parts.append(f'<span class="p">{esc("".join(prompt))}</span>')
            prompt = []
        text = esc(texts[j].replace("\n", "↵\n"))  # a newline token stays visible and hoverable
        if not math.isfinite(scores[j]):
            parts.append(f'<span class="n" title="id {ids[j]} · not scored">{text}</span>')
            continue
        mark, note = (' class="m"', " · masked") if unsafe[j] else ("", "")
        parts.append(f'<span{mark} style="background:{scale.colour(float(scores[j]))}"'
                     f' title="id {ids[j]} · score {scores[j]:+.3f}{note}">{text}</span>')
    if prompt:
        parts.append(f'<span class="p">{esc("".join(prompt))}</span>')
    if shown < len(ids):
        parts.append(f'<span class="note">\n… {len(ids) - shown:,} more tokens not shown</span>')
    return (f'<article class="row" id="{anchor}"><header>row {row} · '
            f"{n_masked:,} of {n_response:,} response tokens masked ({share:.1%}){''.join(' ' + t for t in tags)}</header>"
            f'<div class="tokens">{"".join(parts)}</div></article>')


def legend_html(scale: ScoreScale) -> str:
    middle = scale.unit * math.sinh(float(scale(scale.top)) / 2)  # halfway to the top colour, on the scale
    swatches = [(-scale.top, f"≤ −{scale.top:.2g}"), (-middle, f"−{middle:.2g}"), (middle, f"+{middle:.2g}"),
                (scale.top, f"≥ +{scale.top:.2g}")]
    return ("score " + "".join(f'<span style="background:{scale.colour(v)}">{text}</span>' for v, text in swatches)
            + '<span class="m">masked</span><span class="p">prompt</span><span class="n">not scored</span>'
            '<span>Hover a token for its id and score.</span>')


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def model_line(info: dict[str, Any]) -> str:
    if info.get("kind") == "lora-adapter":
        return f"{info.get('path')} (LoRA r={info.get('r')} on {info.get('base')})"
    return f"{info.get('path')} ({info.get('kind', 'model')})"


def timing_label(key: str) -> str:
    label = key.replace("tokens_per_s", "tokens/s")
    return (label[:-2] + " (s)" if label.endswith("_s") else label).replace("_", " ")


def summary_html(stats: dict[str, Any]) -> str:
    """Cards of (label, data-key, value); data-key names the stats.json field each value comes from."""
    selection, models = stats.get("selection") or {}, stats.get("models") or {}
    if selection.get("threshold") is not None:
        selection = selection | {"ratio": "not used (threshold)"}
    share = stats.get("masked_share")
    cards = {
        "Rows": [(name.replace("rows_", "").replace("_", " "), name, fmt(stats.get(name))) for name in
                 ("rows_in", "rows_out", "rows_rejected", "rows_truncated", "rows_without_trainable_token")],
        "Tokens": [(name.replace("_tokens", ""), name, fmt(stats.get(name)))
                   for name in ("response_tokens", "scored_tokens", "masked_tokens")]
        + [("masked share", "masked_share", "—" if share is None else f"{share:.2%}")],
        "Selection": [(name.replace("_", " "), f"selection.{name}", fmt(selection.get(name)))
                      for name in ("strategy", "ratio", "scope", "threshold", "keep_empty")]
        + [("lowest masked score", "score_cutoff", fmt(stats.get("score_cutoff")))],
        "Timings": [(timing_label(key), f"timings.{key}", fmt(value)) for key, value in (stats.get("timings") or {}).items()],
        "Models": [(role, f"models.{role}", model_line(models[role])) for role in ("safety", "utility") if role in models]
        + [("shared base", "models.shared_base", fmt(models.get("shared_base")))],
        "Run": [(name, name, fmt(stats.get(name))) for name in ("input", "template", "device", "dtype", "output")],
    }
    return "".join(
        f'<table{" class=wide" if title in ("Models", "Run") else ""}><caption>{title}</caption>'
        + "".join(f'<tr><th>{esc(label)}</th><td data-key="{key}">{esc(value)}</td></tr>' for label, key, value in rows)
        + "</table>"
        for title, rows in cards.items()
    )


def nice_step(span: float, count: int = 5) -> float:
    """A round step (1, 2 or 5 × 10^k) that splits `span` into about `count` intervals."""
    raw = span / count if span > 0 else 1.0
    step = 10 ** math.floor(math.log10(raw))
    return step * next(m for m in (1, 2, 5, 10) if raw <= m * step + 1e-12)


class Plot:
    """A plot area that maps data [x0, x1] × [y0, y1] onto a `width` × `height` SVG with margins for labels."""

    LEFT, RIGHT, TOP, BOTTOM = 52, 16, 24, 40

    def __init__(self, x0: float, x1: float, y0: float, y1: float, width: int = 560, height: int = 260):
        self.x0, self.x1, self.y0, self.y1, self.width, self.height = x0, x1, y0, y1, width, height

    def x(self, value: float) -> float:
        return self.LEFT + (value - self.x0) / (self.x1 - self.x0) * (self.width - self.LEFT - self.RIGHT)

    def y(self, value: float) -> float:
        return self.height - self.BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (self.height - self.TOP - self.BOTTOM)

    def svg(self, element_id: str, label: str, body: str, x_title: str, y_title: str,
            x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]]) -> str:
        left, right, bottom = self.LEFT, self.width - self.RIGHT, self.height - self.BOTTOM
        axes = [f'<line class="grid" x1="{left}" x2="{right}" y1="{self.y(v):.1f}" y2="{self.y(v):.1f}"/>'
                f'<text x="{left - 6}" y="{self.y(v) + 4:.1f}" text-anchor="end">{esc(text)}</text>' for v, text in y_ticks]
        axes += [f'<line class="axis" x1="{self.x(v):.1f}" x2="{self.x(v):.1f}" y1="{bottom}" y2="{bottom + 4}"/>'
                 f'<text x="{self.x(v):.1f}" y="{bottom + 16}" text-anchor="middle">{esc(text)}</text>' for v, text in x_ticks]
        axes.append(f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>')
        axes.append(f'<text x="{(left + right) / 2:.0f}" y="{self.height - 4}" text-anchor="middle">{esc(x_title)}</text>')
        axes.append(f'<text transform="translate(12 {(self.TOP + bottom) / 2:.0f}) rotate(-90)" '
                    f'text-anchor="middle">{esc(y_title)}</text>')
        return (f'<svg id="{element_id}" viewBox="0 0 {self.width} {self.height}" width="{self.width}" '
                f'height="{self.height}" role="img" aria-label="{esc(label)}">{"".join(axes)}{body}</svg>')


def ticks(lo: float, hi: float, step: float, digits: int | None = None) -> list[tuple[float, str]]:
    values = np.arange(math.ceil(lo / step - 1e-9) * step, hi + step * 1e-6, step)
    return [(float(v), f"{v:.{digits}f}" if digits is not None else f"{v:g}") for v in values]


def histogram_svg(histogram: dict[str, np.ndarray] | None, cut: float | None, cut_label: str, scale: ScoreScale) -> str:
    if histogram is None:
        return '<p class="note">No scored tokens.</p>'
    edges, total, masked = histogram["edges"], histogram["total"], histogram["masked"]
    step = nice_step(max(float(total.max()), 1.0))
    y1 = math.ceil(max(float(total.max()), 1.0) / step) * step
    plot = Plot(float(edges[0]), float(edges[-1]), 0.0, y1)
    bars = []
    for lo, hi, count, red in zip(edges, edges[1:], total, masked):
        x, width = plot.x(lo) + 0.5, max(plot.x(hi) - plot.x(lo) - 1, 0.5)
        kept = count - red
        bars.append(f"<g><title>{scale.unit * math.sinh(lo):.3g} to {scale.unit * math.sinh(hi):.3g}: {count:,} "
                    f"tokens, {red:,} masked</title>"
                    f'<rect x="{x:.1f}" y="{plot.y(kept):.1f}" width="{width:.1f}" height="{plot.y(0) - plot.y(kept):.1f}" '
                    f'fill="{KEPT_COLOUR}"/><rect x="{x:.1f}" y="{plot.y(count):.1f}" width="{width:.1f}" '
                    f'height="{plot.y(kept) - plot.y(count):.1f}" fill="{MASKED_COLOUR}"/></g>')
    if cut is not None:
        x = plot.x(float(scale(cut)))
        anchor, shift = ("end", -4) if x > plot.width * 0.8 else ("start", 4)
        bars.append(f'<g id="cutoff-line"><line x1="{x:.1f}" x2="{x:.1f}" y1="{plot.TOP}" y2="{plot.y(0):.1f}" '
                    f'stroke="#111827" stroke-width="1.5" stroke-dasharray="5 3"/><text x="{x + shift:.1f}" '
                    f'y="{plot.TOP - 6}" text-anchor="{anchor}" font-weight="600">{esc(cut_label)} {cut:.3f}</text></g>')
    return plot.svg("score-histogram", "histogram of token scores", "".join(bars), "token score S(t), symmetric log scale",
                    "tokens", symlog_ticks(plot, scale), ticks(0.0, y1, step))


def symlog_ticks(plot: Plot, scale: ScoreScale, spacing: float = 36) -> list[tuple[float, str]]:
    """Round scores to label a symmetric-log axis: 0 first, then ±10^k, then ±2·10^k and ±5·10^k, each kept only
    if it is `spacing` px from every label already kept."""
    candidates = [0.0] + [sign * m * 10.0 ** k for m in (1, 2, 5) for k in range(-3, 5) for sign in (1, -1)]
    kept: list[float] = []
    for value in candidates:
        x = plot.x(float(scale(value)))
        if plot.x0 <= float(scale(value)) <= plot.x1 and all(abs(x - plot.x(float(scale(k)))) >= spacing for k in kept):
            kept.append(value)
    return [(float(scale(v)), f"{v:g}") for v in sorted(kept)]


def positions_svg(shares: list[float | None], overall: float | None) -> str:
    known = [s for s in shares if s is not None]
    if not known:
        return '<p class="note">No response tokens.</p>'
    peak = max(known + [overall or 0.0, 0.01])
    step = nice_step(peak)
    plot = Plot(0.0, float(len(shares)), 0.0, min(math.ceil(peak / step) * step, 1.0))
    bars = []
    for position, share in enumerate(shares):
        if share is None:
            continue
        x, width = plot.x(position) + 1, plot.x(position + 1) - plot.x(position) - 2
        bars.append(f'<rect x="{x:.1f}" y="{plot.y(share):.1f}" width="{width:.1f}" height="{plot.y(0) - plot.y(share):.1f}" '
                    f'fill="{MASKED_COLOUR}"><title>position {position}: {share:.1%} masked</title></rect>')
    if overall is not None:
        y = plot.y(overall)
        # The label sits above the plot area: inside it, it would cover bars.
        bars.append(f'<line x1="{plot.LEFT}" x2="{plot.width - plot.RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#111827" '
                    f'stroke-dasharray="5 3"/><text x="{plot.width - plot.RIGHT}" y="{plot.TOP - 6}" text-anchor="end" '
                    f'font-weight="600">- - - overall {overall:.1%}</text>')
    x_ticks = [(p + 0.5, str(p)) for p in range(0, len(shares), 4)]
    y_ticks = [(v, f"{v:.0%}" if step >= 0.01 else f"{v:.1%}") for v, _ in ticks(0.0, plot.y1, step)]
    return plot.svg("position-chart", "masked share by response position", "".join(bars), "response position",
                    "masked share", x_ticks, y_ticks)


def rounds_html(rounds: list[dict[str, Any]] | None) -> str:
    """One small line chart per numeric metric of the TOSS-Pro rounds, or a note for a single-round run."""
    if not rounds:
        return '<p id="single-round">single round (TOSS)</p>'
    xs = [float(entry.get("round", i + 1)) for i, entry in enumerate(rounds)]
    charts = []
    for metric in dict.fromkeys(key for entry in rounds for key in entry if key != "round"):
        # None (e.g. the first round's overlap with a previous one) and non-numbers are left out of the curve.
        points = [(x, float(entry[metric])) for x, entry in zip(xs, rounds) if isinstance(entry.get(metric), (int, float))
                  and not isinstance(entry[metric], bool) and math.isfinite(entry[metric])]
        if not points:
            continue
        lo, hi = min(0.0, *(y for _, y in points)), max(0.0, *(y for _, y in points))
        step = nice_step(hi - lo or 1.0, 4)
        lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step + (step if hi == lo else 0)
        plot = Plot(min(xs) - 0.5, max(xs) + 0.5, lo, hi, width=360, height=200)
        line = " ".join(f"{plot.x(x):.1f},{plot.y(y):.1f}" for x, y in points)
        dots = "".join(f'<circle cx="{plot.x(x):.1f}" cy="{plot.y(y):.1f}" r="3.5" fill="{MASKED_COLOUR}">'
                       f"<title>round {x:g}: {y:.4g}</title></circle>" for x, y in points)
        body = f'<polyline points="{line}" fill="none" stroke="{MASKED_COLOUR}" stroke-width="2"/>{dots}'
        chart = plot.svg(f"round-{metric}", metric, body, "round", metric.replace("_", " "),
                         [(x, f"{x:g}") for x in xs], ticks(lo, hi, step))
        charts.append(f'<div class="small">{chart}</div>')
    return f'<div id="round-curves">{"".join(charts)}</div>'
