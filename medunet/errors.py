"""User-facing errors: each message names the file, case or setting that is wrong and how to fix it."""

from __future__ import annotations


class MedunetError(ValueError):
    """A problem with the user's input (data, config, arguments) rather than a bug in medunet."""


def user_error_inside(error: BaseException) -> MedunetError | None:
    """The ``MedunetError`` that ``error`` is or wraps (MONAI wraps errors raised inside a transform chain or a
    config evaluation in ``RuntimeError``), so the user sees the one-line message rather than a traceback."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MedunetError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
