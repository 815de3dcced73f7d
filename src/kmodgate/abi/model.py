"""The ABI facts kmodgate reasons about: exports of a kernel, needs of a module."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ExportType(StrEnum):
    """How a symbol is exported; the names are Module.symvers' own words."""

    PLAIN = "EXPORT_SYMBOL"
    GPL = "EXPORT_SYMBOL_GPL"
    UNKNOWN = "unknown"  # e.g. RPM ``Provides: kernel(sym)`` does not say


VMLINUX = "vmlinux"


@dataclass(frozen=True, slots=True)
class Export:
    """One exported symbol of a kernel build (a Module.symvers line)."""

    symbol: str
    crc: int | None
    provider: str  # "vmlinux" or the providing module's path without .ko
    export_type: ExportType
    namespace: str = ""

    @property
    def provider_module(self) -> str | None:
        """The name the module loader knows the provider by, or None for vmlinux."""
        if self.provider == VMLINUX:
            return None
        return module_name_from_path(self.provider)


@dataclass(slots=True)
class KernelABI:
    """What a kernel build offers to modules."""

    release: str
    exports: dict[str, Export]
    origin: str  # where it was read from, for messages
    vermagic: str | None = None
    machine: str | None = None  # ELF machine name, e.g. "x86_64"
    modversions: bool = True
    force_load: bool = False  # CONFIG_MODULE_FORCE_LOAD
    cc_version_text: str | None = None
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleExport:
    """A symbol the module itself exports (``__ksymtab*``)."""

    symbol: str
    export_type: ExportType
    namespace: str = ""
    crc: int | None = None


@dataclass
class ModuleInfo:
    """Everything the abi check needs to know about one module binary.

    No __slots__: plain instances unpickle several times faster, and the
    module index reloads thousands of them per run.
    """

    name: str
    path: str
    machine: str | None
    modinfo: list[tuple[str, str]]
    # __versions in file order: symbol -> the CRC the module was built against.
    # None when the section is absent.  A dict, not objects: a kernel image
    # holds ~190,000 entries and the cache reloads them all.
    versions: dict[str, int] | None
    exports: list[ModuleExport]
    undefined: list[str]  # symbols the loader must resolve
    weak_undefined: list[str] = field(default_factory=list)
    sha256: str | None = None
    # "elf" for a real .ko; "rpm-requires" when only a kmod RPM's
    # Requires: kernel(sym) = CRC are known (no .modinfo, so no vermagic to check).
    origin_kind: str = "elf"

    def modinfo_values(self, key: str) -> list[str]:
        return [v for k, v in self.modinfo if k == key]

    def modinfo_value(self, key: str) -> str | None:
        values = self.modinfo_values(key)
        return values[0] if values else None

    @property
    def vermagic(self) -> str | None:
        return self.modinfo_value("vermagic")

    @property
    def license(self) -> str | None:
        return self.modinfo_value("license")

    @property
    def srcversion(self) -> str | None:
        return self.modinfo_value("srcversion")

    @property
    def depends(self) -> list[str]:
        value = self.modinfo_value("depends")
        return [d for d in value.split(",") if d] if value else []

    @property
    def import_ns(self) -> list[str]:
        return self.modinfo_values("import_ns")


def module_name_from_path(path: str) -> str:
    """The loader's name for a module file: basename without suffixes, '-' as '_'."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")
