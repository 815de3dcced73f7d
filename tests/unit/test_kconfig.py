"""What .config says about module loading: parse_config and the derived vermagic."""

from __future__ import annotations

import itertools

import pytest

from kmodgate.abi.kconfig import derive_vermagic, is_enabled, parse_config

CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
# Linux/x86 6.1.158 Kernel Configuration
#
CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
CONFIG_CC_IS_GCC=y
CONFIG_GCC_VERSION=120200
CONFIG_SMP=y
# CONFIG_PREEMPT_NONE is not set
CONFIG_PREEMPT_BUILD=y
CONFIG_MODULES=y
CONFIG_MODULE_UNLOAD=y
# CONFIG_MODULE_FORCE_LOAD is not set
CONFIG_MODVERSIONS=y
CONFIG_MODULE_SIG_HASH="sha256"
CONFIG_SOME_TRISTATE=m
CONFIG_NR_CPUS=8192
CONFIG_EMPTY_STRING=""
"""


def test_parse_config() -> None:
    config = parse_config(CONFIG)
    assert config["CONFIG_CC_VERSION_TEXT"] == "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
    assert config["CONFIG_SMP"] == "y"
    assert config["CONFIG_NR_CPUS"] == "8192"
    assert config["CONFIG_MODULE_SIG_HASH"] == "sha256"
    assert config["CONFIG_EMPTY_STRING"] == ""
    assert "CONFIG_MODULE_FORCE_LOAD" not in config
    assert "CONFIG_PREEMPT_NONE" not in config
    assert not any(k.startswith("#") for k in config)


def test_is_enabled() -> None:
    config = parse_config(CONFIG)
    assert is_enabled(config, "CONFIG_SMP")
    assert is_enabled(config, "CONFIG_SOME_TRISTATE")
    assert not is_enabled(config, "CONFIG_MODULE_FORCE_LOAD")
    assert not is_enabled(config, "CONFIG_NR_CPUS")


def test_debian_amd64_vermagic() -> None:
    assert (derive_vermagic("6.1.0-56-amd64", parse_config(CONFIG))
            == "6.1.0-56-amd64 SMP preempt mod_unload modversions ")


def test_debian_rt_vermagic() -> None:
    config = parse_config(CONFIG.replace("CONFIG_PREEMPT_BUILD=y", "CONFIG_PREEMPT_RT=y"))
    assert (derive_vermagic("6.1.0-56-rt-amd64", config)
            == "6.1.0-56-rt-amd64 SMP preempt_rt mod_unload modversions ")


OPTIONS = ["CONFIG_SMP", "CONFIG_PREEMPT_BUILD", "CONFIG_PREEMPT_RT", "CONFIG_MODULE_UNLOAD",
           "CONFIG_MODVERSIONS"]


def expected_vermagic(release: str, enabled: set[str]) -> str:
    """include/linux/vermagic.h, written out by hand."""
    out = release + " "
    if "CONFIG_SMP" in enabled:
        out += "SMP "
    if "CONFIG_PREEMPT_BUILD" in enabled:
        out += "preempt "
    elif "CONFIG_PREEMPT_RT" in enabled:
        out += "preempt_rt "
    if "CONFIG_MODULE_UNLOAD" in enabled:
        out += "mod_unload "
    if "CONFIG_MODVERSIONS" in enabled:
        out += "modversions "
    return out


@pytest.mark.parametrize(
    "enabled",
    [set(c) for n in range(len(OPTIONS) + 1) for c in itertools.combinations(OPTIONS, n)],
    ids=lambda s: "+".join(sorted(o.removeprefix("CONFIG_") for o in s)) or "none",
)
def test_derive_vermagic_combinations(enabled: set[str]) -> None:
    lines = [f"{o}=y" if o in enabled else f"# {o} is not set" for o in OPTIONS]
    config = parse_config("\n".join(lines) + "\n")
    assert derive_vermagic("6.12.117+deb12-amd64", config) == expected_vermagic(
        "6.12.117+deb12-amd64", enabled
    )


def test_option_set_to_n_is_not_enabled() -> None:
    config = parse_config("CONFIG_SMP=n\nCONFIG_MODVERSIONS=y\n")
    assert derive_vermagic("r", config) == "r modversions "
