"""The Python API as documented (issue 19): every ```python block of docs/api.md and of the README's
"Python API" section runs, in order, in one session next to a trained `runs/digits` (its asserts included)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def readme_api_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Python API")
    end = text.index("\n## ", start + 1)
    return text[start:end]


@pytest.fixture(scope="module")
def workdir(trained_run, tmp_path_factory):
    """A folder with runs/digits: a copy of the session's trained run (class-conditional, as the digits have
    labels)."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(trained_run, root / "runs" / "digits")
    return root


def _run_blocks(blocks: list[str], name: str, workdir: Path, monkeypatch) -> dict:
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{name} block {i + 1}", "exec"), namespace)  # noqa: S102 - the docs under test
    return namespace


def test_api_doc_snippets_run(workdir, monkeypatch):
    blocks = python_blocks((REPO / "docs" / "api.md").read_text())
    assert len(blocks) >= 8
    namespace = _run_blocks(blocks, "docs/api.md", workdir, monkeypatch)
    assert namespace["verdict"].exact and namespace["conditional"].num_classes == 10
    assert (workdir / "exports" / "digits" / "SHA256SUMS").is_file()


def test_readme_api_snippets_run(workdir, monkeypatch):
    blocks = python_blocks(readme_api_section())
    assert blocks
    namespace = _run_blocks(blocks, "README.md", workdir, monkeypatch)
    assert namespace["result"].images.dtype.name == "uint8"
