"""The loader's rules (compare.check_module), one test per rule, on hand-built facts.

The kernel side follows kernel/module/main.c and kernel/module/version.c of
Linux 6.1-6.12: check_modstruct_version() runs before check_modinfo(), then
simplify_symbols() -> resolve_symbol() does find_symbol() (GPL-only exports are
invisible to a non-GPL module), check_version() and
verify_namespace_is_imported().
"""

from __future__ import annotations

import pytest

from kmodgate.abi.compare import (
    GPL_COMPATIBLE_LICENSES,
    MODULE_LAYOUT,
    Outcome,
    ReasonCode,
    check_module,
    companion_exports,
)
from kmodgate.abi.model import Export, ExportType, KernelABI, ModuleExport, ModuleInfo

RELEASE = "6.1.0-56-amd64"
FLAGS = "SMP preempt mod_unload modversions "
VERMAGIC = f"{RELEASE} {FLAGS}"
LAYOUT_CRC = 0x7C797B6A
PRINTK_CRC = 0x92997ED8


def kernel(
    *exports: Export,
    vermagic: str | None = VERMAGIC,
    modversions: bool = True,
    force_load: bool = False,
    machine: str | None = "x86_64",
    config: dict[str, str] | None = None,
) -> KernelABI:
    table = {
        MODULE_LAYOUT: Export(MODULE_LAYOUT, LAYOUT_CRC, "vmlinux", ExportType.PLAIN),
        "_printk": Export("_printk", PRINTK_CRC, "vmlinux", ExportType.PLAIN),
    }
    table.update({e.symbol: e for e in exports})
    return KernelABI(
        release=RELEASE, exports=table, origin="test", vermagic=vermagic, machine=machine,
        modversions=modversions, force_load=force_load, config=config or {},
    )


def module(
    *,
    name: str = "mymod",
    undefined: list[str] | None = None,
    versions: dict[str, int] | None = None,
    no_versions: bool = False,
    weak: list[str] | None = None,
    license: str | None = "GPL",
    vermagic: str | None = VERMAGIC,
    import_ns: list[str] | None = None,
    exports: list[ModuleExport] | None = None,
    machine: str | None = "x86_64",
    origin_kind: str = "elf",
) -> ModuleInfo:
    undefined = ["_printk"] if undefined is None else undefined
    if versions is None and not no_versions:
        versions = {MODULE_LAYOUT: LAYOUT_CRC, "_printk": PRINTK_CRC}
    modinfo: list[tuple[str, str]] = []
    if license is not None:
        modinfo.append(("license", license))
    modinfo += [("import_ns", ns) for ns in import_ns or []]
    modinfo.append(("name", name))
    if vermagic is not None:
        modinfo.append(("vermagic", vermagic))
    return ModuleInfo(
        name=name, path=f"/tmp/{name}.ko", machine=machine, modinfo=modinfo,
        versions=None if no_versions else versions, exports=exports or [],
        undefined=undefined, weak_undefined=weak or [], origin_kind=origin_kind,
    )


def codes(verdict: object) -> list[ReasonCode]:
    return [r.code for r in verdict.reasons]  # type: ignore[attr-defined]


def test_pass() -> None:
    verdict = check_module(module(), kernel())
    assert verdict.outcome is Outcome.PASS
    assert verdict.reasons == []
    assert verdict.needs_modules == []


def test_missing_symbol() -> None:
    m = module(undefined=["_printk", "gone_fn"],
               versions={MODULE_LAYOUT: LAYOUT_CRC, "_printk": PRINTK_CRC, "gone_fn": 0xABC})
    verdict = check_module(m, kernel())
    assert verdict.outcome is Outcome.FAIL
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.MISSING_SYMBOL
    assert reason.symbol == "gone_fn"
    assert reason.required_crc == 0xABC
    assert "Unknown symbol gone_fn" in reason.message


def test_weak_undefined_symbol_missing_is_fine() -> None:
    verdict = check_module(module(weak=["optional_hook"]), kernel())
    assert verdict.outcome is Outcome.PASS


def test_weak_undefined_symbol_present_with_other_crc_fails() -> None:
    hook = Export("optional_hook", 0x1111, "vmlinux", ExportType.PLAIN)
    m = module(weak=["optional_hook"],
               versions={MODULE_LAYOUT: LAYOUT_CRC, "_printk": PRINTK_CRC,
                         "optional_hook": 0x2222})
    verdict = check_module(m, kernel(hook))
    assert codes(verdict) == [ReasonCode.CRC_MISMATCH]


def test_weak_undefined_gpl_only_symbol_is_fine_for_non_gpl_module() -> None:
    # find_symbol() does not see a GPL-only export from a proprietary module:
    # "not found" and weak, so the loader lets it go.
    hook = Export("optional_hook", 0x1111, "vmlinux", ExportType.GPL)
    m = module(weak=["optional_hook"], license="Proprietary")
    assert check_module(m, kernel(hook)).outcome is Outcome.PASS


