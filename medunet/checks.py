"""Checks of user-given settings, shared by the command line (argparse ``type=``) and the workflows.

Each check returns the value (converted) or raises :class:`~medunet.errors.MedunetError` with one line that
names the setting, the value, what is allowed and the fix. Nothing heavy is imported here: torch only when a
device other than the CPU is asked for, so ``medunet --help`` and argument errors stay fast.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from medunet.errors import MedunetError

# Device strings torch understands that medunet runs on: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``xpu:0``.
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
# OSError numbers that mean "this folder cannot be written", with the fix for each.
WRITE_FIXES = {
    errno.ENOSPC: "free disk space there, or pick a folder on another disk",
    errno.EROFS: "pick a folder on a writable file system",
    errno.EACCES: "pick a folder you may write to, or fix its permissions",
    errno.EPERM: "pick a folder you may write to, or fix its permissions",
    errno.EDQUOT: "free space within your disk quota, or pick another folder",
}


def _fix(fix: str | None, name: str, example: Any) -> str:
    return fix or f"Fix: e.g. {name}={example}."


def check_int(value: Any, name: str, minimum: int = 1, fix: str | None = None) -> int:
    """``value`` as an int of at least ``minimum`` (``True``, ``2.5`` and ``"3"`` are refused).

    Args:
        value: the setting.
        name: the option or workflow key, as the user wrote it (``--sw-batch-size``, ``batch_size``).
        minimum: the smallest value allowed.
        fix: the "Fix: ..." sentence; default an example assignment.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MedunetError(f"{name} is {value!r}; it must be a whole number >= {minimum}. "
                           f"{_fix(fix, name, max(minimum, 1))}")
    return int(value)


def check_number(
    value: Any, name: str, low: float = 0.0, high: float | None = None, low_open: bool = False,
    high_open: bool = True, fix: str | None = None,
) -> float:
    """``value`` as a float in ``[low, high)`` (``low_open``/``high_open`` choose the brackets; ``high`` None: no bound).

    Args:
        value: the setting.
        name: the option or workflow key.
        low: the lower bound.
        high: the upper bound, or None.
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        fix: the "Fix: ..." sentence.
    """
    bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}' + (')' if high_open else ']')}"
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is not None:
        number = float(number)
        too_low = number <= low if low_open else number < low
        too_high = high is not None and (number >= high if high_open else number > high)
        if not (too_low or too_high) and number == number:  # NaN fails every comparison: refuse it too
            return number
    example = low + (1.0 if high is None else (high - low) / 2)
    raise MedunetError(f"{name} is {value!r}; it must be a number in {bounds}. {_fix(fix, name, f'{example:g}')}")


def check_choice(value: Any, name: str, choices: Collection[str], fix: str | None = None) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise MedunetError(f"{name} is {value!r}; it must be one of {', '.join(map(repr, choices))}. "
                           f"{_fix(fix, name, next(iter(choices)))}")
    return value


def check_device(value: Any, name: str = "device", option: str | None = None) -> str | None:
    """A device string this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or None for "pick one".

    torch is imported only for a non-CPU device, to ask whether it is there.

    Args:
        value: the device string (or a ``torch.device``), or None.
        name: the setting, as named in the message (``device``).
        option: how the user sets it, for the fix (default ``--set device=``; ``--device`` on the CLI).
    """
    if value is None:
        return None
    text, use = str(value), f"{option} cpu" if option else '--set device=cpu (or null to pick the GPU when there is one)'
    if not _DEVICE.match(text):
        raise MedunetError(f"{name} {value!r} is not a device name: it must be cpu, cuda, cuda:N or mps. Fix: {use}.")
    kind, _, index = text.partition(":")
    if kind == "cpu":
        return text
    import torch

    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or int(index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (or a CPU-only torch)"
            raise MedunetError(f"{name} {text!r} is not available: this machine has {have}. Fix: {use}.")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise MedunetError(f"{name} {text!r} is not available: MPS is not on this machine. Fix: {use}.")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise MedunetError(f"{name} {text!r} is not available: no XPU on this machine. Fix: {use}.")
    return text


def write_problem(error: OSError, path: str | Path | None = None) -> str:
    """One line for an OSError (a full disk, a read-only folder, a missing file): the path, the reason, the fix."""
    where = path or error.filename or "a file"
    reason = error.strerror or str(error)
    fix = WRITE_FIXES.get(error.errno or 0)
    if fix is None:
        return f"{where}: {reason}. Fix: check the path (and that its folder exists)."
    return f"cannot write {where}: {reason}. Fix: {fix}; the output folder is set with --run-dir, --out or --output."


def check_writable_dir(path: str | Path, name: str = "run folder") -> Path:
    """Create ``path`` if needed and write (then delete) a probe file in it, so a read-only or full disk
    fails before hours of work, not at the first checkpoint.

    Args:
        path: the folder.
        name: what the folder is (``run_dir``, ``--out``), named in the message.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medunet-write-check-") as probe:
            probe.write(b"medunet")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise MedunetError(f"{name}: {write_problem(error, folder)}") from None
    return folder


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x1x128x128x128"`` -> ``(1, 1, 128, 128, 128)``: an input shape ``BxCx[D]xHxW`` with positive sizes."""
    try:
        shape = tuple(int(part) for part in text.lower().replace(",", "x").split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise MedunetError(f"{text!r} is not BxCxHxW or BxCxDxHxW with positive sizes. Fix: e.g. 1x1x128x128x128.")
    return shape
