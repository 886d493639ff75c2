"""What the sub-commands share and what must stay light: argparse ``type=`` checks and the tracking options.

Nothing here imports torch, MONAI or MLflow (the device check imports torch only for a non-CPU device), so
``medunet --help`` and argument errors answer at once. Each ``type=`` function refuses a bad value with one
line naming it, what is allowed and the fix; argparse prefixes the option (``argument --overlap: ...``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from medunet.checks import check_device, check_int, check_number, parse_shape
from medunet.errors import MedunetError


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _argument_type(check: Callable[[Any], Any], name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` from a check of :mod:`medunet.checks` (its MedunetError becomes argparse's)."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except MedunetError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _int(text: str, minimum: int) -> int:
    try:
        value: Any = int(text)
    except ValueError:
        value = text
    return check_int(value, "the value", minimum, fix=f"Fix: pass a whole number >= {minimum}.")


def _float(text: str, **bounds: Any) -> float:
    try:
        value: Any = float(text)
    except ValueError:
        value = text
    return check_number(value, "the value", fix="Fix: pass a number in that range.", **bounds)


#: ``type=`` for counts that must be at least 1 (``--repeats``, ``--sw-batch-size``, ``--epochs``).
positive_int = _argument_type(lambda text: _int(text, 1), "positive_int")
#: ``type=`` for counts that may be 0 (``--workers``, ``--fold``, ``--test-cases``).
non_negative_int = _argument_type(lambda text: _int(text, 0), "non_negative_int")
#: ``type=`` for a fraction in [0, 1) (``--overlap``).
fraction_0_1 = _argument_type(lambda text: _float(text, low=0.0, high=1.0), "fraction_0_1")
#: ``type=`` for a number >= 0 (``--tolerance-mm``).
non_negative_float = _argument_type(lambda text: _float(text, low=0.0), "non_negative_float")
#: ``type=`` for a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``); torch only for non-CPU.
device_name = _argument_type(lambda text: check_device(text, "device", option="--device"), "device_name")


#: ``type=`` for an input shape ``BxCx[D]xHxW`` (``--shape 1x1x128x128x128``).
input_shape = _argument_type(parse_shape, "input_shape")


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tracking-uri``, ``--experiment`` and ``--no-tracking`` to a sub-command's parser."""
    group = parser.add_argument_group("MLflow tracking")
    group.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking server (http://host:5000) or store (sqlite:///abs/path.db, a folder); "
                            "default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlruns.db")
    group.add_argument("--experiment", default="medunet", help="MLflow experiment name (default medunet)")
    group.add_argument("--no-tracking", action="store_true", help="do not track this run in MLflow")


def tracker_from_args(args: argparse.Namespace, run_dir: Any = None, run_name: str | None = None, **kwargs: Any) -> Any:
    """The :class:`~medunet.tracking.Tracker` the tracking options ask for (disabled with ``--no-tracking``)."""
    from medunet.tracking import Tracker

    return Tracker(tracking_uri=getattr(args, "tracking_uri", None), experiment=getattr(args, "experiment", "medunet"),
                   run_name=run_name, run_dir=run_dir, enabled=not getattr(args, "no_tracking", False), **kwargs)


def tracking_settings(args: argparse.Namespace) -> dict[str, object]:
    """Workflow keys for the ``--tracking-uri/--experiment/--no-tracking`` options (None: the workflow's)."""
    settings: dict[str, object] = {"experiment": args.experiment}
    if args.tracking_uri:
        settings["tracking_uri"] = args.tracking_uri
    if args.no_tracking:
        settings["tracking"] = False
    return settings