def test_crc_mismatch_names_both_crcs() -> None:
    m = module(versions={MODULE_LAYOUT: LAYOUT_CRC, "_printk": 0x11223344})
    verdict = check_module(m, kernel())
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.CRC_MISMATCH
    assert reason.symbol == "_printk"
    assert (reason.required_crc, reason.provided_crc) == (0x11223344, PRINTK_CRC)
    assert "0x11223344" in reason.message and f"0x{PRINTK_CRC:08x}" in reason.message
    assert reason.message.startswith("disagrees about version of symbol _printk")
    assert reason.provider == "vmlinux"


def test_symbol_without_version_entry_passes() -> None:
    # check_version(): "no symbol version for X" is a warning, not a refusal.
    m = module(versions={MODULE_LAYOUT: LAYOUT_CRC})
    assert check_module(m, kernel()).outcome is Outcome.PASS


def test_export_without_crc_is_not_checked() -> None:
    nocrc = Export("nocrc_fn", None, "vmlinux", ExportType.PLAIN)
    m = module(undefined=["nocrc_fn"], versions={MODULE_LAYOUT: LAYOUT_CRC, "nocrc_fn": 5})
    assert check_module(m, kernel(nocrc)).outcome is Outcome.PASS


def test_module_layout_mismatch_wording() -> None:
    m = module(versions={MODULE_LAYOUT: 0xDEAD, "_printk": PRINTK_CRC})
    verdict = check_module(m, kernel())
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.MODULE_LAYOUT
    assert reason.symbol == MODULE_LAYOUT
    assert (reason.required_crc, reason.provided_crc) == (0xDEAD, LAYOUT_CRC)
    assert "cannot load on this kernel at all" in reason.message
    assert "disagrees about version of symbol module_layout" in reason.message


def test_module_layout_mismatch_comes_before_symbol_reasons() -> None:
    m = module(undefined=["_printk", "gone_fn"],
               versions={MODULE_LAYOUT: 0xDEAD, "_printk": 0x1})
    verdict = check_module(m, kernel())
    assert codes(verdict) == [
        ReasonCode.MODULE_LAYOUT, ReasonCode.CRC_MISMATCH, ReasonCode.MISSING_SYMBOL
    ]


def test_module_layout_mismatch_reported_before_vermagic() -> None:
    m = module(versions={MODULE_LAYOUT: 0xDEAD, "_printk": PRINTK_CRC},
               vermagic="6.1.0-47-rt-amd64 SMP preempt_rt mod_unload modversions ")
    verdict = check_module(m, kernel())
    assert codes(verdict)[0] is ReasonCode.MODULE_LAYOUT
    assert set(codes(verdict)) == {ReasonCode.MODULE_LAYOUT, ReasonCode.VERMAGIC}


def test_vermagic_with_crcs_ignores_the_release() -> None:
    m = module(vermagic=f"6.1.0-47-amd64 {FLAGS}")
    assert check_module(m, kernel()).outcome is Outcome.PASS


def test_vermagic_with_crcs_compares_the_flags() -> None:
    m = module(vermagic="6.1.0-47-amd64 SMP preempt_rt mod_unload modversions ")
    verdict = check_module(m, kernel())
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.VERMAGIC
    assert "preempt_rt" in reason.message and repr(VERMAGIC) in reason.message


def test_vermagic_without_versions_compares_the_whole_string() -> None:
    k = kernel(modversions=False)
    assert check_module(module(no_versions=True), k).outcome is Outcome.PASS
    other = module(no_versions=True, vermagic=f"6.1.0-47-amd64 {FLAGS}")
    assert codes(check_module(other, k)) == [ReasonCode.VERMAGIC]


def test_vermagic_of_module_without_versions_section_compares_whole_string() -> None:
    # has_crcs is the module's __versions, not only the kernel's CONFIG_MODVERSIONS.
    m = module(no_versions=True, undefined=[], vermagic=f"6.1.0-47-amd64 {FLAGS}")
    assert ReasonCode.VERMAGIC in codes(check_module(m, kernel(force_load=True)))


def test_kernel_without_modversions_compares_the_whole_string() -> None:
    m = module(vermagic=f"6.1.0-47-amd64 {FLAGS}")
    assert codes(check_module(m, kernel(modversions=False))) == [ReasonCode.VERMAGIC]


def test_kernel_vermagic_unknown_skips_the_check() -> None:
    m = module(vermagic="something else entirely")
    assert check_module(m, kernel(vermagic=None)).outcome is Outcome.PASS


