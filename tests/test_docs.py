"""The docs stay honest and findable: results pages and README are what their templates and the
committed results give, results prose types no number in, links resolve, and every module is on
the maps (its package's docstring and docs/design.md)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "docs" / "templates"


def test_pages_are_what_their_templates_and_results_give():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), "--check"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _prose(text: str) -> str:
    """A template without what may hold digits: the values block, placeholders, code, links, comments."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\{\{.*?\}\}", "", text)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


@pytest.mark.parametrize("template", sorted((TEMPLATES / "results").glob("*.md")), ids=lambda p: p.name)
def test_results_prose_types_no_number(template):
    # a number is a token of digits not glued to a name (v2-3, fp32, SmolLM2-135M and e8p are names,
    # and so are "format 2" and "batch 1"); quotations go in backticks
    numbers = [(i, line) for i, line in enumerate(_prose(template.read_text()).splitlines(), 1)
               if re.search(r"(?i)(?<![\w.\-])(?<!format )(?<!batch )\d+(?:[.,]\d+)*(?![\w\-])", line)]
    assert not numbers, f"{template.name}: numbers typed in (take them from results/ in the values block): {numbers}"


def test_readme_is_short_and_has_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert [b.strip() for b in blocks] == [
        'pip install torch==2.13.0 && pip install -e ".[test]" && python recipes/quantize.py', "python -m pytest -q"]
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "CHANGELOG.md",
                                  *sorted(p for p in (ROOT / "docs").rglob("*.md") if TEMPLATES not in p.parents)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def _packages() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "hf_rbe").rglob("__init__.py"))


@pytest.mark.parametrize("package", _packages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_on_the_maps(package):
    import ast

    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    design = (ROOT / "docs" / "design.md").read_text()
    modules = [p.stem for p in package.glob("*.py") if p.stem != "__init__"]
    subpackages = [p.name for p in package.iterdir() if (p / "__init__.py").exists()]
    if package == ROOT / "hf_rbe":
        return  # the top level holds the entry points (docs/design.md, layer 5)
    for name in modules + subpackages:
        assert re.search(rf"\b{name}\b", doc), f"{package.name}/__init__.py does not list {name}"
        assert re.search(rf"\b{name}\b", design), f"docs/design.md does not mention {package.name}.{name}"


def test_a_name_defined_twice_in_a_values_block_is_refused():
    """A second definition would silently replace the first everywhere it is used (the README's
    MiniLM cosine column once showed a perplexity that way)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build
    finally:
        sys.path.pop(0)
    assert build.values("a = 1\nb = a + 1", "t") == {"a": 1, "b": 2}
    with pytest.raises(SystemExit, match="a is defined twice"):
        build.values("a = 1\na = 2", "t")


def test_a_selector_splits_at_the_first_slash_outside_brackets():
    """Settings such as ``v2-3/g64`` carry a slash inside the brackets that pick a row."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build
    finally:
        sys.path.pop(0)
    data = {"rows": [{"setting": "v2-3", "r": {"x": 1}}, {"setting": "v2-3/g64", "r": {"x": 2}}]}
    assert build.select(data, "rows[setting=v2-3/g64]/r/x", "t") == 2
    assert build.select(data, "rows[setting=v2-3]/r/x", "t") == 1
    assert build.select(data, "rows[*setting=v2-3/g64]/r", "t") == [{"x": 2}]
    assert build.select(data, "rows", "t") == data["rows"]
