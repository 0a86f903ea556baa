"""Every `algorithms.md N.N` that code, configs or docs cite is a section of the project's own
docs/algorithms.md, and relative links in the docs point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"algorithms\.md[^0-9\n]{0,20}?(\d+(?:\.\d+)?)")
SOURCES = [
    *sorted((REPO / "mnpo").rglob("*.py")),
    *sorted((REPO / "configs").rglob("*.yaml")),
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "README.md",
]


def _sections() -> set[str]:
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (REPO / "docs" / "algorithms.md").read_text(), re.M)
    return set(headings)


def test_the_citations_are_found():
    cited = {m.group(1) for path in SOURCES for m in CITATION.finditer(path.read_text())}
    assert {"1.2", "2.3", "3"} <= cited  # the pattern still matches how the code cites


def test_the_spec_cited_is_the_projects_own():
    outside = [str(p.relative_to(REPO)) for p in SOURCES if "shared/docs/algorithms" in p.read_text()]
    assert not outside, "cite docs/algorithms.md, the project's own, not the spec outside the repository"


def test_every_cited_section_exists():
    sections = _sections()
    missing = {
        str(path.relative_to(REPO)): sorted({m.group(1) for m in CITATION.finditer(path.read_text())} - sections)
        for path in SOURCES
    }
    assert not {k: v for k, v in missing.items() if v}, f"sections of docs/algorithms.md are {sorted(sections)}"


def test_relative_links_in_docs_resolve():
    broken = {}
    for path in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]:
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
        missing = [link for link in links if "://" not in link and not (path.parent / link).exists()]
        if missing:
            broken[path.name] = missing
    assert not broken
