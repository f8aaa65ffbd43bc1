"""The README and the documentation site stay what they promise: a README of a few screens
whose links work, every page in the site's navigation, every public name in the API reference,
code blocks that are at least valid Python, deployment files that parse. (`tox -e docs` builds
the site itself with ``mkdocs build --strict``: links, anchors, snippets, references.)"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

import sqlflag
import sqlflag.alembic
import sqlflag.testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
#: Pages the other pages include (snippets), never shown on their own.
INCLUDED_ONLY = {"generated/performance.md"}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def nav_pages(nav: list) -> list[str]:
    found: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        found += nav_pages(value) if isinstance(value, list) else [value]
    return found


def mkdocs_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_the_readme_fits_in_12_kib():
    assert README.stat().st_size <= 12_288


def test_every_relative_link_of_the_readme_reaches_a_file():
    text = README.read_text()
    targets = [t for t in LINK.findall(text) if "://" not in t and not t.startswith("#")]
    assert targets, "the README links into the documentation"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert missing == []
    # Links into docs/ point at pages of the site's navigation.
    pages = set(nav_pages(mkdocs_config()["nav"]))
    outside = [t for t in targets if t.startswith("docs/") and t.endswith(".md")
               and t.removeprefix("docs/").split("#")[0] not in pages]
    assert outside == []


def test_the_readme_quickstart_shows_listen():
    text = README.read_text()
    assert ".listen(True)" in text and "build_async()" in text


def test_every_page_is_in_the_navigation():
    pages = {
        str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
        if "_hooks" not in p.parts
    } - INCLUDED_ONLY
    assert pages - set(nav_pages(mkdocs_config()["nav"])) == set()


@pytest.mark.parametrize(
    ("module", "page"),
    [(sqlflag, "reference/index.md"), (sqlflag.testing, "reference/testing.md"),
     (sqlflag.alembic, "reference/alembic.md")],
)
def test_every_public_name_is_in_the_api_reference(module, page):
    text = (DOCS / page).read_text()
    if module is not sqlflag:  # the page renders the whole module
        assert f"::: {module.__name__}\n" in text
        return
    rendered = set(re.findall(r"^::: sqlflag\.(\w+)$", text, flags=re.M))
    elsewhere = {"alembic"}  # a page of its own
    assert set(sqlflag.__all__) - elsewhere == rendered


def test_the_builder_methods_document_their_arguments():
    for name in ("handle", "name", "process", "interval", "timeout", "jitter", "logger",
                 "metrics_registerer", "metrics_subsystem", "precheck", "on_raised",
                 "on_lowered", "create_table", "listen", "schema"):
        doc = getattr(sqlflag.FlagBuilder, name).__doc__ or ""
        assert "Args:\n" in doc and "value:" in doc, name


def python_blocks(text: str) -> list[str]:
    """The code of every ```python block, also those indented in a list item."""
    found = re.findall(r"^( *)```python[^\n]*\n(.*?)^\1```", text, flags=re.M | re.S)
    return [textwrap.dedent(code) for _, code in found]


@pytest.mark.parametrize("path", [*sorted(p.name for p in DOCS.glob("*.md")), "README.md"])
def test_python_code_blocks_compile(path):
    text = (README if path == "README.md" else DOCS / path).read_text()
    for block in python_blocks(text):
        if block.lstrip().startswith("--8<--"):
            continue  # included from examples/, which the suite runs
        # Top-level `await` and `async with` are how the pages show async code.
        wrapped = "async def _():\n" + "".join(f"    {ln}\n" for ln in block.splitlines())
        compile(wrapped, f"{path} block", "exec")


def test_the_kubernetes_example_names_each_replica_after_its_pod():
    manifest = yaml.safe_load((ROOT / "examples" / "deploy" / "kubernetes.yaml").read_text())
    containers = manifest["spec"]["template"]["spec"]["containers"]
    for container in containers:
        refs = [e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
                if "fieldRef" in e.get("valueFrom", {})]
        assert refs == ["metadata.name"], container["name"]


def test_the_generated_performance_page_is_stamped():
    text = (DOCS / "generated" / "performance.md").read_text()
    for field in ("| date |", "| sqlflag commit |", "| machine |", "| Python |", "| servers |",
                  "| command |"):
        assert field in text
    assert "python -m benchmarks" in text


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The long lines of prose of a page (outside code blocks and tables)."""
    found: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if not fenced and len(stripped) >= 70 and not stripped.startswith(("|", "--8<--")):
            found.append((number, stripped))
    return found


def test_no_text_exists_twice():
    """Text the README and a page share lives once and is included, never copied."""
    seen: dict[str, str] = {}
    twice = []
    for path in [README, *sorted(DOCS.rglob("*.md"))]:
        for number, line in prose_lines(path):
            where = f"{path.relative_to(ROOT)}:{number}"
            if line in seen:
                twice.append((seen[line], where, line))
            seen.setdefault(line, where)
    assert twice == []
