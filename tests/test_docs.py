"""The README and docs/ hold only what works: every Python block compiles, every YAML and JSON block
parses, every BELLE_* name is a setting, every relative link and anchor resolves, and the README keeps
its two commands. (docs/configuration.md's content is checked by tests/test_settings.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from producer.settings import Settings
from producer.settings_reference import env_name

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)\)")


def blocks(lang: str) -> list[tuple[str, str]]:
    """(a name for the block, its code) for every fenced block of ``lang`` in the README and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match["lang"] == lang:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match["body"]))
    return found


def prose(text: str) -> str:
    """``text`` without its fenced blocks (a '#' in a YAML or shell block is not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(match[1])
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def test_the_docs_pages_exist_and_the_readme_links_every_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(PAGES) > 1, "docs/ holds no pages"
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"the README does not link docs/{page.name}"


PYTHON = blocks("python")


@pytest.mark.parametrize(("name", "code"), PYTHON, ids=[name for name, _ in PYTHON])
def test_every_python_block_compiles(name, code):
    compile(code, name, "exec")  # a SyntaxError names the page and the block's line


def test_there_are_python_blocks_to_compile():
    assert len(PYTHON) >= 5


def test_every_yaml_and_json_block_parses():
    documents = [(name, code, yaml.safe_load) for name, code in blocks("yaml")]
    documents += [(name, code, json.loads) for name, code in blocks("json")]
    documents += [(name, line, json.loads) for name, code in blocks("jsonl") for line in code.splitlines() if line.strip()]
    for name, code, parse in documents:
        try:
            parse(code)
        except ValueError as exc:  # (yaml.YAMLError is not one)
            pytest.fail(f"{name}: {exc}")
        except yaml.YAMLError as exc:
            pytest.fail(f"{name}: {exc}")


def test_every_setting_named_in_the_docs_exists():
    settings = {env_name(name) for name in Settings.model_fields}
    for page in PAGES:
        for name in set(re.findall(r"\bBELLE_[A-Z][A-Z0-9_]*\b", page.read_text(encoding="utf-8"))):
            assert name in settings, f"{page.relative_to(ROOT)} names {name}, which is not a setting (producer/settings.py)"


def test_every_relative_link_and_anchor_resolves():
    for page in PAGES:
        for match in LINK.finditer(prose(page.read_text(encoding="utf-8"))):
            target = match["target"]
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: link {target!r}"
            assert resolved.exists(), f"{where}: no such file"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{where}: no such heading in {resolved.relative_to(ROOT)}"


def test_the_readme_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = [code for name, code in blocks("bash") if name.startswith("README.md:") and "make demo" in code]
    assert quick_start and "make test" in quick_start[0], "the README's quick start must show `make demo` and `make test`"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
