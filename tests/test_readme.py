"""The README's examples run as written: the Python examples for networks and profiling, and every shell
block not marked ``<!-- test: skip (why) -->`` (those that take minutes or need real data), in a temp folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medunet.paths import REPO_ROOT

SECTIONS_RUN = ("## Networks", "## Profiling")
SKIP_MARK = "<!-- test: skip"
# What the README's relative paths name besides the outputs: linked into the temp folder, never written.
REPO_PATHS = ("medunet", "data_lists", "tests")


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def python_blocks(section: str) -> list[str]:
    text = readme()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.DOTALL)


def shell_blocks() -> list[tuple[int, str, bool]]:
    """``(line, commands, skipped)`` for each ```bash block; skipped when the line before is the skip mark."""
    blocks = []
    for match in re.finditer(r"(?:^([^\n]*)\n)?```bash\n(.*?)```", readme(), flags=re.DOTALL | re.MULTILINE):
        line = readme().count("\n", 0, match.start(2))
        blocks.append((line, match.group(2), (match.group(1) or "").startswith(SKIP_MARK)))
    return blocks


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


def test_the_first_block_is_the_two_ci_commands_and_is_skipped() -> None:
    line, commands, skipped = shell_blocks()[0]
    assert skipped and len(commands.strip().splitlines()) == 2


@pytest.mark.parametrize("line", [line for line, _, skipped in shell_blocks() if not skipped])
def test_readme_shell_block_runs(line: int, tmp_path: Path) -> None:
    commands = next(text for at, text, _ in shell_blocks() if at == line)
    for name in REPO_PATHS:
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env, capture_output=True,
                            text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, f"README line {line}:\n{commands}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr


def test_readme_paths_into_the_demo_folder_are_the_demo_task() -> None:
    """A bundle run on a folder the demo never writes exits 0 having done nothing: the names must match."""
    from medunet.engines import demo

    named = set(re.findall(r"runs/demo/(Task\d+_\w+)", readme()))
    assert named and named <= {demo.PHANTOM_TASK}, named
