"""The README, the docs site and the bench notes: every relative link resolves, the site builds
with `mkdocs build --strict`, and the README stays a short first page.

Anchors are checked with mkdocs' slugs (Python-Markdown's toc: lowercase, punctuation dropped,
spaces to "-"), which are GitHub's too for the headings used here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
README_MAX_LINES = 250


def markdown_pages() -> list[Path]:
    return sorted([README, *(REPO / "docs").rglob("*.md"), *(REPO / "bench").rglob("*.md")])


FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, where links and headings count."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slugify(text: str) -> str:
    """mkdocs' anchor for a heading: its rendered text, ASCII, lowercase, punctuation dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        heading = HEADING.match(line)
        if heading:
            slug = slugify(heading.group(2))
            unique, n = slug, 0
            while unique in found:  # mkdocs numbers repeated headings: slug_1, slug_2
                n += 1
                unique = f"{slug}_{n}"
            found.add(unique)
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of the page that does not resolve, with the reason."""
    problems = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            if path.startswith("/"):
                problems.append(f"{target}: write links relative to the page, as GitHub resolves them")
                continue
            resolved = (page.parent / path).resolve() if path else page
            if REPO not in resolved.parents and resolved != REPO:
                problems.append(f"{target}: leaves the repository")
            elif not resolved.exists():
                problems.append(f"{target}: {resolved.relative_to(REPO)} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    return problems


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "target.md").write_text("# Title\n\n## A `code` heading, with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](target.md#a-code-heading-with-punctuation) [ok](#here) `[not a link](nowhere.md)`\n"
        "# Here\n"
        "```\n[in code](nowhere.md)\n```\n"
        "[gone](missing.md) [bad anchor](target.md#nope) [out](../../x.md) [abs](/target.md)\n"
    )
    assert [problem.split(":")[0] for problem in broken_links(page)] == [
        "missing.md",
        "target.md#nope",
        "../../x.md",
        "/target.md",
    ]


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[0].startswith("# ")
    first_block = lines[lines.index("```sh") + 1 : lines.index("```")]
    assert lines.index("```sh") <= 3, "the set-up commands come right after the title"
    assert [line.split("#")[0].strip() for line in first_block] == ["make serve", "make test"]


def test_every_bench_is_in_the_bench_notes():
    notes = (REPO / "bench" / "README.md").read_text(encoding="utf-8")
    benches = [
        path.stem
        for path in (REPO / "bench").glob("*.py")
        if 'if __name__ == "__main__"' in path.read_text(encoding="utf-8")
    ]
    assert benches
    assert [bench for bench in benches if f"python -m bench.{bench}" not in notes] == []


MKDOCS_MISSING = importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None


@pytest.mark.skipif(
    MKDOCS_MISSING, reason="mkdocs or mkdocs-material is missing: both come with the dev extra (.[dev])"
)
def test_the_site_builds_with_strict(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "bench" / "index.html").exists()  # the bench notes are in the site
