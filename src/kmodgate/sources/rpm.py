"""RPM kernels and kmods (placeholder until the RPM reader lands)."""

from __future__ import annotations

from pathlib import Path

from kmodgate.abi.model import KernelABI, ModuleInfo
from kmodgate.errors import UserError


def kernel_from_rpm(path: Path) -> KernelABI:
    raise UserError("RPM kernels are not readable yet", where=path)


def modules_from_rpm(path: Path) -> list[ModuleInfo]:
    raise UserError("RPM modules are not readable yet", where=path)
