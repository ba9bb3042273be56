"""`keel bench report`: result files -> PNG plots, a Markdown summary and one self-contained HTML page.

    paths = write_report(load_results([Path("bench-keel.json")]), Path("report/"))

The Markdown is what ops read in a PR or a terminal; the HTML has the same tables plus the plots
embedded as data URIs (no external assets, no JS). With two or more result sets the first is
the baseline: a comparison table gives every other set's figures and their ratio to it, and the
plots overlay the sets.

results.py reads and shapes the result files, document.py says what the report says (blocks),
plots.py draws the plots (matplotlib), render.py writes the blocks through the jinja2 templates
in serving/bench/templates/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.bench.report.document import default_title, report_blocks
from serving.bench.report.plots import PLOT_FILES, render_plots
from serving.bench.report.render import to_html, to_markdown
from serving.bench.report.results import load_results, result_sets

__all__ = ["PLOT_FILES", "load_results", "write_report"]


def write_report(results: list[dict], out_dir: Path, title: str | None = None) -> dict[str, Any]:
    """Writes report.md, report.html and the PNG plots into out_dir (created if needed).
    Returns {"html": path, "markdown": path, "png": [paths]}. With 2+ results the first is the
    baseline of a comparison."""
    if not results:
        raise ValueError("no results to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = result_sets(results)
    title = title or default_title(sets)
    pngs = render_plots(sets, title, out_dir)
    blocks = report_blocks(sets, title)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(to_markdown(blocks), encoding="utf-8")
    html_path.write_text(to_html(blocks, title, {p.name: p.read_bytes() for p in pngs}), encoding="utf-8")
    return {"html": html_path, "markdown": md_path, "png": pngs}
