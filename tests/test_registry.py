"""The network registry: one greppable definition per preset, pattern listing, test sizes, registration."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from torch import nn

import medunet.networks as networks
from medunet.errors import MedunetError
from medunet.networks import create_network, get_preset, list_networks, registry

NETWORKS_DIR = Path(networks.__file__).parent
SOURCES = {path.name: path.read_text() for path in sorted(NETWORKS_DIR.glob("*.py"))}


@pytest.mark.parametrize("name", list_networks())
def test_every_preset_is_defined_once_by_its_literal_name(name: str) -> None:
    definition = re.compile(r'register_preset\(\s*"' + re.escape(name) + '"')
    found = {file: len(definition.findall(text)) for file, text in SOURCES.items() if definition.search(text)}
    assert sum(found.values()) == 1, f'`git grep \'"{name}"\'` should find one register_preset call, found {found}'


def test_no_preset_name_is_built_by_an_f_string() -> None:
    built = [file for file, text in SOURCES.items() if re.search(r'register_preset\(\s*f["\']', text)]
    assert not built, f"presets named by f-strings in {built}: spell each name out so git grep finds it"


def test_pattern_lists_matching_names_only() -> None:
    lean = list_networks("lunet_*")
    assert "lunet_small_8f" in lean and "lunet_large_24f" in lean
    assert all(name.startswith("lunet_") for name in lean)
    assert "unet_small_8f" not in lean and "unetmm_lunet_small_8f_coarsest" not in lean


def test_several_patterns_keep_a_name_matching_any() -> None:
    names = list_networks(["onenet_e4_*", "nafnet_w8_*"])
    assert names == sorted(["onenet_e4_8f", "onenet_e4_16f", "onenet_e4_64f", "nafnet_w8_light"])


def test_pattern_combines_with_family_and_baselines() -> None:
    assert list_networks("*unshuffle*", family="lunet") == sorted(
        ["lunet_small_8f_unshuffle", "unet_small_8f_unshuffle", "lunet_small_16f_unshuffle", "unet_small_16f_unshuffle",
         "lunet_small_16f_unshuffle_wide", "lunet_small_16f_unshuffle_wide_subpixel",
         "lunet_16f_4level_unshuffle_subpixel", "lunet_16f_4level_unshuffle_subpixel_in",
         "lunet_16f_4level_unshuffle_subpixel_in_res", "lunet_16f_4level_unshuffle_subpixel_deep_in_res",
         "lunet_16f_4level_unshuffle_subpixel_in_image", "lunet_16f_4level_unshuffle_subpixel_in_refine",
         "lunet_16f_3level_unshuffle_subpixel_in"]
    )
    assert list_networks("monai_*") == list_networks(baselines=True)
    assert not set(list_networks(baselines=False)) & set(list_networks(family="baseline"))
    assert list_networks() == list_networks("*")


def test_family_given_as_pattern_says_to_use_the_keyword() -> None:
    with pytest.raises(MedunetError, match=r"family='lunet'"):
        list_networks("lunet")


def test_pattern_matching_nothing_is_empty() -> None:
    assert list_networks("no_such_net_*") == []


@pytest.mark.parametrize("name", list_networks())
def test_test_overrides_are_keywords_the_factory_takes(name: str) -> None:
    preset = get_preset(name)
    parameters = inspect.signature(preset.factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [key for key in preset.test_overrides if key not in parameters and not takes_any]
    assert not unknown, f"{name}: test_overrides {unknown} are not arguments of {preset.factory.__qualname__}"


def test_a_new_network_is_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))

    def tiny_conv(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, width: int = 4) -> nn.Module:
        return nn.Conv3d(in_channels, out_channels, 1) if width else nn.Identity()

    registry.register_preset("tiny_conv_4w", tiny_conv, "tiny", "a 1x1 conv", width=4, test_overrides={"width": 1})
    assert list_networks("tiny_*") == ["tiny_conv_4w"] == list_networks(family="tiny")
    assert isinstance(create_network("tiny_conv_4w", out_channels=3), nn.Conv3d)
    assert get_preset("tiny_conv_4w").test_overrides == {"width": 1}
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_preset("tiny_conv_4w", tiny_conv, "tiny", "again")
