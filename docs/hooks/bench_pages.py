"""mkdocs hook: the bench notes become pages of the site, and links between docs/ and bench/ follow.

The notes stay in bench/ (README.md, HISTORY.md, results/*.md), beside the scripts, and every link
is written relative to the repository, as GitHub resolves it. The hook adds the notes under bench/
in the site and rewrites each link that leaves docs/ for one of them (or comes back) to the page's
place in the site. A link to any other file outside docs/ is left as written, so that
`mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
DOCS = "docs/"
BENCH_PAGES = ("bench/README.md", "bench/HISTORY.md", "bench/results/*.md")
INLINE_LINK = re.compile(r"(\]\()([^)\s#]+)([^)\s]*\))")


def bench_pages() -> list[str]:
    """The bench notes, as paths from the repository root (which are also their paths in the site)."""
    paths = {path for pattern in BENCH_PAGES for path in REPO.glob(pattern)}
    return sorted(path.relative_to(REPO).as_posix() for path in paths)


def on_files(files: Files, config) -> Files:
    for page in bench_pages():
        files.append(File(page, str(REPO), config["site_dir"], config["use_directory_urls"]))
    return files


def site_path(repo_path: str, pages: set[str]) -> str | None:
    """Where a file of the repository is in the site, or None if the site does not have it."""
    if repo_path.startswith(DOCS):
        return repo_path[len(DOCS) :]
    return repo_path if repo_path in pages else None


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    pages = set(bench_pages())
    repo_dir = posixpath.dirname(Path(page.file.abs_src_path).resolve().relative_to(REPO).as_posix())
    site_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(link: re.Match) -> str:
        target = link.group(2)
        if ":" in target or target.startswith("/"):
            return link.group(0)  # a URL or an absolute path: not ours
        in_site = site_path(posixpath.normpath(posixpath.join(repo_dir, target)), pages)
        if in_site is None:
            return link.group(0)
        return link.group(1) + posixpath.relpath(in_site, site_dir or ".") + link.group(3)

    return INLINE_LINK.sub(rewrite, markdown)
