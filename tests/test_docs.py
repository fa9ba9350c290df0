"""The shipped configs and the documents stay short, self-contained and linked.

Every shipped config's header (its leading comment lines) is at most eight lines: measured figures live in
docs/results.md, paper values and their sources in docs/papers.md. No config or document names an absolute path (a
notes folder or a machine outside the repository). Every relative link of the README and of docs/ reaches an existing
file and heading, and every section of docs/results.md or docs/papers.md that a config or reproduce.yaml names exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

CONFIGS = sorted(REPO.glob("configs/**/*.yaml")) + [REPO / "reproduce.yaml"]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_HEADER_LINES = 8
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~\->])/[A-Za-z_][\w.-]*/")  # /dir/..., not a URL, <run>/x/ or ~/x/
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
NAMED_SECTION = re.compile(r'docs/(results|papers)\.md, "([^"]+)"')
ANCHORED_LINK = re.compile(r"docs/(results|papers)\.md#([\w-]+)")


def anchors(markdown: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation but - and _ dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", markdown.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def header(config: Path) -> list[str]:
    lines = config.read_text().splitlines()
    return lines[:next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_header_is_short(config):
    assert len(header(config)) <= MAX_HEADER_LINES, f"{config.relative_to(REPO)}: move measurements to docs/"


def test_nothing_points_outside_the_repository():
    found = [f"{path.relative_to(REPO)}:{number}: {match.group()}" for path in CONFIGS + DOCUMENTS
             for number, line in enumerate(path.read_text().splitlines(), 1)
             for match in ABSOLUTE_PATH.finditer(line)]
    assert not found, "\n".join(found)


def test_document_links_resolve():
    broken = []
    for document in DOCUMENTS:
        for target in MARKDOWN_LINK.findall(document.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists():
                broken.append(f"{document.relative_to(REPO)}: {target} (no such file)")
            elif anchor and anchor not in anchors(linked):
                broken.append(f"{document.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_sections_the_configs_name_exist():
    missing = []
    for config in CONFIGS:
        text = " ".join(line.lstrip("# ").strip() for line in config.read_text().splitlines())
        for name, section in NAMED_SECTION.findall(text):
            anchor = re.sub(r"[^\w\- ]", "", section.lower()).replace(" ", "-")
            if anchor not in anchors(REPO / "docs" / f"{name}.md"):
                missing.append(f"{config.relative_to(REPO)}: docs/{name}.md, {section!r}")
        for name, anchor in ANCHORED_LINK.findall(text):
            if anchor not in anchors(REPO / "docs" / f"{name}.md"):
                missing.append(f"{config.relative_to(REPO)}: docs/{name}.md#{anchor}")
    assert not missing, "\n".join(missing)


def test_files_the_documents_name_exist():
    named = {(document, path) for document in DOCUMENTS[1:]
             for path in re.findall(r"`((?:configs|studies|tests/fixtures)/[\w./-]+\.(?:yaml|py|sh))`",
                                    document.read_text())}
    missing = [f"{document.relative_to(REPO)}: {path}" for document, path in sorted(named)
               if not (REPO / path).exists()]
    assert not missing, "\n".join(missing)
