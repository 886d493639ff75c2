"""One registry of network presets, read by the CLI, configs, benchmarks and tests alike.

A preset is a constructor plus default keywords, registered where the network is defined, one
``register_preset`` call per name with the name spelt out, so that ``git grep '"lunet_small_8f"'`` finds
its definition (in ``conv_unet.py``). A new network's file ends like::

    register_class(MyNet)
    register_preset(
        "mynet_small_8f", MyNet, "mynet", "MyNet, 5 levels, width 8",
        features=8, levels=5, test_overrides={"features": 2},
    )

Any preset is built with ``create_network("lunet_small_8f", spatial_dims=2, out_channels=4)``. Class names
(``"LUNet"``, ``"OneNet"``, ...) work too. ``list_networks("lunet_*")`` lists names by pattern. Adding a
network is that one file plus its import in ``medunet/networks/__init__.py``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import use_onednn_convs


@dataclass(frozen=True)
class NetworkPreset:
    """A registered network: how to build it and what it is."""

    name: str
    factory: Callable[..., nn.Module]
    family: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    #: False where TorchScript cannot compile the network (e.g. activation checkpointing).
    scriptable: bool = True
    #: Keywords that shrink the preset's widths so tests run every code path in seconds on CPU; depth,
    #: block counts, variants and skip strategies stay the preset's own.
    test_overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, **overrides: Any) -> nn.Module:
        return use_onednn_convs(self.factory(**{**self.defaults, **overrides}))


_PRESETS: dict[str, NetworkPreset] = {}
_CLASSES: dict[str, Callable[..., nn.Module]] = {}


def register_preset(
    name: str,
    factory: Callable[..., nn.Module],
    family: str,
    description: str,
    *,
    baseline: bool = False,
    scriptable: bool = True,
    test_overrides: dict[str, Any] | None = None,
    **defaults: Any,
) -> None:
    """Register ``name``; building it calls ``factory(**defaults, **overrides)``.

    Args:
        name: what users type, e.g. ``"lunet_small_8f"``; spelt out literally so ``git grep`` finds it.
        factory: the network class (or a function returning a module).
        family: groups presets for ``list_networks(family=...)`` and ``medunet networks --family``.
        description: one line for ``medunet networks``.
        baseline: a reference network (MONAI), not one of ours.
        scriptable: False where TorchScript cannot compile the network.
        test_overrides: keywords that make the preset test-sized (see :class:`NetworkPreset`).
        defaults: the constructor keywords of this preset.
    """
    if name in _PRESETS:
        raise ValueError(f"network preset {name!r} is registered twice")
    _PRESETS[name] = NetworkPreset(
        name=name, factory=factory, family=family, description=description, defaults=defaults,
        baseline=baseline, scriptable=scriptable, test_overrides=dict(test_overrides or {}),
    )


def register_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Make a network class buildable by its name (usable as a decorator)."""
    _CLASSES[cls.__name__] = cls
    return cls


def get_preset(name: str) -> NetworkPreset:
    """The preset called ``name``, or a clear error listing what exists."""
    if name in _PRESETS:
        return _PRESETS[name]
    if name in _CLASSES:
        return NetworkPreset(name=name, factory=_CLASSES[name], family=name.lower(),
                             description=f"the {name} class with its defaults")
    raise MedunetError(
        f"unknown network {name!r}. Known presets: {', '.join(sorted(_PRESETS))}; "
        f"classes: {', '.join(sorted(_CLASSES))}. Run `medunet networks` for descriptions."
    )


def registered_name_of_class(class_path: str) -> str | None:
    """The registry name of a registered class given as ``module.Class`` or ``Class``; None if not registered.

    This is the allow-list for files that name a network by class: nothing outside the registry is imported.
    """
    for name, cls in _CLASSES.items():
        if class_path in (name, f"medunet.networks.{name}", f"{cls.__module__}.{cls.__qualname__}"):
            return name
    return None


def create_network(name: str, *, seed: int | None = None, **overrides: Any) -> nn.Module:
    """Build a registered preset or class by name; keywords override the preset's defaults.

    Args:
        name: the preset (or registered class) name.
        seed: draw the initial weights from ``torch.manual_seed(seed)`` on a forked generator (the global one is left
            as it was), so one seed always gives the same weights; None draws them from the global generator.
        overrides: constructor keywords.

    Example::

        net = create_network("lunet_small_8f", spatial_dims=3, in_channels=1, out_channels=3, seed=0)
    """
    if seed is None:
        return get_preset(name).build(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_preset(name).build(**overrides)


def list_networks(
    pattern: str | Sequence[str] | None = None, *, family: str | None = None, baselines: bool | None = None
) -> list[str]:
    """Names of the registered presets, sorted; optionally only those matching a pattern, of one family,
    or only (non-)baselines.

    Args:
        pattern: an ``fnmatch`` pattern (``"lunet_*"``, ``"*_unshuffle*"``) or several (a name matching
            any is kept); ``None`` for all.
        family: only presets of this family (``"lunet"``, ``"onenet"``, ``"nafnet"``, ``"unet--"``,
            ``"baseline"``).
        baselines: ``True`` only the MONAI baselines, ``False`` only medunet's own networks.

    Example::

        list_networks("lunet_small_*")          # ['lunet_small_16f', 'lunet_small_16f_unshuffle', ...]
        list_networks(family="unet--", baselines=False)
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or ["*"])
    names = sorted(
        name
        for name, preset in _PRESETS.items()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns)
        and (family is None or preset.family == family)
        and (baselines is None or preset.baseline == baselines)
    )
    families = {preset.family for preset in _PRESETS.values()}
    if not names and isinstance(pattern, str) and pattern in families:
        raise MedunetError(
            f"list_networks({pattern!r}) matches no preset name: {pattern!r} is a family. "
            f"Use list_networks(family={pattern!r}) or a pattern such as {pattern + '_*'!r}."
        )
    return names
