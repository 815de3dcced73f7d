"""A kernel line and a module corpus small enough to compute every advisor
figure by hand (tests/unit/test_advise.py shows the table), as objects and as
the files the command reads.

Line 6.1/amd64, three kernels K1 < K2 < K3:

    symbol         K1     K2     K3
    module_layout  0x1    0x2    0x3
    a              0xA    0xA    0xA
    b              0xB1   0xB2   0xB2
    c              0xC    0xC    --
    d (GPL)        0xD    0xD    0xD

Modules built for K1: m1 uses a b, m2 uses a c, m3 uses a b d.
"""

from __future__ import annotations

from pathlib import Path

from elfwriter import ModuleSpec, build_module
from kmodgate.abi.model import Export, ExportType, KernelABI, ModuleInfo
from kmodgate.abi.symvers import format_symvers

RELEASES = ["6.1.0-1-amd64", "6.1.0-2-amd64", "6.1.0-3-amd64"]
CRCS: dict[str, list[int | None]] = {
    "module_layout": [0x1, 0x2, 0x3],
    "a": [0xA, 0xA, 0xA],
    "b": [0xB1, 0xB2, 0xB2],
    "c": [0xC, 0xC, None],
    "d": [0xD, 0xD, 0xD],
}
USES = {"m1": ["a", "b"], "m2": ["a", "c"], "m3": ["a", "b", "d"]}
GOLDEN = Path(__file__).resolve().parent / "golden"


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


def write_corpus(directory: Path) -> list[str]:
    """The corpus as Module.symvers files and .ko files; the command's
    --kernel and --module arguments naming them."""
    args = []
    for kernel in kernels():
        path = directory / f"symvers-{kernel.release}"
        path.write_text(format_symvers(kernel.exports))
        args += ["--kernel", str(path)]
    for m in modules():
        spec = ModuleSpec(name=m.name, vermagic=m.vermagic, undefined=m.undefined,
                          versions=list((m.versions or {}).items()))
        path = directory / f"{m.name}.ko"
        path.write_bytes(build_module(spec))
        args += ["--module", str(path)]
    return args
