"""Self-contained HTML reports: text, tables and PNG plots embedded as base64.

The PNGs also stay beside the report, so they can be linked from a README; the HTML
needs nothing but itself (no scripts, no external CSS, no network).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation: the report needs nothing from the rules
    from normlab.experiments.verdict import Verdict

__all__ = ["Section", "Table", "format_table", "write_report"]


@dataclass
class Table:
    """A table: ``headers`` and ``rows`` of already-formatted cells."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One part of a report: a heading, paragraphs, tables, and PNG files to embed."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


def format_table(table: Table) -> str:
    """The table as aligned plain text (what the CLI prints)."""
    cells = [table.headers, *table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1em 0; }
.meta { color: #666; font-size: 0.9em; }
.verdict { border-left: 5px solid #888; background: #f7f7f7; padding: 0.6em 1em; }
.verdict.reproduced { border-color: #2a7d2a; } .verdict.not-reproduced { border-color: #b03030; }
.verdict.inconclusive { border-color: #c08a00; }
.rule { color: #444; font-size: 0.95em; }
code { background: #f3f3f3; padding: 0.1em 0.3em; }
"""


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(Path(path).stem.replace("_", " "))
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def write_report(
    path: str | Path,
    title: str,
    intro: Sequence[str],
    sections: Sequence[Section],
    meta: str = "",
    *,
    verdict: Verdict | None = None,
    command: str = "",
    results_href: str = "",
) -> Path:
    """Write a self-contained HTML report to ``path`` and return the path.

    ``verdict`` (with its rule) opens the report; ``command`` is the command line that
    produced it and ``results_href`` a relative link to the raw results."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">normlab lab report, generated {stamp}. {html.escape(meta)}</p>',
    ]
    if verdict is not None:
        parts += [
            f'<div class="verdict {verdict.outcome.replace(" ", "-")}">'
            f"<p><strong>Verdict: {html.escape(verdict.outcome)}</strong> "
            f"({html.escape(verdict.evidence)}).</p>",
            f'<p class="rule">Rule, fixed before the run: {html.escape(verdict.rule)}.</p></div>',
        ]
    if command or results_href:
        said = f"Produced by <code>{html.escape(command)}</code>. " if command else ""
        link = (f'Raw results: <a href="{html.escape(results_href)}">'
                f"{html.escape(results_href)}</a>." if results_href else "")
        parts.append(f'<p class="meta">{said}{link}</p>')
    parts.extend(f"<p>{html.escape(p)}</p>" for p in intro)
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        parts.extend(f"<p>{html.escape(p)}</p>" for p in section.paragraphs)
        parts.extend(_table_html(t) for t in section.tables)
        parts.extend(_image_html(p) for p in section.images)
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
