"""The documentation site (mkdocs.yml) covers the package: every module and subpackage
directly under normlab has an API page that mkdocstrings renders (``::: normlab.X``),
and every page of the navigation exists. ``mkdocs build --strict`` (make test) checks
the rest: links, references, docstrings it cannot read."""

from __future__ import annotations

import re
from pathlib import Path

import normlab

REPO = Path(__file__).resolve().parents[2]
SRC = Path(normlab.__file__).parent


def _nav_pages() -> list[str]:
    text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:"):]
    nav = nav[: nav.index("\n\n")]
    return re.findall(r":\s*(\S+\.md)\s*$", nav, flags=re.M)


def test_every_top_level_module_has_an_api_page():
    documented = set()
    for page in _nav_pages():
        documented |= set(re.findall(r"^::: (normlab(?:\.\w+)?)\s*$",
                                     (REPO / "docs" / page).read_text(encoding="utf-8"),
                                     flags=re.M))
    modules = {f"normlab.{p.stem}" for p in SRC.glob("*.py") if not p.stem.startswith("_")}
    packages = {f"normlab.{p.parent.name}" for p in SRC.glob("*/__init__.py")}
    assert sorted((modules | packages | {"normlab"}) - documented) == []


def test_every_nav_page_exists():
    pages = _nav_pages()
    assert "design.md" in pages and "api/nn.md" in pages
    assert [p for p in pages if not (REPO / "docs" / p).is_file()] == []
