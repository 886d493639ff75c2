"""Pool workers end with the process that started them (``medunet.workers``), whatever the start method."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.process_helpers import HAS_PROC, descendants, kill_all, survivors_after_sigterm

# A parent with two pool workers, one busy with a long task and one idle (waiting for work, as the evaluation's
# workers are once the cases run out); it prints READY once both workers run, then waits for its task.
PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from medunet.workers import exit_with_parent
if __name__ == "__main__":
    initializer = {{"initializer": exit_with_parent, "initargs": (os.getpid(),)}} if {watch} else {{}}
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("{method}"), **initializer) as pool:
        busy = pool.submit(time.sleep, 120)
        pool.submit(time.sleep, 0).result()  # the pool starts a second worker for it, idle afterwards
        print("READY", flush=True)
        busy.result()
"""


def _orphans_after_killing(method: str, watch: bool, patience: float) -> set[int]:
    """Start PARENT, SIGTERM it once its workers run, and return its processes still running ``patience`` seconds
    later (killing them, so that the test leaves none behind)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(method=method, watch=watch)],
                              stdout=subprocess.PIPE, text=True)
    workers: set[int] = set()
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "READY"
        workers = descendants(parent.pid)
        assert len(workers) >= 2
        return survivors_after_sigterm(parent, workers, patience)
    finally:
        kill_all(parent, workers)


@pytest.mark.skipif(not HAS_PROC, reason="reads the process table from /proc (Linux)")
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_workers_end_with_their_killed_parent(method: str) -> None:
    assert _orphans_after_killing(method, watch=True, patience=15) == set()


@pytest.mark.skipif(not HAS_PROC, reason="reads the process table from /proc (Linux)")
def test_without_the_watch_a_killed_parent_leaves_its_workers_running() -> None:
    """The case :func:`medunet.workers.exit_with_parent` exists for: a plain pool's workers outlive their parent."""
    assert _orphans_after_killing("fork", watch=False, patience=3)
