"""A regular (non-editable) install works on its own: the wheel carries the workflows and templates it needs, so
``medunet demo`` runs from a folder that is not the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medunet.paths import REPO_ROOT

pytestmark = pytest.mark.slow  # builds a wheel and trains the demo for one epoch


def test_a_wheel_install_runs_the_demo_from_another_folder(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
             str(REPO_ROOT)]
    subprocess.run(build, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("medunet-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import medunet; print(medunet.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, encoding="utf-8", errors="replace", check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout
    demo = subprocess.run([sys.executable, "-m", "medunet", "demo", "--out", "runs/demo", "--epochs", "1",
                           "--no-tracking"], cwd=elsewhere, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (elsewhere / "runs" / "demo" / "run" / "evaluation" / "report.html").is_file()
    assert (elsewhere / "runs" / "demo" / "run" / "workflow.json").is_file()
