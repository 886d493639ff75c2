"""One registry of network presets, read by the CLI, configs, benchmarks and tests alike.

A preset is a constructor plus default keywords, registered where the network is defined::

    register_preset("lunet_small_8f", LUNet, family="lunet", description="...", features=8, levels=5)

and built with ``create_network("lunet_small_8f", spatial_dims=2, out_channels=4)``. Class names
(``"LUNet"``, ``"OneNet"``, ...) work too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from medunet.errors import MedunetError


@dataclass(frozen=True)
class NetworkPreset:
    """A registered network: how to build it and what it is."""

    name: str
    factory: Callable[..., nn.Module]
    family: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    #: Name of the preset this one is compared with like for like (e.g. UNet-- vs its backbone).
    twin: str | None = None
    #: False where TorchScript cannot compile the network (e.g. activation checkpointing).
    scriptable: bool = True

    def build(self, **overrides: Any) -> nn.Module:
        return self.factory(**{**self.defaults, **overrides})


_PRESETS: dict[str, NetworkPreset] = {}
_CLASSES: dict[str, Callable[..., nn.Module]] = {}


def register_preset(
    name: str,
    factory: Callable[..., nn.Module],
    family: str,
    description: str,
    baseline: bool = False,
    twin: str | None = None,
    scriptable: bool = True,
    **defaults: Any,
) -> None:
    """Register ``name``; building it calls ``factory(**defaults, **overrides)``."""
    if name in _PRESETS:
        raise ValueError(f"network preset {name!r} is registered twice")
    _PRESETS[name] = NetworkPreset(name, factory, family, description, defaults, baseline, twin, scriptable)


def register_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Make a network class buildable by its name (usable as a decorator)."""
    _CLASSES[cls.__name__] = cls
    return cls


def get_preset(name: str) -> NetworkPreset:
    """The preset called ``name``, or a clear error listing what exists."""
    if name in _PRESETS:
        return _PRESETS[name]
    if name in _CLASSES:
        return NetworkPreset(name, _CLASSES[name], name.lower(), f"the {name} class with its defaults")
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


def create_network(name: str, **overrides: Any) -> nn.Module:
    """Build a registered preset or class by name; keywords override the preset's defaults.

    Example::

        net = create_network("lunet_small_8f", spatial_dims=3, in_channels=1, out_channels=3)
    """
    return get_preset(name).build(**overrides)


def list_networks(family: str | None = None, baselines: bool | None = None) -> list[str]:
    """Names of the registered presets, optionally of one family or only (non-)baselines."""
    return sorted(
        name
        for name, preset in _PRESETS.items()
        if (family is None or preset.family == family) and (baselines is None or preset.baseline == baselines)
    )
