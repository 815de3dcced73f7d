"""What a kernel's .config says about module loading.

Kernel knowledge as data: which options shape the vermagic string and in
which order (include/linux/vermagic.h, unchanged in this respect from 6.1 to
6.12), so the string can be derived when no module of the kernel is at hand.
"""

from __future__ import annotations

# (option, text) in VERMAGIC_STRING order; the first matching option of a group
# wins, as the #ifdef/#elif chain in vermagic.h does.
VERMAGIC_PARTS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("CONFIG_SMP", "SMP "),),
    (("CONFIG_PREEMPT_BUILD", "preempt "), ("CONFIG_PREEMPT_RT", "preempt_rt ")),
    (("CONFIG_MODULE_UNLOAD", "mod_unload "),),
    (("CONFIG_MODVERSIONS", "modversions "),),
)

# MODULE_ARCH_VERMAGIC (arch/*/include/asm/module.h) is empty on x86_64; other
# architectures append CPU-family words this table does not know, so for them
# the vermagic is taken from a module of the kernel instead (see kernels.py).
VERMAGIC_EXACT_ARCHES = frozenset({"x86_64"})

# ELF machine names of kmodgate's elf reader, by the kernel's SRCARCH/ARCH.
MACHINE_OF_ARCH = {
    "x86": "x86_64",
    "x86_64": "x86_64",
    "arm64": "aarch64",
    "powerpc": "ppc64",
    "s390": "s390",
    "riscv": "riscv",
}


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X=value lines; "is not set" lines are simply absent."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, sep, value = line.partition("=")
            if sep:
                config[key] = value.strip().strip('"') if value.startswith('"') else value
    return config


def is_enabled(config: dict[str, str], option: str) -> bool:
    return config.get(option) in ("y", "m")


def derive_vermagic(release: str, config: dict[str, str]) -> str:
    parts = [release, " "]
    for group in VERMAGIC_PARTS:
        for option, text in group:
            if is_enabled(config, option):
                parts.append(text)
                break
    return "".join(parts)
