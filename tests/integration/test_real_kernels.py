"""The kABI engine on real Debian kernels, held to the kernel's own tools.

Every module of a real linux-image package (no sampling) is read by kmodgate
and by kmod's ``modprobe --dump-modversions`` / ``modinfo``; the outputs must
be identical.  The verdicts are checked against an independent computation
from the CRC data.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import archive_releases, require_tool
from kmodgate.abi.compare import MODULE_LAYOUT, Outcome, ReasonCode, check_module
from kmodgate.abi.model import KernelABI, ModuleInfo
from kmodgate.sources import debian
from kmodgate.sources.kernels import load_kernel
from kmodgate.sources.modules import load_module_ref

pytestmark = pytest.mark.integration

# Fields modinfo derives from the appended signature, not from .modinfo, and the
# parameter fields it merges into one formatted "parm:" line of its own.
SIGNATURE_FIELDS = frozenset({"sig_id", "signer", "sig_key", "sig_hashalgo", "signature"})
REFORMATTED_FIELDS = frozenset({"parm", "parmtype"})


@pytest.fixture(scope="module")
def series_61() -> list[str]:
    return archive_releases("6.1.")


@pytest.fixture(scope="module")
def newest_61(series_61: list[str]) -> str:
    return series_61[-1]


@pytest.fixture(scope="module")
def image_61(newest_61: str) -> list[ModuleInfo]:
    return load_module_ref(f"debian-image:{newest_61}")


@pytest.fixture(scope="module")
def kernel_61(newest_61: str) -> KernelABI:
    return load_kernel(f"debian:{newest_61}")


def dump_modversions(path: str) -> str:
    return subprocess.run(["modprobe", "--dump-modversions", path], capture_output=True,
                          text=True, check=True).stdout


def ours_as_dump(m: ModuleInfo) -> str:
    return "".join(f"0x{crc:08x}\t{sym}\n" for sym, crc in (m.versions or {}).items())


def assert_versions_match_modprobe(modules: list[ModuleInfo]) -> None:
    require_tool("modprobe")
    assert len(modules) > 1000
    with ThreadPoolExecutor(4) as pool:
        theirs = list(pool.map(dump_modversions, [m.path for m in modules], chunksize=64))
    mismatched = [m.path for m, t in zip(modules, theirs, strict=True) if ours_as_dump(m) != t]
    assert mismatched == [], f"{len(mismatched)} modules differ, e.g. {mismatched[:3]}"


def modinfo_blocks(paths: list[str]) -> dict[str, list[tuple[str, str]]]:
    """modinfo -0 over many files at once: raw key=value fields per file, in order."""
    out = subprocess.run(["modinfo", "-0", *paths], capture_output=True, text=True,
                         check=True).stdout
    blocks: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for token in out.split("\0"):
        if token.startswith("filename:"):
            current = blocks.setdefault(token.split(":", 1)[1].strip(), [])
            continue
        if token.startswith("parm:"):
            continue
        key, sep, value = token.partition("=")
        if sep and key not in SIGNATURE_FIELDS:
            current.append((key, value))
    return blocks


def assert_modinfo_matches(modules: list[ModuleInfo]) -> None:
    require_tool("modinfo")
    paths = [m.path for m in modules]
    theirs: dict[str, list[tuple[str, str]]] = {}
    for i in range(0, len(paths), 400):
        theirs.update(modinfo_blocks(paths[i:i + 400]))
    assert len(theirs) == len(modules)
    mismatched = [
        m.path for m in modules
        if theirs[m.path] != [kv for kv in m.modinfo if kv[0] not in REFORMATTED_FIELDS]
    ]
    assert mismatched == [], f"{len(mismatched)} modules differ, e.g. {mismatched[:3]}"
    # And the fields the abi check relies on, one by one, through modinfo -F itself
    # on a few modules with every field present (import_ns, depends, GPL-only users).
    rich = [m for m in modules if m.import_ns and m.depends][:5]
    assert rich
    for m in rich:
        for field in ("vermagic", "license", "depends", "srcversion", "import_ns", "name"):
            out = subprocess.run(["modinfo", "-F", field, m.path], capture_output=True,
                                 text=True, check=True).stdout
            assert out.splitlines() == m.modinfo_values(field), (m.path, field)


def test_every_61_module_matches_modprobe(image_61: list[ModuleInfo]) -> None:
    assert_versions_match_modprobe(image_61)


def test_every_61_module_matches_modinfo(image_61: list[ModuleInfo]) -> None:
    assert_modinfo_matches(image_61)


def test_every_612_xz_module_matches_modprobe() -> None:
    release = archive_releases("6.12.")[-1]
    modules = load_module_ref(f"debian-image:{release}")
    assert all(m.path.endswith(".ko.xz") for m in modules)
    assert_versions_match_modprobe(modules)
    assert_modinfo_matches(modules)


def test_every_intree_module_passes_on_its_own_kernel(
    image_61: list[ModuleInfo], kernel_61: KernelABI
) -> None:
    verdicts = [check_module(m, kernel_61) for m in image_61]
    failing = [(v.module.name, v.reasons[:2]) for v in verdicts if v.outcome is Outcome.FAIL]
    assert failing == []
    # The derived vermagic is the one the kernel's own modules carry.
    assert {m.vermagic for m in image_61} == {kernel_61.vermagic}


def test_intree_modules_fail_on_another_abi_for_exactly_the_crc_reasons(
    image_61: list[ModuleInfo], series_61: list[str], kernel_61: KernelABI
) -> None:
    other = next(
        (k for r in series_61[:-1]
         if (k := load_kernel(f"debian:{r}")).exports[MODULE_LAYOUT].crc
         != kernel_61.exports[MODULE_LAYOUT].crc),
        None,
    )
    if other is None:
        pytest.skip("every 6.1 ABI in the archive today shares one module_layout CRC")
    for m in image_61:
        verdict = check_module(m, other)
        assert verdict.outcome is Outcome.FAIL
        assert verdict.reasons[0].code is ReasonCode.MODULE_LAYOUT
        # Independently: the symbols the module needs whose CRC the other kernel
        # exports differently, and those it does not export at all.
        versions = m.versions or {}
        expected_crc = {
            s for s in m.undefined
            if s in other.exports and s in versions and versions[s] != other.exports[s].crc
        }
        expected_missing = {s for s in m.undefined if s not in other.exports}
        got_crc = {r.symbol for r in verdict.reasons if r.code is ReasonCode.CRC_MISMATCH}
        got_missing = {r.symbol for r in verdict.reasons if r.code is ReasonCode.MISSING_SYMBOL}
        assert (got_crc, got_missing) == (expected_crc, expected_missing), m.path


def test_debian_reference_reads_release_compiler_and_exports(
    kernel_61: KernelABI, newest_61: str
) -> None:
    assert kernel_61.release == newest_61
    assert kernel_61.machine == "x86_64"
    assert kernel_61.cc_version_text and "gcc" in kernel_61.cc_version_text
    assert len(kernel_61.exports) > 20000
    gpl = [e for e in kernel_61.exports.values() if e.export_type.value == "EXPORT_SYMBOL_GPL"]
    namespaced = [e for e in kernel_61.exports.values() if e.namespace]
    in_modules = [e for e in kernel_61.exports.values() if e.provider != "vmlinux"]
    assert gpl and namespaced and in_modules


def test_headers_deb_file_and_symvers_file_read_the_same_as_debian_ref(
    kernel_61: KernelABI, newest_61: str
) -> None:
    deb = debian.download(f"linux-headers-{newest_61}")
    from_deb = load_kernel(str(deb))
    assert from_deb.exports == kernel_61.exports
    assert from_deb.vermagic == kernel_61.vermagic
    tree = debian.fetch_headers(newest_61)
    symvers = next(Path(tree).glob("usr/src/*/Module.symvers"))
    assert load_kernel(str(symvers)).exports == kernel_61.exports
