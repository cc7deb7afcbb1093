import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from conftest import chat, write_jsonl
from toss_filter import ScoreConfig, SelectConfig, filter_dataset
from toss_filter.report import ScoreScale, cutoff, fmt, most_masked, score_histogram, write_report
from toss_filter.run import RunDir

ROWS = [
    chat("What is 2+2?", "Sure, 2+2 is 4."),
    chat('Show <img src="https://example.com/x.png"> & "quotes"', "Here: <script>alert('x')</script> done & dusted."),
    chat("Name a colour.", "Blue.", system_text="Be brief."),
    chat("Explain rain briefly.", "Water vapour condenses into droplets that fall when heavy enough."),
    chat("Capital of France?", "Paris is the capital of France."),
]
ELEMENT_IDS = ["summary", "histogram", "score-histogram", "cutoff-line", "positions", "position-chart", "rows",
               "most-masked", "sample", "rounds", "single-round", "stats-json"]
# A resource the page would fetch: src/href to a URL, a CSS import, or a CSS url() with a scheme.
EXTERNAL = re.compile(r"""(?:src|href|action|poster)\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|@import|url\(\s*["']?\s*(?:https?:)?//""", re.I)
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = write_jsonl(root / "data.jsonl", ROWS)
    run = root / "run"
    filter_dataset(ScoreConfig(str(data), str(tiny_models["safety"]), str(tiny_models["utility"]), str(run)),
                   SelectConfig(str(run), str(root / "out"), ratio=0.3), show_progress=False)
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return write_report(run_dir, run_dir.parent / "report" / "report.html", rows_shown=len(ROWS))


def copy_run(run_dir: Path, tmp_path: Path, **stats_changes) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    stats = json.loads((copy / "stats.json").read_text()) | stats_changes
    (copy / "stats.json").write_text(json.dumps(stats))
    return copy


def test_report_is_one_file_with_every_section_and_nothing_to_fetch(report):
    page = report.read_text(encoding="utf-8")
    for element_id in ELEMENT_IDS:
        assert f'id="{element_id}"' in page
    assert EXTERNAL.search(page) is None
    assert all(EXTERNAL.search(ref) for ref in ('<img src="https://a/b.png">', "@import 'x.css'", "url(//a/b.woff)"))
    assert "default-src 'none'" in page  # the browser would refuse a fetch even if one slipped in
    assert re.findall(r"<script[^>]*>", page) == ['<script type="application/json" id="stats-json">']
    assert "single round (TOSS)" in page


def test_fmt_keeps_four_significant_digits_and_never_an_exponent_for_large_rates():
    assert fmt(368.123) == "368.1" and fmt(0.012345) == "0.01235"
    assert fmt(10980.4) == "10,980" and fmt(1234567.0) == "1,234,567"
    assert fmt(25503) == "25,503" and fmt(None) == "—" and fmt(True) == "yes"


