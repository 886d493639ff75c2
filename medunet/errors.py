"""User-facing errors: each message names the file, case or setting that is wrong and how to fix it."""


class MedunetError(ValueError):
    """A problem with the user's input (data, config, arguments) rather than a bug in medunet."""
