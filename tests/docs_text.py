"""The project's documentation as the doc tests read it: README.md and every docs/*.md page."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO


def doc_pages() -> list[Path]:
    """README.md first, then the docs/ pages in name order."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def docs_text() -> str:
    """Every page's text, joined: a name documented on any page is documented."""
    return "\n\n".join(page.read_text() for page in doc_pages())


def table_rows() -> list[str]:
    """Every markdown table row of every page."""
    return [line for line in docs_text().splitlines() if line.startswith("|")]


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a page: lowercase, punctuation dropped, spaces as '-',
    a repeated heading suffixed -1, -2, ... (headings inside code fences are not headings)."""
    seen: dict[str, int] = {}
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        match = None if fence else re.match(r"#{1,6} (.+)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)
