"""The process table, read from /proc (Linux), for the tests that kill a parent process and look for orphans."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

HAS_PROC = Path("/proc/self/stat").is_file()


def running_processes() -> dict[int, int]:
    """pid -> parent pid of every process still running (zombies count as ended: nothing may reap an orphan)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while being read
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]  # the name, in parentheses, may hold spaces
        if state not in "ZX":
            table[int(entry.name)] = int(parent)
    return table


def descendants(pid: int) -> set[int]:
    """The running processes started by ``pid``, by its children, and so on."""
    table, found, frontier = running_processes(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in table.items() if parent in frontier} - found
        found |= frontier
    return found


def survivors_after_sigterm(process: subprocess.Popen, processes: set[int], patience: float) -> set[int]:
    """SIGTERM ``process`` and return those of ``processes`` (its descendants) still running ``patience`` seconds
    later; the caller kills them (:func:`kill_all`)."""
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    deadline = time.monotonic() + patience
    while processes & set(running_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes & set(running_processes())


def kill_all(process: subprocess.Popen, processes: set[int]) -> None:
    """SIGKILL ``process`` and whichever of ``processes`` still run, so that a test leaves none behind."""
    process.kill()
    for pid in processes & set(running_processes()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
