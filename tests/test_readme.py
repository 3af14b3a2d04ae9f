"""Every ```python block of README.md and docs/*.md runs as written, on CPU, in a fresh namespace; a block
that imports an optional extra's package skips where that extra is not installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The packages of the optional extras (pyproject.toml) a documented block may import.
EXTRAS = {"transformers", "safetensors", "lm_eval", "networkx", "matplotlib", "mlflow"}
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    """(id, source) of each python block: ``README.md:42`` names the block's first line."""
    blocks = []
    for doc in DOCUMENTS:
        text = doc.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            blocks.append((f"{doc.relative_to(ROOT)}:{line}", match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert any(name.startswith("README.md:") for name, _ in BLOCKS)


@pytest.mark.parametrize("name,source", BLOCKS, ids=[n for n, _ in BLOCKS])
def test_block_runs(name, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files leaves them here
    with torch.random.fork_rng():
        try:
            exec(compile(source, name, "exec"), {"__name__": "__snippet__"})
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in EXTRAS:
                pytest.skip(f"needs the optional package {e.name}")
            raise
