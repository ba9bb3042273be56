"""The report's blocks through the jinja2 templates in serving/bench/templates/ (package data):
report.md, the Markdown summary, and report.html, one self-contained page (report.css inline,
the plots as data URIs). HTML is autoescaped; Markdown escapes its own marks in the filters
below, so a setting named `a|b` or `<script>` reads as written in both."""

from __future__ import annotations

import base64
from functools import cache

import jinja2

from serving.bench.report.document import Block


def md_text(s: str, in_table: bool = False) -> str:
    """Text with Markdown's marks escaped; one line (a newline would end a table row)."""
    for ch in "\\`*<>[]":
        s = s.replace(ch, "\\" + ch)
    if in_table:
        s = s.replace("|", "\\|")
    return s.replace("\n", " ")


def md_code(s: str, in_table: bool = False) -> str:
    """A code span fenced by one backtick more than the longest run of backticks in it."""
    s = s.replace("\n", " ")
    if in_table:
        s = s.replace("|", "\\|")
    run, longest = 0, 0
    for ch in s:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


@cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("serving.bench", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), disabled_extensions=("md",), default=True),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the report, not a blank cell
    )
    env.filters["md_text"] = md_text
    env.filters["md_code"] = md_code
    return env


def to_markdown(blocks: list[Block]) -> str:
    return _templates().get_template("report.md").render(blocks=blocks).rstrip("\n") + "\n"


def to_html(blocks: list[Block], title: str, images: dict[str, bytes]) -> str:
    """`images`: the PNG bytes of each Image block's file."""
    data = {name: base64.b64encode(png).decode("ascii") for name, png in images.items()}
    return _templates().get_template("report.html").render(blocks=blocks, title=title, images=data) + "\n"
