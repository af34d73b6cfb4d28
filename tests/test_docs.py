"""The README stays short and every page it links to builds with MkDocs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_readme_is_short_and_links_resolve():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) < 16_000  # reference material lives in docs/
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 5
    for link in links:
        assert (REPO_ROOT / link).is_file(), link
    # The two commands users rely on come first.
    assert readme.index("make run") < readme.index("make test") < 800


def test_docs_build_strictly(tmp_path: Path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    site = tmp_path / "site"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    nav = re.findall(r":\s*(\S+\.md)\s*$", (REPO_ROOT / "mkdocs.yml").read_text(), re.M)
    assert sorted(nav) == sorted(p.name for p in (REPO_ROOT / "docs").glob("*.md"))
    for page in nav:
        built = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert built.is_file(), built
