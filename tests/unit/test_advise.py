"""The advisor on a history small enough to compute every figure by hand.

Line 6.1/amd64, three kernels K1 < K2 < K3:

    symbol         K1     K2     K3       churn (changes/updates, last)
    module_layout  0x1    0x2    0x3      2/2, K3
    a              0xA    0xA    0xA      0/2
    b              0xB1   0xB2   0xB2     1/2, K2
    c              0xC    0xC    --       1/2, K3 (removed)
    d (GPL)        0xD    0xD    0xD      0/2

Modules built for K1: m1 uses a b, m2 uses a c, m3 uses a b d.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from elfwriter import ModuleSpec, build_module
from kmodgate.abi.model import Export, ExportType, KernelABI, ModuleInfo
from kmodgate.abi.stablelist import format_stablelist, parse_stablelist
from kmodgate.abi.symvers import format_symvers
from kmodgate.advise.advice import advise
from kmodgate.advise.churn import line_churn, subsystem
from kmodgate.advise.usage import propose_stablelist

RELEASES = ["6.1.0-1-amd64", "6.1.0-2-amd64", "6.1.0-3-amd64"]
CRCS: dict[str, list[int | None]] = {
    "module_layout": [0x1, 0x2, 0x3],
    "a": [0xA, 0xA, 0xA],
    "b": [0xB1, 0xB2, 0xB2],
    "c": [0xC, 0xC, None],
    "d": [0xD, 0xD, 0xD],
}
USES = {"m1": ["a", "b"], "m2": ["a", "c"], "m3": ["a", "b", "d"]}
GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def kernels() -> list[KernelABI]:
    out = []
    for i, release in enumerate(RELEASES):
        exports = {
            s: Export(s, crcs[i], "drivers/x/d" if s == "d" else "vmlinux",
                      ExportType.GPL if s == "d" else ExportType.PLAIN)
            for s, crcs in CRCS.items() if crcs[i] is not None
        }
        out.append(KernelABI(release, exports, origin=release,
                             vermagic=f"{release} SMP mod_unload modversions ",
                             machine="x86_64"))
    return out


def modules() -> list[ModuleInfo]:
    out = []
    for name, used in USES.items():
        versions = {s: CRCS[s][0] or 0 for s in ["module_layout", *used]}
        out.append(ModuleInfo(
            name=name, path=f"{name}.ko", machine="x86_64",
            modinfo=[("license", "GPL"), ("vermagic", f"{RELEASES[0]} SMP mod_unload "
                                                      "modversions ")],
            versions=versions, exports=[], undefined=list(used)))
    return out


def test_churn_counts_changes_and_removals_per_update() -> None:
    lc = line_churn("6.1/amd64", kernels())
    got = {s: (r.changes, r.updates, r.last_change) for s, r in lc.symbols.items()}
    assert got == {
        "module_layout": (2, 2, RELEASES[2]),
        "a": (0, 2, None),
        "b": (1, 2, RELEASES[1]),
        "c": (1, 2, RELEASES[2]),
        "d": (0, 2, None),
    }
    assert lc.changed_per_update == [2, 2]  # {module_layout, b}, {module_layout, c}
    assert lc.subsystem_changes(kernels()[-1]) == {"vmlinux": 4}
    assert subsystem("drivers/usb/core/usbcore") == "drivers/usb"


def test_ranking_puts_wide_use_first_then_low_churn() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7)
    assert [(u.rank, u.symbol, len(u.modules)) for u in a.usage] == [
        (1, "a", 3), (2, "b", 2), (3, "d", 1), (4, "c", 1)]
    by_symbol = {u.symbol: u for u in a.usage}
    assert by_symbol["c"].why == ("used by 1 of 3 modules; CRC changed in 1 of 2 updates of "
                                  "6.1/amd64 (last in 6.1.0-3-amd64)")
    assert by_symbol["a"].why == "used by 3 of 3 modules; stable across 2 updates of 6.1/amd64"
    # c is gone from K3 yet still counted, with its last known export.
    assert by_symbol["c"].provider == "vmlinux"
    assert by_symbol["d"].export_type == "EXPORT_SYMBOL_GPL"


def test_proposal_takes_the_fewest_top_symbols_reaching_the_target() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7)
    # 7 uses: a 3, b 2, d 1, c 1.  a alone covers 3/7 < 0.7; a + b cover 5/7.
    assert a.proposal == ["a", "b"]
    assert a.proposal_coverage == 5 / 7
    assert propose_stablelist(a.usage, 1.0) == (["a", "b", "c", "d"], 1.0)


def test_already_listed_symbols_count_and_are_not_proposed_again() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7, stablelist=frozenset({"a"}))
    assert a.proposal == ["b"]
    assert a.kept == {"a", "b"}
    coverage = {c.module: (c.used, c.covered, c.uncovered) for c in a.coverage}
    assert coverage == {"m1": (2, 1, ["b"]), "m2": (2, 1, ["c"]), "m3": (3, 1, ["b", "d"])}
    assert [c.module for c in a.coverage] == ["m3", "m1", "m2"]  # least covered first


def test_survival_and_what_if_curves() -> None:
    a = advise(kernels(), modules(), coverage_target=0.7)
    assert a.base == RELEASES[0]  # all three load there, none elsewhere
    assert [(p.release, p.loading, p.loading_if_kept) for p in a.survival] == [
        # K2: module_layout changed for all; b changed too, but b is kept.
        # K3: m2 also lost c, which the proposal does not keep.
        (RELEASES[0], 3, 3), (RELEASES[1], 0, 3), (RELEASES[2], 0, 2)]
    later = advise(kernels(), modules(), coverage_target=0.7, base=RELEASES[1])
    assert [p.release for p in later.survival] == RELEASES[1:]


def test_stablelist_output_through_the_command_matches_the_golden_file(tmp_path: Path) -> None:
    for kernel in kernels():
        (tmp_path / f"symvers-{kernel.release}").write_text(format_symvers(kernel.exports))
    for m in modules():
        spec = ModuleSpec(name=m.name, vermagic=m.vermagic, undefined=m.undefined,
                          versions=list((m.versions or {}).items()))
        (tmp_path / f"{m.name}.ko").write_bytes(build_module(spec))
    listed = tmp_path / "kabi_stablelist_x86_64"
    listed.write_text(format_stablelist("rhel9_x86_64_stablelist", ["a"]))
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("kmodgate")), "advise", "--format", "stablelist",
         "--coverage", "0.7", "--stablelist", str(listed),
         *[a for r in RELEASES for a in ("--kernel", str(tmp_path / f"symvers-{r}"))],
         *[a for name in USES for a in ("--module", str(tmp_path / f"{name}.ko"))]],
        capture_output=True, text=True, check=True)
    golden = GOLDEN / "advise_proposal_stablelist"
    assert proc.stdout == golden.read_text()
    assert parse_stablelist(proc.stdout, "out").symbols == {"a", "b"}
