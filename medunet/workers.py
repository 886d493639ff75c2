"""Worker processes that end with the process that started them.

A ``ProcessPoolExecutor`` worker does not watch its parent: when the parent is killed (``kill PID``, an out-of-memory
kill, a crash) its workers go on with the task in hand. For the bench's trainings that is tens of minutes of an
orphan competing for the cores, and a rerun of the bench would then train the same run folder twice at once. Ctrl-C is
not the case: it reaches the whole process group. Pass :func:`exit_with_parent` as a pool's initializer (or call it
from one) and a worker stops within :data:`PARENT_CHECK_SECONDS` of its parent's end.

The check runs in a daemon thread. A worker ends when its own parent changes (an orphan is re-parented to init or a
subreaper: this catches a parent that died but was not reaped yet) or when the process that started the pool no longer
exists (under the ``forkserver`` start method, the default on Linux from Python 3.14, a worker's parent is the fork
server, which ends with that process). Linux's ``prctl(PR_SET_PDEATHSIG)`` would signal sooner but fires when the
*thread* that started the worker ends, and the pool starts replacement workers (``max_tasks_per_child``) from its
manager thread.

Example:
    >>> import multiprocessing, os
    >>> from concurrent.futures import ProcessPoolExecutor
    >>> with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),  # doctest: +SKIP
    ...                          initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
    ...     pool.submit(print, "a task").result()
"""

from __future__ import annotations

import os
import sys
import threading
import time

#: How often (seconds) a worker checks that the process that started it is still running.
PARENT_CHECK_SECONDS = 1.0

#: A worker's exit status when its parent is gone: 128 + SIGTERM, as if the parent's end had been sent on to it.
ORPHAN_EXIT_CODE = 143


def exit_with_parent(parent_pid: int, interval: float = PARENT_CHECK_SECONDS) -> None:
    """End this process once ``parent_pid`` (the process that started the pool) or this process's own parent is gone,
    checked every ``interval`` seconds in a daemon thread; the reason is printed to this process's standard output
    (a training's ``train.log``).

    The exit skips Python's clean-up (``os._exit``): whatever the worker was writing is left as it was, which is safe
    for medunet's outputs, all written atomically (a training resumes from its last checkpoint).
    """
    own_parent = os.getppid()
    if not process_runs(parent_pid):  # it ended before this worker started
        _exit_orphaned(parent_pid)
    threading.Thread(target=_watch_parent, args=(parent_pid, own_parent, interval), name="medunet-exit-with-parent",
                     daemon=True).start()


def _watch_parent(parent_pid: int, own_parent: int, interval: float) -> None:
    while os.getppid() == own_parent and process_runs(parent_pid):
        time.sleep(interval)
    _exit_orphaned(parent_pid)


def process_runs(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 checks without sending anything); this process always does."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    except OSError:  # e.g. a PID out of range: not a process
        return False
    return True


def _exit_orphaned(parent_pid: int) -> None:
    print(f"medunet: the process that started this worker (pid {parent_pid}) has ended; this worker ends too "
          f"(pid {os.getpid()}). Rerun the command: finished work is kept and trainings resume from their last "
          "checkpoint.", file=sys.stdout, flush=True)
    os._exit(ORPHAN_EXIT_CODE)
