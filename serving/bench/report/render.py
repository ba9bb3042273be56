"""The report's blocks written as Markdown (what ops read in a PR or a terminal) and as one
self-contained HTML page (the same blocks plus the plots as data URIs, no external assets, no
JS). Text from result files is escaped in both."""

from __future__ import annotations

import base64
import html

from serving.bench.report.document import (
    Block,
    Bold,
    Bullets,
    Code,
    CodeBlock,
    Heading,
    Image,
    Para,
    Table,
    Text,
    spans,
)


def _md_escape(s: str, in_table: bool) -> str:
    for ch in "\\`*<>[]":
        s = s.replace(ch, "\\" + ch)
    if in_table:
        s = s.replace("|", "\\|")
    return s.replace("\n", " ")


def _md_code(s: str, in_table: bool) -> str:
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


def _md_inline(t: Text, in_table: bool = False) -> str:
    out = []
    for span in spans(t):
        if isinstance(span, Code):
            out.append(_md_code(span.text, in_table))
        elif isinstance(span, Bold):
            out.append(f"**{_md_escape(span.text, in_table)}**")
        else:
            out.append(_md_escape(span, in_table))
    return "".join(out)


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + _md_inline(b.text), ""]
        elif isinstance(b, Para):
            lines += [_md_inline(b.text), ""]
        elif isinstance(b, Bullets):
            lines += [f"- {_md_inline(item)}" for item in b.items] + [""]
        elif isinstance(b, Table):
            marks = {"l": "---", "r": "---:", "c": ":---:"}
            lines.append("| " + " | ".join(_md_escape(h, True) for h in b.header) + " |")
            lines.append("|" + "|".join(marks[a] for a in b.aligns) + "|")
            lines += ["| " + " | ".join(_md_inline(c, True) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, CodeBlock):
            fence = "````" if "```" in b.text else "```"
            lines += [fence + b.lang, b.text.rstrip("\n"), fence, ""]
        elif isinstance(b, Image):
            lines += [f"![{_md_escape(b.alt, False)}]({b.file})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _html_inline(t: Text) -> str:
    out = []
    for span in spans(t):
        if isinstance(span, Code):
            out.append(f"<code>{html.escape(span.text)}</code>")
        elif isinstance(span, Bold):
            out.append(f"<strong>{html.escape(span.text)}</strong>")
        else:
            out.append(html.escape(span))
    # The marks are ours, never from results, so wrapping them after escaping is safe.
    return "".join(out).replace("✓", '<span class="ok">✓</span>').replace("✗", '<span class="bad">✗</span>')


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2430;
 max-width:1280px;margin:24px auto;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.3em}
h2{font-size:1.3em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0 1em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:4px 9px;vertical-align:top}
th{background:#f1f3f6;text-align:center;font-weight:600}
tr:nth-child(even) td{background:#fafbfc}
td.r{text-align:right;white-space:nowrap} td.c{text-align:center} td.l{text-align:left}
.ok{color:#1a7f37;font-weight:700} .bad{color:#cf222e;font-weight:700}
code{background:#f1f3f6;border-radius:3px;padding:0 4px;font-size:92%}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:4px;padding:10px 12px;overflow:auto}
pre code{background:none;padding:0}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{color:#57606a;font-size:90%}
"""


def to_html(blocks: list[Block], title: str, images: dict[str, bytes]) -> str:
    """`images`: the PNG bytes of each Image block's file."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_html_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + "".join(f'<td class="{a}">{_html_inline(c)}</td>' for a, c in zip(b.aligns, row)) + "</tr>"
                for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, CodeBlock):
            cls = f' class="language-{html.escape(b.lang)}"' if b.lang else ""
            body.append(f"<pre><code{cls}>{html.escape(b.text.rstrip())}</code></pre>")
        elif isinstance(b, Image):
            data = base64.b64encode(images[b.file]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.alt)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
