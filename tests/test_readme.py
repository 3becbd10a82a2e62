"""The README is the front page: short, with the two commands verbatim and links that resolve.

The docs site itself is checked by ``make docs`` (``mkdocs build --strict``: links, anchors, nav, API
references); this covers the README, which mkdocs does not build.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

TWO_COMMANDS = (
    "make demo   # on a fresh machine: creates .venv, installs everything, runs the main demo\n"
    "make test   # creates .venv, installs everything, runs ruff, mypy and the whole test suite\n"
)


def test_readme_is_a_front_page_of_about_8_kb_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 9 * 1024, "the README is the front page; move detail to docs/"
    assert TWO_COMMANDS in text
    for door in ("fedveil.federate(", "fedveil budget report", "make demo", "fedveil demo healthcare"):
        assert door in text, door


def test_every_relative_link_in_the_readme_resolves() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert relative, "the README links into docs/"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert missing == []


def test_every_docs_page_is_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []
