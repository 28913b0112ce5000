"""Every relative link of README.md and docs/*.md reaches a file, and its #anchor a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.docs_text import anchors, doc_pages

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [m for m in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", m)]


def _reaches(target: Path, anchor: str) -> bool:
    if not target.exists():
        return False
    return not anchor or target.suffix != ".md" or anchor in anchors(target.read_text())


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for link in _relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not _reaches(target, anchor):
            broken.append(link)
    assert broken == []


def test_readme_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [p.name for p in doc_pages()[1:] if f"(docs/{p.name})" not in readme]
    assert missing == []
