"""One training at a time in a run folder.

Two trainings in one run folder (a bench rerun while the first still runs, the same ``medunet train`` command in two
terminals) would each resume from the same checkpoint and overwrite each other's checkpoints, metrics and model.
:class:`RunFolderLock` makes the second one stop at once with the first one's pid and host. The lock is
``fcntl.flock`` on ``RUN_DIR/.training.lock``: the operating system releases it when its process ends, however it
ends (``kill -9`` included), so a lock is never left stale. Where there is no ``fcntl`` (Windows) nothing is locked;
``flock`` on a network file system may not see a process on another host.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from medunet.atomic import open_own_file
from medunet.errors import MedunetError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

#: The lock file, inside the run folder (hidden; it stays behind, empty of meaning once its process has ended).
LOCK_FILE = ".training.lock"


class RunFolderLock:
    """An exclusive lock on ``run_dir`` for one training process.

    Example:
        >>> with RunFolderLock("runs/demo/run"):  # doctest: +SKIP
        ...     train()
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._stream: IO[str] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._stream is not None

    def acquire(self) -> None:
        """Take the lock, or raise ``MedunetError`` naming the process that holds it and the fix."""
        if fcntl is None or self.held:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stream = open_own_file(self.run_dir / LOCK_FILE, "a+")  # held until release(); a planted link is refused
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.seek(0)
            holder = stream.read(200).strip() or "another process"
            holder = holder if holder.isprintable() else repr(holder)  # no terminal escapes from a planted file
            stream.close()
            raise MedunetError(
                f"{self.run_dir} is being trained by {holder}: two trainings in one run folder would overwrite each "
                "other's checkpoints. Fix: wait for that training to end (or stop it) and rerun to resume, or pass "
                "another --run-dir (for 'medunet bench', another --out)."
            ) from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        stream.flush()
        self._stream = stream

    def release(self) -> None:
        """Give the lock back (closing the file releases it)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()
