"""Will this module load on that kernel?  The module loader's rules, as data.

Follows kernel/module/main.c and kernel/module/version.c of Linux 6.1-6.12:
``check_modinfo`` (vermagic), ``check_modstruct_version`` (module_layout),
``simplify_symbols`` -> ``resolve_symbol`` (find_symbol with the module's
GPL-compatibility, ``check_version``, ``verify_namespace_is_imported``).
Unlike the loader, which stops at the first problem, every reason is listed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from kmodgate.abi.kconfig import is_enabled
from kmodgate.abi.model import VMLINUX, Export, ExportType, KernelABI, ModuleInfo

# license_is_gpl_compatible() in include/linux/license.h.
GPL_COMPATIBLE_LICENSES = frozenset(
    {
        "GPL",
        "GPL v2",
        "GPL and additional rights",
        "Dual BSD/GPL",
        "Dual MIT/GPL",
        "Dual MPL/GPL",
    }
)

# The symbol check_modstruct_version() checks first: its CRC covers struct
# module itself, so a mismatch means the module cannot load on this kernel at all.
MODULE_LAYOUT = "module_layout"


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    SKIP = "skip"


class ReasonCode(StrEnum):
    MODULE_LAYOUT = "module_layout_mismatch"
    VERMAGIC = "vermagic_mismatch"
    NO_VERMAGIC = "no_vermagic"
    MACHINE = "machine_mismatch"
    MISSING_SYMBOL = "missing_symbol"
    CRC_MISMATCH = "crc_mismatch"
    NO_VERSIONS = "no_symbol_versions"
    DUPLICATE_EXPORT = "duplicate_export"
    NAMESPACE = "namespace_not_imported"
    GPL_ONLY = "gpl_only_symbol"


def _crc(value: int | None) -> str:
    return "?" if value is None else f"0x{value:08x}"


# One message template per reason, in the loader's own words where it has some.
# Rendering is deferred: a whole image checked against another ABI yields
# ~100,000 reasons, and most are only counted, never printed.
_MESSAGES: dict[ReasonCode, Callable[[Reason], str]] = {
    ReasonCode.MODULE_LAYOUT: lambda r: (
        f"disagrees about version of symbol {MODULE_LAYOUT} (module {_crc(r.required_crc)}, "
        f"kernel {_crc(r.provided_crc)}): the module was built for another kernel ABI and "
        "cannot load on this kernel at all"
    ),
    ReasonCode.CRC_MISMATCH: lambda r: (
        f"disagrees about version of symbol {r.symbol} (module {_crc(r.required_crc)}, "
        f"kernel {_crc(r.provided_crc)})"
    ),
    ReasonCode.MISSING_SYMBOL: lambda r: (
        f"Unknown symbol {r.symbol}: no kernel or module export provides it"
    ),
    ReasonCode.GPL_ONLY: lambda r: (
        f"Unknown symbol {r.symbol}: it is exported GPL-only and the module's license "
        f"{r.detail or 'unspecified'!r} is not GPL-compatible"
    ),
    ReasonCode.NAMESPACE: lambda r: (
        f"module uses symbol {r.symbol} from namespace {r.detail}, but does not import it"
    ),
    ReasonCode.NO_VERSIONS: lambda r: (
        f"module has no symbol version for {r.symbol} (no __versions section) and the kernel "
        "cannot force-load it (no CONFIG_MODULE_FORCE_LOAD)"
    ),
    ReasonCode.VERMAGIC: lambda r: f"version magic {r.detail}",
    ReasonCode.NO_VERMAGIC: lambda r: "no vermagic in .modinfo: the loader refuses it",
    ReasonCode.MACHINE: lambda r: f"module is built for {r.detail}",
    ReasonCode.DUPLICATE_EXPORT: lambda r: (
        f"exports duplicate symbol {r.symbol} (owned by kernel)"
    ),
}


@dataclass(slots=True)
class Reason:
    """Why the loader would refuse a module; ``message`` says it in words."""

    code: ReasonCode
    symbol: str | None = None
    required_crc: int | None = None
    provided_crc: int | None = None
    provider: str | None = None
    detail: str | None = None  # the code-specific words: license, namespace, vermagics

    @property
    def message(self) -> str:
        return _MESSAGES[self.code](self)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code.value, "message": self.message}
        if self.symbol is not None:
            out["symbol"] = self.symbol
        if self.required_crc is not None:
            out["required_crc"] = f"0x{self.required_crc:08x}"
        if self.provided_crc is not None:
            out["provided_crc"] = f"0x{self.provided_crc:08x}"
        if self.provider is not None:
            out["provider"] = self.provider
        return out


@dataclass(slots=True)
class Verdict:
    module: ModuleInfo
    kernel: KernelABI
    reasons: list[Reason] = field(default_factory=list)
    needs_modules: list[str] = field(default_factory=list)  # providers modprobe loads first

    @property
    def outcome(self) -> Outcome:
        return Outcome.FAIL if self.reasons else Outcome.PASS


def is_gpl_compatible(license_text: str | None) -> bool:
    return license_text in GPL_COMPATIBLE_LICENSES


def companion_exports(companions: Iterable[ModuleInfo]) -> dict[str, Export]:
    """Exports of modules checked together (e.g. a DKMS package's several .ko)."""
    out: dict[str, Export] = {}
    for module in companions:
        for e in module.exports:
            out[e.symbol] = Export(e.symbol, e.crc, module.name, e.export_type, e.namespace)
    return out


def check_module(
    module: ModuleInfo, kernel: KernelABI, extra_exports: dict[str, Export] | None = None
) -> Verdict:
    """The loader's verdict on *module* for *kernel*, with every reason it would refuse.

    *extra_exports* are symbols from modules checked together with this one;
    the kernel's own exports (vmlinux and its in-tree modules, which depmod
    and modprobe load first) are always available.
    """
    verdict = Verdict(module, kernel)
    reasons = verdict.reasons
    if module.machine and kernel.machine and module.machine != kernel.machine:
        reasons.append(
            Reason(ReasonCode.MACHINE, detail=f"{module.machine}, the kernel is {kernel.machine}")
        )
    versions = module.versions
    # load_module() checks struct module's CRC before anything else
    # (check_modstruct_version), then .modinfo (check_modinfo), then symbols.
    _check_module_layout(versions, kernel, reasons)
    _check_vermagic(module, kernel, kernel.modversions and versions is not None, reasons)
    _check_duplicate_exports(module, kernel, reasons)

    # A kmod RPM's Requires carry no license, so the GPL-only rule cannot apply to them.
    gplok = is_gpl_compatible(module.license) or module.origin_kind != "elf"
    imported = set(module.import_ns)
    namespaces_enforced = not is_enabled(
        kernel.config, "CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS"
    )
    needs: set[str] = set()
    weak = set(module.weak_undefined)
    for symbol in (*module.undefined, *module.weak_undefined):
        # The kernel's own exports win: the loader refuses a module that exports
        # a symbol the kernel already has, so a companion cannot shadow one.
        export = kernel.exports.get(symbol) or (extra_exports or {}).get(symbol)
        if export is None:
            if symbol not in weak:  # simplify_symbols(): an unresolved weak symbol is fine
                required = versions.get(symbol) if versions else None
                reasons.append(Reason(ReasonCode.MISSING_SYMBOL, symbol, required))
            continue
        # find_symbol() does not offer GPL-only exports to a non-GPL module, so
        # for the loader the symbol is simply not there.
        if export.export_type is ExportType.GPL and not gplok:
            if symbol not in weak:
                reasons.append(Reason(ReasonCode.GPL_ONLY, symbol, provider=export.provider,
                                      detail=module.license))
            continue
        _check_crc(symbol, export, versions, kernel, reasons)
        if export.namespace and export.namespace not in imported and namespaces_enforced:
            reasons.append(
                Reason(ReasonCode.NAMESPACE, symbol, provider=export.provider,
                       detail=export.namespace)
            )
        if export.provider_module and export.provider_module != module.name:
            needs.add(export.provider_module)
    verdict.needs_modules = sorted(needs)
    return verdict


def _check_module_layout(
    versions: dict[str, int] | None, kernel: KernelABI, reasons: list[Reason]
) -> None:
    """check_modstruct_version(): check_version() on module_layout, which every
    module built with CONFIG_MODVERSIONS records."""
    layout = kernel.exports.get(MODULE_LAYOUT)
    if not kernel.modversions or layout is None or layout.crc is None:
        return
    if versions is None:
        if not kernel.force_load:  # try_to_force_load() fails without FORCE_LOAD
            reasons.append(Reason(ReasonCode.NO_VERSIONS, MODULE_LAYOUT))
        return
    required = versions.get(MODULE_LAYOUT)
    if required is not None and required != layout.crc:
        reasons.append(
            Reason(ReasonCode.MODULE_LAYOUT, MODULE_LAYOUT, required, layout.crc, VMLINUX)
        )


def _check_duplicate_exports(module: ModuleInfo, kernel: KernelABI, reasons: list[Reason]) -> None:
    """verify_exported_symbols(): a module may not export what the kernel proper
    exports.  (An in-tree module's export only clashes if that module is loaded.)"""
    for e in module.exports:
        existing = kernel.exports.get(e.symbol)
        if existing is not None and existing.provider == VMLINUX:
            reasons.append(Reason(ReasonCode.DUPLICATE_EXPORT, e.symbol, provider=VMLINUX))


def _check_vermagic(
    module: ModuleInfo, kernel: KernelABI, has_crcs: bool, reasons: list[Reason]
) -> None:
    modmagic = module.vermagic
    if module.origin_kind != "elf":
        return  # an RPM's Requires carry no vermagic; only the CRCs can be checked
    if modmagic is None:
        if not kernel.force_load:  # check_modinfo() -> try_to_force_load("bad vermagic")
            reasons.append(Reason(ReasonCode.NO_VERMAGIC))
        return
    if kernel.vermagic is None:
        return
    if not _same_magic(modmagic, kernel.vermagic, has_crcs):
        reasons.append(
            Reason(ReasonCode.VERMAGIC, detail=f"{modmagic!r} should be {kernel.vermagic!r}")
        )


def _same_magic(amagic: str, bmagic: str, has_crcs: bool) -> bool:
    """same_magic() in kernel/module/main.c: with CRCs the release part is not compared."""
    if has_crcs:
        amagic = amagic[_first_space(amagic) :]
        bmagic = bmagic[_first_space(bmagic) :]
    return amagic == bmagic


def _first_space(text: str) -> int:
    pos = text.find(" ")
    return len(text) if pos < 0 else pos


def _check_crc(
    symbol: str,
    export: Export,
    versions: dict[str, int] | None,
    kernel: KernelABI,
    reasons: list[Reason],
) -> None:
    """check_version(): only a symbol the exporter gave a CRC for is checked."""
    if not kernel.modversions or export.crc is None or symbol == MODULE_LAYOUT:
        return
    if versions is None:
        # No __versions at all: only a forced load (CONFIG_MODULE_FORCE_LOAD) passes.
        # Where the kernel exports module_layout, that check already refused the
        # module as a whole; one reason says it better than one per symbol.
        if not kernel.force_load and MODULE_LAYOUT not in kernel.exports:
            reasons.append(Reason(ReasonCode.NO_VERSIONS, symbol))
        return
    required = versions.get(symbol)
    if required is None:
        return  # "no symbol version for X": the loader warns once and lets it go
    if required != export.crc:
        reasons.append(
            Reason(ReasonCode.CRC_MISMATCH, symbol, required, export.crc, export.provider)
        )
