"""reports/report.html: the Markdown report as one self-contained page that opens anywhere, offline.

The report's Markdown uses a small subset — headings, paragraphs, pipe tables, images, bullet lists, emphasis and
inline code — so a converter for that subset is a few dozen lines and adds no dependency. Figures are embedded as
base64 data URIs and the style sheet is inline: the page loads nothing, from the web or from disk.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<path>[^)\s]+)\)$")
_HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<text>.*)$")
_TABLE_RULE = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")
_INLINE = re.compile(r"`(?P<code>[^`]+)`|\*\*(?P<strong>[^*]+)\*\*|\*(?P<em>[^*\s][^*]*)\*")
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
                ".gif": "image/gif"}
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9rem; color: #555; }
"""


def render_report_html(markdown: str, base: Path, title: str) -> str:
    """The whole page for `markdown`; image paths are read relative to `base` and embedded."""
    body = "\n".join(markdown_to_html(markdown, base))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def markdown_to_html(markdown: str, base: Path) -> list[str]:
    """The report's Markdown subset as HTML block elements, one string per block."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if not line:
            index += 1
        elif heading := _HEADING.match(line):
            level = len(heading["level"])
            blocks.append(f"<h{level}>{_inline(heading['text'])}</h{level}>")
            index += 1
        elif image := _IMAGE.match(line):
            blocks.append(_figure(image["alt"], base / image["path"]))
            index += 1
        elif line.startswith("|"):
            end = _run_end(lines, index, lambda text: text.startswith("|"))
            blocks.append(_table([text.strip() for text in lines[index:end]]))
            index = end
        elif line.startswith(("- ", "* ")):
            end = _run_end(lines, index, lambda text: text.startswith(("- ", "* ")))
            items = "".join(f"<li>{_inline(text.strip()[2:])}</li>" for text in lines[index:end])
            blocks.append(f"<ul>{items}</ul>")
            index = end
        else:
            end = _run_end(lines, index, lambda text: not (_HEADING.match(text) or _IMAGE.match(text)
                                                           or text.startswith(("|", "- ", "* "))))
            blocks.append(f"<p>{_inline(' '.join(text.strip() for text in lines[index:end]))}</p>")
            index = end
    return blocks


def _run_end(lines: list[str], start: int, belongs) -> int:
    """Index after the run of non-blank lines from `start` that `belongs` accepts (the first always does)."""
    end = start + 1
    while end < len(lines) and lines[end].strip() and belongs(lines[end].strip()):
        end += 1
    return end


def _table(rows: list[str]) -> str:
    cells = [_cells(row) for row in rows]
    has_header = len(rows) > 1 and _TABLE_RULE.match(rows[1]) is not None
    head = "<thead><tr>" + "".join(f"<th>{_inline(cell)}</th>" for cell in cells[0]) + "</tr></thead>" \
        if has_header else ""
    body_rows = cells[2:] if has_header else cells
    body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in body_rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _cells(row: str) -> list[str]:
    inner = row.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return [cell.strip() for cell in inner.split("|")]


def _figure(caption: str, path: Path) -> str:
    """An embedded figure; a missing or unknown file becomes a visible note, never a link the page would load."""
    media_type = _MEDIA_TYPES.get(path.suffix.lower())
    if media_type is None or not path.is_file():
        return f"<p><em>figure not available: {html.escape(path.name)}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img src=\"data:{media_type};base64,{data}\" alt=\"{html.escape(caption)}\">"
            f"<figcaption>{_inline(caption)}</figcaption></figure>")


def _inline(text: str) -> str:
    """Escape `text` and turn `code`, **strong** and *em* into elements; code spans keep their content verbatim."""
    parts: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        parts.append(html.escape(text[position:match.start()]))
        if match["code"] is not None:
            parts.append(f"<code>{html.escape(match['code'])}</code>")
        elif match["strong"] is not None:
            parts.append(f"<strong>{html.escape(match['strong'])}</strong>")
        else:
            parts.append(f"<em>{html.escape(match['em'])}</em>")
        position = match.end()
    parts.append(html.escape(text[position:]))
    return "".join(parts)
