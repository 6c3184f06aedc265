"""The Python API as documented (issue 19): every ```python block of docs/api.md and of the README's
"Python API" section runs, in order, in one session next to a trained `runs/digits` (its asserts included)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ddm.data import manifest as mf

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
    """A folder with runs/digits (a copy of the session's trained run) and runs/digits-cond: the same run
    prepared with expert.model.num_classes=10. Only sampling is shown, so one conditional expert is trained
    (4 steps, no EMA: enough that the labels reach the zero-initialised adaLN layers) and stands in for all
    three (its pinned weights registered for each cluster, as tests/test_evaluate.py does for the monolith)."""
    from conftest import TINY_RUN_OVERRIDES

    from ddm.experts.train import train_expert

    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(trained_run, root / "runs" / "digits")
    cond = root / "runs" / "digits-cond"
    shutil.copytree(trained_run, cond, ignore=shutil.ignore_patterns("experts"))

    def conditional(manifest):
        manifest["config"]["expert"]["model"]["num_classes"] = 10
        manifest.pop("experts", None)

    mf.update_manifest(cond, conditional)
    train_expert(cond, 0, [*TINY_RUN_OVERRIDES, "expert.train.steps=4", "expert.train.warmup_steps=0",
                           "expert.train.ema_decay=0.0", "expert.train.holdout_loss=false"])
    entry = mf.read_manifest(cond)["experts"]["0"]
    for k in (1, 2):
        mf.record_component(cond, "experts", k, dict(entry))
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
