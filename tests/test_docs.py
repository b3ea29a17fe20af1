"""The documentation says what the code does: the README stays a short user's page, every compile
option is documented, every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import click

from lrcompile import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_short_page_without_work_history():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= 1500
    assert not re.findall(r"\b[0-9a-f]{7,40}\b", text)  # no commit hashes
    assert "python -m pytest -q" in text  # the test command CI runs (.ci/run)
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_every_compile_option_is_documented_in_docs_cli():
    text = (ROOT / "docs" / "cli.md").read_text()
    options = [
        max(param.opts, key=len)
        for param in cli.main.commands["compile"].params
        if isinstance(param, click.Option)
    ]
    missing = [o for o in options if not re.search(rf"{re.escape(o)}(?![\w-])", text)]
    assert options and not missing


def test_every_relative_link_resolves():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
