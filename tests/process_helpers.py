"""The process table, read from /proc (Linux), for the tests that kill a parent process and look for orphans."""

from __future__ import annotations

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
