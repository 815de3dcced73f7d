"""Kernel against kernel: diff_exports' change kinds, impact on modules, stablelists."""

from __future__ import annotations

from kmodgate.abi.compare import MODULE_LAYOUT, Outcome
from kmodgate.abi.diff import BREAKING, Change, diff_exports, diff_kernels
from kmodgate.abi.model import Export, ExportType, KernelABI, ModuleInfo
from kmodgate.abi.stablelist import parse_stablelist

P, G = ExportType.PLAIN, ExportType.GPL


def exports(*items: Export) -> dict[str, Export]:
    return {e.symbol: e for e in items}


OLD = exports(
    Export(MODULE_LAYOUT, 0x100, "vmlinux", P),
    Export("same", 0x1, "vmlinux", P),
    Export("removed_fn", 0x2, "vmlinux", P),
    Export("crc_fn", 0x3, "vmlinux", P),
    Export("type_fn", 0x4, "vmlinux", P),
    Export("ns_fn", 0x5, "drivers/usb/storage/usb-storage", G, ""),
    Export("moved_fn", 0x6, "drivers/a/old_home", P),
    Export("many_fn", 0x7, "drivers/a/x", P, ""),
)
NEW = exports(
    Export(MODULE_LAYOUT, 0x200, "vmlinux", P),
    Export("same", 0x1, "vmlinux", P),
    Export("crc_fn", 0x33, "vmlinux", P),
    Export("type_fn", 0x4, "vmlinux", G),
    Export("ns_fn", 0x5, "drivers/usb/storage/usb-storage", G, "USB_STORAGE"),
    Export("moved_fn", 0x6, "vmlinux", P),
    Export("many_fn", 0x8, "drivers/b/y", G, "NS"),
    Export("added_fn", 0x9, "vmlinux", P),
)


def kernel(release: str, table: dict[str, Export]) -> KernelABI:
    return KernelABI(release=release, exports=table, origin=release,
                     vermagic=f"{release} SMP preempt mod_unload modversions ")


def module(name: str, used: dict[str, int]) -> ModuleInfo:
    return ModuleInfo(
        name=name, path=f"{name}.ko", machine=None,
        modinfo=[("license", "GPL"), ("import_ns", "USB_STORAGE"),
                 ("vermagic", "6.1.0-1-amd64 SMP preempt mod_unload modversions ")],
        versions={MODULE_LAYOUT: 0x100, **used}, exports=[], undefined=list(used),
    )


def test_each_change_kind() -> None:
    changes = diff_exports(OLD, NEW)
    assert "same" not in changes
    kinds = {s: c.changes for s, c in changes.items()}
    assert kinds == {
        MODULE_LAYOUT: (Change.CRC,),
        "added_fn": (Change.ADDED,),
        "removed_fn": (Change.REMOVED,),
        "crc_fn": (Change.CRC,),
        "type_fn": (Change.EXPORT_TYPE,),
        "ns_fn": (Change.NAMESPACE,),
        "moved_fn": (Change.MOVED,),
        "many_fn": (Change.CRC, Change.EXPORT_TYPE, Change.NAMESPACE, Change.MOVED),
    }
    assert changes["added_fn"].old is None and changes["added_fn"].new == NEW["added_fn"]
    assert changes["removed_fn"].new is None and changes["removed_fn"].old == OLD["removed_fn"]
    assert list(changes) == sorted(changes)


def test_identical_tables_have_no_changes() -> None:
    assert diff_exports(OLD, dict(OLD)) == {}


def test_moved_alone_is_not_breaking() -> None:
    assert Change.MOVED not in BREAKING and Change.ADDED not in BREAKING
    assert {Change.REMOVED, Change.CRC, Change.EXPORT_TYPE, Change.NAMESPACE} == BREAKING


def test_symbol_change_json() -> None:
    change = diff_exports(OLD, NEW)["ns_fn"]
    assert change.to_json() == {
        "symbol": "ns_fn",
        "changes": ["namespace_changed"],
        "old": {"crc": "0x00000005", "provider": "drivers/usb/storage/usb-storage",
                "export_type": "EXPORT_SYMBOL_GPL", "namespace": ""},
        "new": {"crc": "0x00000005", "provider": "drivers/usb/storage/usb-storage",
                "export_type": "EXPORT_SYMBOL_GPL", "namespace": "USB_STORAGE"},
    }
    assert diff_exports(OLD, NEW)["added_fn"].to_json()["old"] is None


def test_diff_kernels_counts() -> None:
    d = diff_kernels(kernel("6.1.0-1-amd64", OLD), kernel("6.1.0-2-amd64", NEW))
    assert d.counts() == {
        "added": 1, "removed": 1, "crc_changed": 3, "export_type_changed": 2,
        "namespace_changed": 2, "moved": 2,
    }
    assert [c.symbol for c in d.by_change(Change.MOVED)] == ["many_fn", "moved_fn"]
    assert d.impact == [] and d.stablelisted == []


def test_impact_on_modules() -> None:
    old_k, new_k = kernel("6.1.0-1-amd64", OLD), kernel("6.1.0-2-amd64", NEW)
    layout_only = module("layout_only", {"same": 0x1})
    uses_changed = module("uses_changed", {"same": 0x1, "crc_fn": 0x3, "moved_fn": 0x6,
                                          "removed_fn": 0x2})
    d = diff_kernels(old_k, new_k, [layout_only, uses_changed])
    [(old1, new1, breaking1), (old2, new2, breaking2)] = d.impact
    assert old1.outcome is Outcome.PASS and new1.outcome is Outcome.FAIL  # module_layout
    assert breaking1 == [MODULE_LAYOUT]
    assert old2.outcome is Outcome.PASS and new2.outcome is Outcome.FAIL
    # moved_fn moved only: not breaking, so not listed.
    assert breaking2 == sorted([MODULE_LAYOUT, "crc_fn", "removed_fn"])


def test_impact_counts_undefined_symbols_without_versions() -> None:
    m = module("m", {})
    m.undefined = ["type_fn"]
    d = diff_kernels(kernel("a", OLD), kernel("b", NEW), [m])
    assert d.impact[0][2] == [MODULE_LAYOUT, "type_fn"]


def test_stablelisted_changes() -> None:
    listed = parse_stablelist(
        "[rhel9_x86_64_stablelist]\n\tsame\n\tcrc_fn\n\tmoved_fn\n\tadded_fn\n\tremoved_fn\n",
        "kabi_stablelist_x86_64",
    )
    d = diff_kernels(kernel("a", OLD), kernel("b", NEW), stablelist=listed)
    # Only breaking changes of listed symbols: not "same", "moved_fn" or "added_fn".
    assert [c.symbol for c in d.stablelisted] == ["crc_fn", "removed_fn"]