def test_no_vermagic() -> None:
    verdict = check_module(module(vermagic=None), kernel())
    assert codes(verdict) == [ReasonCode.NO_VERMAGIC]


def test_no_vermagic_with_force_load_passes() -> None:
    verdict = check_module(module(vermagic=None), kernel(force_load=True))
    assert verdict.outcome is Outcome.PASS


def test_namespace_used_but_not_imported() -> None:
    sym = Export("usb_stor_probe", 0x55, "drivers/usb/storage/usb-storage", ExportType.GPL,
                 "USB_STORAGE")
    m = module(undefined=["usb_stor_probe"], versions={MODULE_LAYOUT: LAYOUT_CRC,
                                                        "usb_stor_probe": 0x55})
    verdict = check_module(m, kernel(sym))
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.NAMESPACE
    assert reason.symbol == "usb_stor_probe"
    assert "USB_STORAGE" in reason.message


def test_namespace_imported() -> None:
    sym = Export("usb_stor_probe", 0x55, "drivers/usb/storage/usb-storage", ExportType.GPL,
                 "USB_STORAGE")
    m = module(undefined=["usb_stor_probe"], import_ns=["OTHER", "USB_STORAGE"],
               versions={MODULE_LAYOUT: LAYOUT_CRC, "usb_stor_probe": 0x55})
    verdict = check_module(m, kernel(sym))
    assert verdict.outcome is Outcome.PASS
    assert verdict.needs_modules == ["usb_storage"]


def test_namespace_not_imported_allowed_by_config() -> None:
    sym = Export("ns_fn", 0x55, "vmlinux", ExportType.PLAIN, "SOME_NS")
    m = module(undefined=["ns_fn"], versions={MODULE_LAYOUT: LAYOUT_CRC, "ns_fn": 0x55})
    k = kernel(sym, config={"CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS": "y"})
    assert check_module(m, k).outcome is Outcome.PASS


GPL_FN = Export("gpl_fn", 0x77, "vmlinux", ExportType.GPL)
GPL_USER = {"undefined": ["gpl_fn"], "versions": {MODULE_LAYOUT: LAYOUT_CRC, "gpl_fn": 0x77}}


@pytest.mark.parametrize("license_text", ["Proprietary", "MIT", "BSD", "GPLv2", "gpl"])
def test_gpl_only_export_refused_to_non_gpl_license(license_text: str) -> None:
    verdict = check_module(module(license=license_text, **GPL_USER), kernel(GPL_FN))
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.GPL_ONLY
    assert reason.symbol == "gpl_fn"
    assert repr(license_text) in reason.message


@pytest.mark.parametrize(
    "license_text",
    ["GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL",
     "Dual MPL/GPL"],
)
def test_gpl_only_export_allowed_to_gpl_compatible_license(license_text: str) -> None:
    assert license_text in GPL_COMPATIBLE_LICENSES
    verdict = check_module(module(license=license_text, **GPL_USER), kernel(GPL_FN))
    assert verdict.outcome is Outcome.PASS


def test_missing_license_counts_as_non_gpl() -> None:
    verdict = check_module(module(license=None, **GPL_USER), kernel(GPL_FN))
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.GPL_ONLY
    assert "'unspecified'" in reason.message


def test_plain_export_is_fine_for_non_gpl_license() -> None:
    assert check_module(module(license="Proprietary"), kernel()).outcome is Outcome.PASS


def test_no_versions_without_force_load_fails() -> None:
    verdict = check_module(module(no_versions=True), kernel(force_load=False))
    # check_modstruct_version() refuses it before any symbol is looked at.
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.NO_VERSIONS
    assert reason.symbol == MODULE_LAYOUT
    assert "CONFIG_MODULE_FORCE_LOAD" in reason.message


def test_no_versions_with_force_load_passes() -> None:
    verdict = check_module(module(no_versions=True), kernel(force_load=True))
    assert verdict.outcome is Outcome.PASS


def test_no_versions_on_kernel_without_modversions_passes() -> None:
    verdict = check_module(module(no_versions=True), kernel(modversions=False))
    assert verdict.outcome is Outcome.PASS


def test_no_versions_fails_on_module_layout_even_without_symbols() -> None:
    verdict = check_module(module(no_versions=True, undefined=[]), kernel(force_load=False))
    assert codes(verdict) == [ReasonCode.NO_VERSIONS]


def test_companion_exports_satisfy_symbols() -> None:
    provider = module(name="helper", exports=[
        ModuleExport("helper_fn", ExportType.GPL, "", 0x99),
    ])
    user = module(name="user", undefined=["_printk", "helper_fn"],
                  versions={MODULE_LAYOUT: LAYOUT_CRC, "_printk": PRINTK_CRC, "helper_fn": 0x99})
    extra = companion_exports([provider, user])
    assert extra["helper_fn"] == Export("helper_fn", 0x99, "helper", ExportType.GPL, "")
    assert check_module(user, kernel()).outcome is Outcome.FAIL
    verdict = check_module(user, kernel(), extra)
    assert verdict.outcome is Outcome.PASS
    assert verdict.needs_modules == ["helper"]


