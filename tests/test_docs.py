"""The documentation site: every relative link resolves inside the repository, the nav lists every page, and
(when mkdocs is installed, `pip install -e ".[docs]"`) the strict build passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^[ ]{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def links(text: str) -> list[str]:
    """The link targets of a markdown text, outside code blocks and code spans."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)


def nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node] if not EXTERNAL.match(node) else []
    if isinstance(node, list):
        return [f for item in node for f in nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in nav_files(value)]
    return []


def config() -> dict:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def test_docs_exist():
    assert CONFIG.is_file()
    assert (DOCS / "index.md").is_file()
    assert len(pages()) > 1


def test_link_parser():
    text = "[a](x.md) ![b](img/y.png#z) `[c](no.md)`\n```\n[d](no.md)\n```\n[e]: ref.md\n[f][wsss.models]"
    assert links(text) == ["x.md", "img/y.png#z", "ref.md"]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_resolve(page: Path):
    """A relative link must name a file of the repository (docs/ or elsewhere), never one outside it."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path.startswith("/"):
            broken.append(f"{target} (absolute)")
            continue
        resolved = (page.parent / path).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not (resolved.is_file() or (resolved.is_dir() and (resolved / "index.md").is_file())):
            broken.append(f"{target} (no such file)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_nav_lists_every_page():
    nav = nav_files(config()["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    listed = set(nav)
    on_disk = {p.relative_to(DOCS).as_posix() for p in pages()}
    assert not on_disk - listed, f"pages missing from mkdocs.yml's nav: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"nav entries without a page: {sorted(listed - on_disk)}"


def test_api_pages_cover_the_packages():
    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    for package in ("models", "localize", "refine", "pseudo", "segment", "evaluate", "data", "train", "methods",
                    "visualize"):
        assert re.search(rf"^::: wsss\.{package}$", text, re.M), f"no API page renders wsss.{package}"


@pytest.mark.slow
def test_strict_build(tmp_path: Path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(CONFIG),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "models" / "index.html").is_file()