def test_summary_shows_the_stats_and_embeds_them(report, run_dir):
    page = report.read_text(encoding="utf-8")
    stats = json.loads((run_dir / "stats.json").read_text())
    for key in ("rows_in", "rows_out", "rows_rejected", "rows_truncated", "response_tokens", "scored_tokens",
                "masked_tokens"):
        assert f'data-key="{key}">{stats[key]:,}<' in page
    assert f'data-key="masked_share">{stats["masked_share"]:.2%}<' in page
    assert f'data-key="score_cutoff">{stats["score_cutoff"]:.4g}<' in page
    # The rate depends on the machine (above 10,000 it is shown without exponent; test_fmt covers both forms).
    shown = re.search(r'data-key="timings.model_tokens_per_s">([^<]*)<', page).group(1)
    assert shown == fmt(stats["timings"]["model_tokens_per_s"])
    assert html.escape(stats["models"]["safety"]["path"]) in page
    embedded = re.search(r'<script type="application/json" id="stats-json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded) == stats


def test_the_most_masked_row_shows_exactly_its_masked_tokens_marked(report, run_dir, tokenizer):
    page = report.read_text(encoding="utf-8")
    tokens = RunDir(run_dir).read_tokens().to_pylist()
    unsafe = load_from_disk(str(run_dir / "token_scores"))["unsafe"]
    response = [sum(label != -100 for label in row["labels"]) for row in tokens]
    top = max(range(len(ROWS)), key=lambda i: (sum(unsafe[i]) / response[i], sum(unsafe[i]), -i))
    block = re.search(rf'<article class="row" id="top-{top}".*?</article>', page, re.S).group(0)
    ids = tokens[top]["input_ids"]
    masked_ids = [ids[j] for j, flag in enumerate(unsafe[top]) if flag]
    assert masked_ids
    marked = re.findall(r'<span class="m" style="[^"]*" title="id (\d+) · score [-+][\d.]+ · masked">([^<]*)</span>', block)
    assert [int(token_id) for token_id, _ in marked] == masked_ids
    assert html.unescape(marked[0][1]).replace("↵\n", "\n") == tokenizer.decode([masked_ids[0]])
    assert block.count("· masked") == len(masked_ids)  # no other token of the row is marked


def test_row_text_is_escaped(report):
    page = report.read_text(encoding="utf-8")
    assert "&lt;img src=&quot;https://example.com/x.png&quot;&gt; &amp; &quot;quotes&quot;" in page
    assert "<img" not in page and "<script>" not in page


def test_rounds_get_one_curve_per_metric(run_dir, tmp_path):
    rounds = [{"round": r, "masked_share": 0.2 - 0.01 * r, "overlap_with_previous": None if r == 1 else 0.6 + 0.1 * r,
               "mean_score_flagged": 1.5 - 0.2 * r, "mean_score_unflagged": -0.3 + 0.05 * r} for r in (1, 2, 3)]
    page = write_report(copy_run(run_dir, tmp_path, rounds=rounds), tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="round-curves"' in page and "single round (TOSS)" not in page
    for metric in ("masked_share", "overlap_with_previous", "mean_score_flagged", "mean_score_unflagged"):
        assert f'id="round-{metric}"' in page
    overlap = re.search(r'<svg id="round-overlap_with_previous".*?</svg>', page, re.S).group(0)
    assert overlap.count("<circle") == 2  # round 1 has no previous round


def test_without_a_tokenizer_rows_show_token_ids(run_dir, tmp_path):
    models = json.loads((run_dir / "stats.json").read_text())["models"]
    models["safety"] |= {"path": str(tmp_path / "gone"), "base": str(tmp_path / "gone")}
    page = write_report(copy_run(run_dir, tmp_path, models=models), tmp_path / "r.html").read_text(encoding="utf-8")
    first_id = RunDir(run_dir).read_tokens().column("input_ids")[0][0].as_py()
    assert 'id="tokenizer-note"' in page and f"[{first_id}]" in page


def test_cutoff_histogram_and_ranking_helpers():
    assert cutoff({"selection": {"threshold": 1.5}, "score_cutoff": 1.7}) == (1.5, "threshold")
    assert cutoff({"selection": {"scope": "global", "threshold": None}, "score_cutoff": 0.4}) == (0.4, "cut-off")
    assert cutoff({"selection": {"scope": "per-sample"}, "score_cutoff": 0.1})[1] == "lowest masked score"
    scores = np.array([np.nan, -1.0, 0.0, 1.0, 2.0, np.nan], np.float32)
    unsafe = np.array([False, False, False, False, True, False])
    scale = ScoreScale.of(scores)
    assert scale.unit == 1.0  # the median |S|
    histogram = score_histogram(lambda: [(scores[:3], unsafe[:3]), (scores[3:], unsafe[3:])], 5.0, scale, bins=4)
    assert histogram["edges"][0] == scale(-1.0) and histogram["edges"][-1] == scale(5.0)  # widened to the threshold
    assert histogram["total"].sum() == 4 and histogram["masked"].sum() == 1
    assert score_histogram(lambda: [(np.full(3, np.nan, np.float32), np.zeros(3, bool))], None, scale) is None
    # shares 0.5, 0.5, 0, 1, and a row with no response: ties go to more masked tokens, then input order
    assert most_masked(np.array([1, 2, 0, 1, 0]), np.array([2, 4, 3, 1, 0]), 3) == [3, 1, 0]


@pytest.mark.subprocess
@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs /usr/bin/chromium (Debian package `chromium`) for the headless browser check")
def test_report_loads_in_headless_chromium_without_console_messages(report, tmp_path):
    def load(page: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )

    def console(result: subprocess.CompletedProcess) -> list[str]:
        # Chromium logs every console message (log, error, CSP refusal, uncaught exception) as ...:CONSOLE...
        return [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]

    result = load(report)
    assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    assert "<title>toss-filter report" in dom and dom.rstrip().endswith("</html>")
    for element_id in ELEMENT_IDS:
        assert f'id="{element_id}"' in dom
    assert dom.count('<article class="row"') >= len(ROWS) and dom.count("<svg") == 2
    assert console(result) == []

    # The check can fail: a page that tries to fetch is refused by the policy, and the refusal is logged.
    fetching = tmp_path / "fetching.html"
    injected = '<img src="https://example.invalid/x.png"></body>'
    fetching.write_text(report.read_text(encoding="utf-8").replace("</body>", injected))
    assert any("Content Security Policy" in line for line in console(load(fetching)))