def test_companion_crc_mismatch_is_reported() -> None:
    provider = module(name="helper", exports=[ModuleExport("helper_fn", ExportType.PLAIN,
                                                           "", 0x98)])
    user = module(name="user", undefined=["helper_fn"],
                  versions={MODULE_LAYOUT: LAYOUT_CRC, "helper_fn": 0x99})
    verdict = check_module(user, kernel(), companion_exports([provider]))
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.CRC_MISMATCH
    assert reason.provider == "helper"


def test_kernel_export_wins_over_companion() -> None:
    provider = module(name="helper", exports=[ModuleExport("_printk", ExportType.PLAIN,
                                                           "", 0xBAD)])
    verdict = check_module(module(), kernel(), companion_exports([provider]))
    assert verdict.outcome is Outcome.PASS
    assert verdict.needs_modules == []


def test_module_exporting_a_vmlinux_symbol_fails() -> None:
    m = module(exports=[ModuleExport("_printk", ExportType.PLAIN, "", PRINTK_CRC)])
    assert check_module(m, kernel()).outcome is Outcome.FAIL


def test_needs_modules_lists_in_tree_providers() -> None:
    exports = [
        Export("usb_register_driver", 0x10, "drivers/usb/core/usbcore", ExportType.GPL),
        Export("drm_dev_alloc", 0x20, "drivers/gpu/drm/drm", ExportType.GPL),
        Export("v4l2_fn", 0x30, "drivers/media/v4l2-core/videodev", ExportType.PLAIN),
        Export("usb_deregister", 0x40, "drivers/usb/core/usbcore", ExportType.GPL),
    ]
    used = ["_printk", "usb_register_driver", "drm_dev_alloc", "v4l2_fn", "usb_deregister"]
    m = module(undefined=used, versions={MODULE_LAYOUT: LAYOUT_CRC, "_printk": PRINTK_CRC,
                                         **{e.symbol: e.crc or 0 for e in exports}})
    verdict = check_module(m, kernel(*exports))
    assert verdict.outcome is Outcome.PASS
    assert verdict.needs_modules == ["drm", "usbcore", "videodev"]


def test_machine_mismatch() -> None:
    verdict = check_module(module(machine="aarch64"), kernel())
    [reason] = verdict.reasons
    assert reason.code is ReasonCode.MACHINE
    assert "aarch64" in reason.message and "x86_64" in reason.message


def test_machine_unknown_on_either_side_is_not_compared() -> None:
    assert check_module(module(machine="aarch64"), kernel(machine=None)).outcome is Outcome.PASS
    assert check_module(module(machine=None), kernel()).outcome is Outcome.PASS


def test_rpm_requires_skip_vermagic() -> None:
    m = module(vermagic=None, origin_kind="rpm-requires")
    assert check_module(m, kernel()).outcome is Outcome.PASS
    wrong = module(vermagic="nonsense", origin_kind="rpm-requires",
                   versions={MODULE_LAYOUT: LAYOUT_CRC, "_printk": 0x1})
    assert codes(check_module(wrong, kernel())) == [ReasonCode.CRC_MISMATCH]


def test_every_reason_is_listed() -> None:
    m = module(
        license="Proprietary", machine="aarch64", vermagic="6.1.0-47-rt-amd64 SMP preempt_rt ",
        undefined=["_printk", "gone_fn", "gpl_fn"],
        versions={MODULE_LAYOUT: 0x1, "_printk": 0x2},
    )
    verdict = check_module(m, kernel(GPL_FN))
    assert set(codes(verdict)) == {
        ReasonCode.MACHINE, ReasonCode.VERMAGIC, ReasonCode.MODULE_LAYOUT,
        ReasonCode.CRC_MISMATCH, ReasonCode.MISSING_SYMBOL, ReasonCode.GPL_ONLY,
    }
    for reason in verdict.reasons:
        data = reason.to_json()
        assert data["code"] == reason.code.value
        assert data["message"] == reason.message


def test_reason_json_formats_crcs() -> None:
    m = module(versions={MODULE_LAYOUT: LAYOUT_CRC, "_printk": 0xAB})
    [reason] = check_module(m, kernel()).reasons
    assert reason.to_json() == {
        "code": "crc_mismatch",
        "message": reason.message,
        "symbol": "_printk",
        "required_crc": "0x000000ab",
        "provided_crc": f"0x{PRINTK_CRC:08x}",
        "provider": "vmlinux",
    }
