"""A small document model rendered twice: Markdown (images linked) and self-contained HTML
(images embedded as base64 data URIs), so `report.md` and `report.html` say the same thing."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Doc:
    """An ordered list of blocks: headings, paragraphs, tables, images and code."""

    blocks: list[tuple] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def image(self, path: Path, caption: str) -> None:
        """A PNG written under the report's folder; `path` absolute."""
        self.blocks.append(("image", path, caption))

    def code(self, text: str, summary: str) -> None:
        """A folded code block (`<details>` in both renderings)."""
        self.blocks.append(("code", text, summary))

    def markdown(self, base: Path) -> str:
        """The document as Markdown; image links are relative to `base` (report.md's folder)."""
        out = []
        for kind, *args in self.blocks:
            if kind == "heading":
                out.append(f"{'#' * args[0]} {args[1]}")
            elif kind == "paragraph":
                out.append(args[0])
            elif kind == "table":
                header, rows = args
                out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(r) + " |" for r in rows]))
            elif kind == "image":
                path, caption = args
                out.append(f"![{caption}]({path.relative_to(base).as_posix()})\n\n*{caption}*")
            elif kind == "code":
                text, summary = args
                out.append(f"<details><summary>{summary}</summary>\n\n```\n{text}\n```\n\n</details>")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        """The document as one HTML page with every image embedded."""
        esc = html.escape
        body = []
        for kind, *args in self.blocks:
            if kind == "heading":
                body.append(f"<h{args[0]}>{esc(args[1])}</h{args[0]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline(args[0])}</p>")
            elif kind == "table":
                header, rows = args
                head = "".join(f"<th>{esc(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "image":
                path, caption = args
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                            f"<figcaption>{esc(caption)}</figcaption></figure>")
            elif kind == "code":
                text, summary = args
                body.append(f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
                 "img{max-width:100%}figure{margin:1em 0}figcaption{font-style:italic;color:#555}"
                 "pre{background:#f6f6f6;padding:1em;overflow-x:auto}code{background:#f2f2f2}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape a paragraph, turning Markdown `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
