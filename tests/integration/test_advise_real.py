"""The advisor on the real Debian 6.1 line: every ABI the archive still has.

The corpus is the binaries of the four tracked DKMS packages, built by the
build check for the line's oldest kernel, and every in-tree module of that
kernel's image (binary kmods built for it).  The survival figures are
recomputed here from the raw CRC data, independently of the loader-rules
code they check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodgate.abi.compare import MODULE_LAYOUT, Outcome
from kmodgate.abi.model import KernelABI, ModuleInfo
from kmodgate.advise.advice import advise
from kmodgate.build.matrix import run_build_matrix
from kmodgate.sources.kernels import expand_kernel_refs, load_kernel
from kmodgate.sources.modules import load_module_ref, read_module_file

pytestmark = pytest.mark.integration

DKMS_PACKAGES = ("openrazer-driver-dkms", "v4l2loopback-dkms", "dm-writeboost-dkms",
                 "acpi-call-dkms")


def loads_independently(m: ModuleInfo, k: KernelABI, kept: frozenset[str] | None = None) -> bool:
    """Every symbol the module records has the CRC the kernel exports and every symbol it
    needs is exported, except those a kept stablelist (with module_layout) would have
    frozen; vermagic flags are equal along a line, so they need no check."""
    stable = frozenset() if kept is None else kept | {MODULE_LAYOUT}
    for symbol, crc in (m.versions or {}).items():
        export = k.exports.get(symbol)
        if (export is None or export.crc != crc) and symbol not in stable:
            return False
    return all(s in k.exports or s in stable for s in m.undefined)


def test_survival_along_the_real_61_line_matches_an_independent_count() -> None:
    refs = expand_kernel_refs(["debian-line:6.1/amd64"])
    if len(refs) < 3:
        pytest.skip(f"the archive offers only {len(refs)} 6.1 amd64 kernels today")
    kernels = [load_kernel(r) for r in refs]
    base = kernels[0]
    builds = run_build_matrix([refs[0]], [f"debian:{p}" for p in DKMS_PACKAGES])
    dkms = [read_module_file(Path(a)) for b in builds if b.outcome is Outcome.PASS
            for a in b.artifacts]
    assert {b.module for b in builds if b.outcome is Outcome.PASS} == {
        "openrazer-driver", "v4l2loopback", "dm-writeboost", "acpi-call"}
    corpus = dkms + load_module_ref(f"debian-image:{base.release}")
    a = advise(kernels, corpus, base=base.release, coverage_target=0.9)
    dkms_names = {m.name for m in dkms}
    dkms_survival = [sum(loads_independently(m, k) for m in dkms) for k in kernels]
    print(f"\n{len(dkms)} DKMS modules built for {base.release} still loading along the "
          f"line: {dkms_survival}")
    # The DKMS modules' symbols are in the usage table with the modules named.
    users = {name for u in a.usage for name in u.modules}
    assert dkms_names <= users

    print(f"{len(corpus)} modules built for {base.release}:")
    for p in a.survival:
        print(f"  {p.release}: {p.loading} load ({100 * p.share:.1f}%), "
              f"{p.loading_if_kept} had the proposal been kept ({100 * p.share_if_kept:.1f}%)")
    print(f"  proposal: {len(a.proposal)} symbols cover {100 * a.proposal_coverage:.1f}% of uses")

    assert [p.release for p in a.survival] == [k.release for k in kernels]
    for point, kernel in zip(a.survival, kernels, strict=True):
        assert point.total == len(corpus)
        assert point.loading == sum(loads_independently(m, kernel) for m in corpus)
        assert point.loading_if_kept == sum(loads_independently(m, kernel, a.kept)
                                            for m in corpus)
    assert a.survival[0].loading == len(corpus)
    assert a.proposal_coverage >= 0.9
    # Churn: recount the CRC changes of the first update from the raw exports.
    first, second = kernels[0], kernels[1]
    changed = sum(1 for s, e in first.exports.items()
                  if s not in second.exports or second.exports[s].crc != e.crc)
    assert a.churn["6.1/amd64"].changed_per_update[0] == changed
