"""The README's Python examples for networks and profiling run as written."""

from __future__ import annotations

import re

import pytest

from medunet.paths import REPO_ROOT

SECTIONS_RUN = ("## Networks", "## Profiling")


def python_blocks(section: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.DOTALL)


@pytest.mark.parametrize("section", SECTIONS_RUN)
def test_readme_examples_run(section: str) -> None:
    blocks = python_blocks(section)
    assert blocks, f"no python example under {section}"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"README {section}", "exec"), namespace)  # noqa: S102 - our own README


def test_readme_network_example_shapes() -> None:
    namespace: dict = {}
    exec(python_blocks("## Networks")[0], namespace)  # noqa: S102
    assert tuple(namespace["logits"].shape) == (1, 3, 35, 51, 35)
