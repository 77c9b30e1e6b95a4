"""The documentation stays one screen of README with one page per topic behind it: the README is short and
links every page, every link inside the repository resolves (file and heading), nothing points outside
the repository, the code's citations of docs/method.md name sections that exist, and every section of
docs/results.md says when and by which command its figures were measured."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 300
LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as '-'."""
    found = set()
    for heading in re.findall(r"^#+\s+(.*)$", path.read_text(), re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


def test_readme_is_short_and_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    linked = {target.split("#")[0] for target in LINK.findall(text)}
    missing = [page.name for page in pages() if f"docs/{page.name}" not in linked]
    assert not missing, f"pages the README does not link: {missing}"


def test_links_resolve():
    broken = []
    for source in [README, *pages()]:
        for target in LINK.findall(source.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (source.parent / file) if file else source
            if not path.is_file():
                broken.append(f"{source.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{source.name}: {target} (no such heading)")
    assert not broken, broken


def test_nothing_points_outside_the_repository():
    """No `../` in the documentation (a path up and out), no reference to the project's shared notes
    (`shared/`, `SPEC`) anywhere: the method is docs/method.md."""
    outside = re.compile(r"shared/|\bSPEC\b")
    code = [*ROOT.glob("aim/**/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "Makefile", ROOT / "pyproject.toml"]
    found = []
    for path in [README, *pages(), *code]:
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if outside.search(line) or (path.suffix == ".md" and "../" in line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, found


def test_method_citations_name_sections_that_exist():
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", (DOCS / "method.md").read_text(), re.M)}
    assert sections == {1, 2, 3, 4, 5}
    cited = []
    for path in [*ROOT.glob("aim/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        for citation in re.findall(r"docs/method\.md((?:,? ?§\d+)+)", path.read_text()):
            cited += [(path.name, int(n)) for n in re.findall(r"§(\d+)", citation)]
    assert cited, "the code cites docs/method.md by section"
    assert not [(name, n) for name, n in cited if n not in sections]


def test_every_result_has_a_date_and_a_command():
    text = (DOCS / "results.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert sections
    for section in sections:
        title = section.splitlines()[0]
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", section), f"results.md '{title}' has no date"
        assert re.search(r"[Cc]ommand", section), f"results.md '{title}' names no command"
