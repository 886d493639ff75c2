"""Atomic file writes: a kill at any moment leaves the previous complete file or the new one, never a part.

Every file medunet writes (checkpoints, run records, predictions, ``cases.csv``, ``summary.json``, reports)
goes to a hidden temporary file in the destination's folder, ``.tmp<PID>.<name>``, is fsynced, and is then
``os.replace``-d over the destination, which POSIX makes atomic within one file system. The temporary name
keeps the destination's suffix, so writers that pick the format from it (nibabel, MONAI's ``SaveImage``,
matplotlib's ``PdfPages``) write the right format.

A SIGKILL leaves the temporary file behind. It is hidden, so case listings skip it (see
:func:`is_hidden`), and :func:`remove_stale_temporaries` deletes those of processes that no longer run.

No write follows a symbolic link out of its folder. A run folder is data people send each other, and one could hold
``.tmp<PID>.metrics.json -> ~/.bashrc`` (PIDs are few): the temporary file is created anew, exclusively and without
following a link (``O_EXCL | O_NOFOLLOW``), and ``os.replace`` replaces a link at the destination, not its target.
The files medunet appends to or locks (``train.log``, ``.training.lock``) are opened with :func:`open_own_file`, which
refuses a link.

Example:
    >>> with atomic_path("out/case1.nii.gz") as temporary:  # doctest: +SKIP
    ...     nib.save(image, temporary)
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from medunet.errors import MedunetError
from medunet.workers import process_runs

_TEMPORARY_NAME = re.compile(r"^\.tmp(\d+)\.")
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the OS has none (Windows: no symbolic links by default)


def temporary_path(path: str | Path) -> Path:
    """The hidden temporary file beside ``path`` that this process writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".tmp{os.getpid()}.{path.name}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the destination file; its folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        temporary.unlink(missing_ok=True)  # one of a killed process with this PID, or a planted link: never followed
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o666))
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)  # make the rename itself durable
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path, merge: bool = False, last: str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path`` to fill; on success it takes ``path``'s place (an existing
    ``path`` is moved aside first and deleted once the new one is in place).

    On an exception the temporary folder is deleted and ``path`` is left as it was: a failed export never leaves
    half a bundle, nor takes the previous one away.

    Args:
        path: the folder to create or replace; its parent is created.
        merge: instead of replacing ``path``, move each entry of the built folder into it (replacing entries of the
            same name, keeping the others): a folder that may hold files of the user's.
        last: with ``merge``, the entry moved last (the one that makes the others count, e.g. a plan).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_folder(path)
    temporary = temporary_path(path)
    aside = path.with_name(f".old{os.getpid()}.{path.name}")
    temporary.mkdir()
    try:
        yield temporary
        if merge:
            path.mkdir(exist_ok=True)
            for entry in sorted(temporary.iterdir(), key=lambda entry: (entry.name == last, entry.name)):
                os.replace(entry, path / entry.name)
        elif path.exists() or path.is_symlink():
            os.replace(path, aside)
            os.replace(temporary, path)
            _remove(aside)
        else:
            os.replace(temporary, path)
    finally:
        _remove(temporary)


def _recover_folder(path: Path) -> None:
    """Clean up after :func:`atomic_folder` runs for ``path`` that were killed: their temporary folders are deleted,
    and a previous ``path`` they had moved aside is put back if nothing took its place."""
    pattern = re.compile(rf"^\.(tmp|old)(\d+)\.{re.escape(path.name)}$")
    for entry in sorted(path.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or (process_runs(int(match.group(2))) and int(match.group(2)) != os.getpid()):
            continue
        if match.group(1) == "old" and not (path.exists() or path.is_symlink()):
            os.replace(entry, path)
        else:
            _remove(entry)


def _remove(path: Path) -> None:
    """Delete a file, a link (not its target) or a folder tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def replace_atomically(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a binary file object of a temporary file, then move it over ``path`` atomically.

    Args:
        path: the destination file; its folder is created.
        write: writes the content to the open file.
    """
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        write(file)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        data: the content.
        path: the destination file; its folder is created.
    """
    replace_atomically(path, lambda file: file.write(data))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        text: the content.
        path: the destination file; its folder is created.
    """
    atomic_write_bytes(text.encode("utf-8"), path)


def open_own_file(path: str | Path, mode: str = "a") -> IO[str]:
    """Open a file medunet appends to or locks (a log, a lock file) as UTF-8 text, refusing a symbolic link.

    Args:
        path: the file; created if missing.
        mode: ``"a"`` (append) or ``"a+"`` (append and read).

    Raises:
        MedunetError: ``path`` is a symbolic link or not a regular file, naming it and the fix.
    """
    # O_NONBLOCK: a named pipe in its place fails instead of waiting for a reader; regular files ignore it.
    flags = {"a": os.O_WRONLY, "a+": os.O_RDWR}[mode] | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | _NO_FOLLOW
    path = Path(path)
    if path.is_symlink():
        problem = f"is a symbolic link (to {os.readlink(path)!r})"
    else:
        try:
            descriptor = os.open(path, flags, 0o666)  # O_NOFOLLOW: a link made since the check fails here too
        except IsADirectoryError:
            problem = "is a folder"
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: a named pipe nobody reads
                raise
            problem = "is not a regular file"
        else:
            if stat.S_ISREG(os.fstat(descriptor).st_mode):
                return os.fdopen(descriptor, mode, encoding="utf-8")
            os.close(descriptor)
            problem = "is not a regular file"
    raise MedunetError(f"{path} {problem}: medunet writes this file itself and follows no link out of its folder "
                       "(a folder from elsewhere could point it at any file of yours). Fix: delete it and rerun.")


def is_hidden(path: str | Path) -> bool:
    """Whether ``path`` is a hidden file (``.name``): temporary files of :func:`atomic_path`, editor files."""
    return Path(path).name.startswith(".")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files in ``folder`` left by killed processes; returns the deleted files.

    Temporary files of processes that still run (another medunet writing to the same folder) are kept.

    Args:
        folder: a folder written with :func:`atomic_path`; a missing folder has nothing to remove.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.match(path.name)
        if match and path.is_file() and not process_runs(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync(path: Path) -> None:
    """Flush a written file (or a folder's entries) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
