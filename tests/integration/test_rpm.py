"""The RPM reader on packages built by the real rpmbuild from a real Debian kernel.

A kernel-devel carrying the release's Module.symvers and .config, kernel-core
packages with ``Provides: kernel(sym) = 0xCRC`` (with and without RHEL's
symvers.gz), kmods carrying real in-tree .ko files and one with only
``Requires: kernel(sym) = 0xCRC``.  What the reader gets from headers is held
to ``rpm -qp``; what it gets from payloads to the same files read directly.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from kmodgate.abi.compare import Outcome, ReasonCode, check_module
from kmodgate.abi.compression import decompress
from kmodgate.abi.model import VMLINUX, ExportType, KernelABI, ModuleInfo
from kmodgate.cache import cache_subdir
from kmodgate.errors import UserError
from kmodgate.sources import debian, kernels, modules, rpm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rpm_fixtures import RpmRecipe, build_rpm, rpm_query, with_payload

pytestmark = pytest.mark.integration

KMODGATE = Path(sys.executable).with_name("kmodgate")
ABI_DEP = re.compile(r"^kernel\((.+)\) = (0x[0-9a-f]+)$")
# Symbols beyond the modules' own needs in the Provides-only kernel packages.
EXTRA_PROVIDES = 300


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package rpm; scripts/apt-packages.txt)")


def _pick_release() -> str:
    """A plain amd64 kernel the archive offers, preferring one already downloaded."""
    try:
        releases = [
            r for r in debian.available_kernel_releases("amd64")
            if not r.endswith(("-cloud-amd64", "-rt-amd64"))
        ]
    except Exception as exc:  # apt missing or broken: the tier cannot run here
        pytest.skip(f"cannot list the archive's kernels through apt: {exc}")
    if not releases:
        pytest.skip("the host's apt sources offer no amd64 kernel headers")
    debs = cache_subdir("debs")
    cached = [r for r in releases if list(debs.glob(f"linux-image-{r}_*.deb"))]
    return (cached or releases)[-1]


@dataclass
class Fixtures:
    release: str
    tree: Path  # the Debian headers tree
    reference: KernelABI  # the same kernel read from the Debian tree
    modules: list[ModuleInfo]  # real in-tree modules, read from the image
    module_files: list[Path]
    devel: Path
    core: Path  # Provides only, + config
    core_symvers: Path  # Provides + symvers.gz + config
    core_altered: Path  # Provides with one CRC the modules use changed
    altered_symbol: str
    kmod: Path  # .ko and .ko.zst
    kmod_requires: Path  # Requires: kernel(sym) = 0xCRC only
    workdir: Path


def _small_modules(image: Path, release: str, kernel: KernelABI, count: int) -> list[Path]:
    """The smallest in-tree modules with __versions whose needs the kernel meets."""
    files = sorted(
        (Path(p) for p in modules.find_module_files(image / "lib/modules" / release)),
        key=lambda p: p.stat().st_size,
    )
    chosen: list[Path] = []
    for f in files:
        m = modules.read_module_file(f)
        if m.versions and len(m.versions) >= 3 and all(s in kernel.exports for s in m.undefined):
            chosen.append(f)
            if len(chosen) == count:
                return chosen
    pytest.fail(f"no {count} small modules with __versions in {image}")


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    _require("rpmbuild")
    _require("rpm")
    release = _pick_release()
    headers = debian.fetch_headers(release)
    tree = kernels.find_build_tree(headers)
    reference = kernels.kernel_from_directory(headers, origin="reference")
    image = debian.fetch_image(release)
    module_files = _small_modules(image, release, reference, 2)
    mods = [modules.read_module_file(f) for f in module_files]
    work = tmp_path_factory.mktemp("rpms")

    devel = build_rpm(RpmRecipe(
        name="kernel-devel", version="6.1", release="1", payload="xz",
        trees={f"/usr/src/kernels/{release}": tree},
        symlinks={
            # Links a hostile or careless package could carry: they must
            # not be made, let alone followed.
            f"/usr/src/kernels/{release}/escape-absolute": "/etc",
            f"/usr/src/kernels/{release}/escape-relative": "../" * 12 + "etc",
        },
    ), work)

    # Every symbol the modules need or check (module_layout is only checked),
    # as a real kernel package provides them all.
    needed = sorted({s for m in mods for s in [*m.undefined, *(m.versions or {})]
                     if s in reference.exports})
    extra = [s for s in reference.exports if s not in needed][:EXTRA_PROVIDES]
    provided = {s: reference.exports[s].crc for s in needed + extra}
    config = (tree / ".config").read_bytes()

    def core(name: str, crcs: dict[str, int | None], files: dict[str, bytes]) -> Path:
        return build_rpm(RpmRecipe(
            name=name, version="6.1", release="1", payload="zstd",
            provides=[f"kernel({s}) = 0x{c:08x}" for s, c in crcs.items()]
            + [f"kernel-uname-r = {release}"],
            files={f"/lib/modules/{release}/config": config, **files},
        ), work)

    altered_symbol = next(s for s in mods[0].versions or {} if s != "module_layout")
    altered = dict(provided)
    altered[altered_symbol] = (provided[altered_symbol] or 0) ^ 0x1
    symvers_gz = gzip.compress((tree / "Module.symvers").read_bytes())

    ko_zst = zstandard.ZstdCompressor().compress(
        decompress(module_files[1].read_bytes(), str(module_files[1]))
    )
    kmod_files = {
        f"/lib/modules/{release}/extra/{module_files[0].name}": module_files[0].read_bytes(),
        f"/lib/modules/{release}/extra/{module_files[1].name.split('.ko')[0]}.ko.zst":
            ko_zst,
    }
    return Fixtures(
        release=release, tree=tree, reference=reference, modules=mods,
        module_files=module_files, devel=devel,
        core=core("kernel-core", provided, {}),
        core_symvers=core("kernel-core-symvers", provided,
                          {f"/lib/modules/{release}/symvers.gz": symvers_gz}),
        core_altered=core("kernel-core-altered", altered, {}),
        altered_symbol=altered_symbol,
        kmod=build_rpm(RpmRecipe(name="kmod-real", files=kmod_files), work),
        kmod_requires=build_rpm(RpmRecipe(
            name="kmod-requires-only",
            requires=[f"kernel({s}) = 0x{c:08x}" for s, c in (mods[0].versions or {}).items()],
        ), work),
        workdir=work,
    )


# --- headers against rpm(8) --------------------------------------------------


@pytest.mark.parametrize("name", ["devel", "core", "core_symvers", "kmod", "kmod_requires"])
def test_dependencies_match_rpm_query(fx: Fixtures, name: str) -> None:
    path = getattr(fx, name)
    pkg = rpm.read_package(path)
    assert [str(d) for d in pkg.provides] == rpm_query(path, "provides")
    assert [str(d) for d in pkg.requires] == rpm_query(path, "requires")


def _abi_entries(lines: list[str]) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 16) for line in lines if (m := ABI_DEP.match(line))}


# --- kernels -----------------------------------------------------------------


def test_kernel_devel_matches_its_module_symvers(fx: Fixtures) -> None:
    kernel = rpm.kernel_from_rpm(fx.devel)
    assert kernel.release == fx.release
    assert kernel.exports == fx.reference.exports
    assert kernel.machine == "x86_64"
    assert kernel.vermagic == fx.reference.vermagic is not None
    assert kernel.modversions
    assert kernel.origin == str(fx.devel)


def test_kernel_devel_unpack_is_confined(fx: Fixtures) -> None:
    root = rpm.unpack(rpm.read_package(fx.devel))
    tree = root / "usr/src/kernels" / fx.release
    assert (tree / "Module.symvers").read_bytes() == (fx.tree / "Module.symvers").read_bytes()
    assert not (tree / "escape-absolute").is_symlink()
    assert not (tree / "escape-relative").is_symlink()
    # Links that stay inside the package are kept as they were.
    for link in fx.tree.iterdir():
        if link.is_symlink() and not os.readlink(link).startswith("/"):
            assert os.readlink(tree / link.name) == os.readlink(link)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                assert os.path.realpath(p).startswith(str(root.resolve()) + "/")


def test_kernel_core_provides(fx: Fixtures) -> None:
    kernel = rpm.kernel_from_rpm(fx.core)
    expected = _abi_entries(rpm_query(fx.core, "provides"))
    assert len(expected) >= EXTRA_PROVIDES
    assert kernel.release == fx.release
    assert {s: e.crc for s, e in kernel.exports.items()} == expected
    for symbol, export in kernel.exports.items():
        assert export.crc == fx.reference.exports[symbol].crc
        assert export.provider == VMLINUX
        assert export.export_type is ExportType.UNKNOWN
    # The config in the payload gives the loader's vermagic and modversions.
    assert kernel.machine == "x86_64"
    assert kernel.vermagic == fx.reference.vermagic
    assert kernel.modversions


def test_kernel_core_prefers_its_symvers(fx: Fixtures) -> None:
    kernel = rpm.kernel_from_rpm(fx.core_symvers)
    assert kernel.release == fx.release
    assert kernel.exports == fx.reference.exports  # providers, types and namespaces too


# --- modules -----------------------------------------------------------------


def test_kmod_modules_match_the_files(fx: Fixtures) -> None:
    got = rpm.modules_from_rpm(fx.kmod)
    assert [m.name for m in got] == sorted(m.name for m in fx.modules)
    by_name = {m.name: m for m in fx.modules}
    for m in got:
        ref = by_name[m.name]
        assert m.versions == ref.versions
        assert list((m.versions or {}).items()) == list((ref.versions or {}).items())
        assert m.modinfo == ref.modinfo
        assert m.undefined == ref.undefined
        assert m.path.startswith(f"{fx.kmod}:/lib/modules/")
        assert m.origin_kind == "elf"


def test_kmod_requires_only(fx: Fixtures) -> None:
    (m,) = rpm.modules_from_rpm(fx.kmod_requires)
    expected = _abi_entries(rpm_query(fx.kmod_requires, "requires"))
    assert m.versions == expected == fx.modules[0].versions
    assert m.name == "kmod-requires-only"
    assert m.path == str(fx.kmod_requires)
    assert m.undefined == [s for s in expected if s != "module_layout"]
    assert m.modinfo == [] and m.exports == []
    assert m.machine == "x86_64"
    assert m.origin_kind == "rpm-requires"


def test_check_passes_and_fails_on_rpm_kernels(fx: Fixtures) -> None:
    ko = rpm.modules_from_rpm(fx.kmod)
    req = rpm.modules_from_rpm(fx.kmod_requires)
    for kernel_rpm in (fx.devel, fx.core, fx.core_symvers):
        kernel = rpm.kernel_from_rpm(kernel_rpm)
        for m in ko:
            verdict = check_module(m, kernel)
            assert verdict.outcome is Outcome.PASS, (kernel_rpm.name, m.name, verdict.reasons)
        # Requires carry no license, so the GPL-only rule cannot apply to them:
        # with matching CRCs they pass on every kernel, GPL-only exports or not.
        verdict = check_module(req[0], kernel)
        assert verdict.outcome is Outcome.PASS, (kernel_rpm.name, verdict.reasons)
    altered = rpm.kernel_from_rpm(fx.core_altered)
    for m in [next(x for x in ko if x.name == fx.modules[0].name), *req]:
        verdict = check_module(m, altered)
        assert verdict.outcome is Outcome.FAIL
        assert [(r.code, r.symbol) for r in verdict.reasons] == [
            (ReasonCode.CRC_MISMATCH, fx.altered_symbol)
        ]


# --- the command line ----------------------------------------------------------


def _kmodgate(*args: str) -> subprocess.CompletedProcess[str]:
    if not KMODGATE.exists():
        pytest.skip(f"the kmodgate command is not installed next to {sys.executable}")
    return subprocess.run([str(KMODGATE), *args], capture_output=True, text=True, check=False)


def test_cli_check_rpm_pass_and_fail(fx: Fixtures) -> None:
    cases = [
        (fx.core, [fx.kmod, fx.kmod_requires], ["pass", "pass", "pass"]),
        (fx.devel, [fx.kmod], ["pass", "pass"]),
        (fx.core_altered, [fx.kmod, fx.kmod_requires], None),
    ]
    for kernel, kmods, expected in cases:
        args = [a for k in kmods for a in ("--module", str(k))]
        proc = _kmodgate("check", "--kind", "abi", "--kernel", str(kernel), *args, "--json")
        assert proc.returncode == (0 if expected else 1), proc.stderr
        results = json.loads(proc.stdout)["results"]
        outcomes = [r["outcome"] for r in results]
        if expected:
            assert outcomes == expected
        else:
            # A module fails exactly when it uses the altered symbol, and then
            # for that reason alone.
            users = {m.name for m in fx.modules if fx.altered_symbol in (m.versions or {})}
            users.add("kmod-requires-only")
            for r in results:
                assert r["outcome"] == ("fail" if r["module"] in users else "pass"), r
                if r["outcome"] == "fail":
                    assert [(x["code"], x["symbol"]) for x in r["reasons"]] == [
                        ("crc_mismatch", fx.altered_symbol)
                    ]


def _bad_inputs(fx: Fixtures) -> dict[str, Path]:
    truncated = fx.workdir / "truncated.rpm"
    truncated.write_bytes(fx.core.read_bytes()[:200])
    garbage = fx.workdir / "garbage.rpm"
    garbage.write_bytes(bytes(range(256)) * 40)
    cut = fx.workdir / "cut-payload.rpm"
    raw = fx.kmod.read_bytes()
    cut.write_bytes(raw[: len(raw) - 500])
    flipped = fx.workdir / "flipped-payload.rpm"
    mutable = bytearray(raw)
    mutable[-300] ^= 0xFF
    flipped.write_bytes(bytes(mutable))
    return {"truncated": truncated, "garbage": garbage, "cut": cut, "flipped": flipped}


@pytest.mark.parametrize("option", ["--kernel", "--module"])
def test_cli_bad_rpm_is_one_user_error(fx: Fixtures, option: str) -> None:
    for path in _bad_inputs(fx).values():
        other = ["--module", str(fx.kmod)] if option == "--kernel" else ["--kernel", str(fx.core)]
        proc = _kmodgate("check", "--kind", "abi", option, str(path), *other, "--json")
        assert proc.returncode == 2, (path.name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kmodgate: error:"), proc.stderr
        assert str(path) in lines[0]
        assert proc.stdout == ""


def test_bad_rpm_raises_user_error(fx: Fixtures) -> None:
    for path in _bad_inputs(fx).values():
        for read in (rpm.kernel_from_rpm, rpm.modules_from_rpm):
            with pytest.raises(UserError) as info:
                read(path)
            assert info.value.where == str(path)


def test_wrong_kind_of_package(fx: Fixtures) -> None:
    with pytest.raises(UserError, match="no kernel ABI"):
        rpm.kernel_from_rpm(fx.kmod)
    with pytest.raises(UserError, match="contains no kernel modules"):
        rpm.modules_from_rpm(fx.core)


# --- hostile payloads ------------------------------------------------------------


def _hostile(fx: Fixtures, name: str, members: list[tuple[str, int, bytes]]) -> Path:
    base = build_rpm(RpmRecipe(
        name=f"hostile-{name}",
        files={f"/usr/src/kernels/{fx.release}/Module.symvers": b"", "/x.ko": b""},
    ), fx.workdir)
    return with_payload(base, members, fx.workdir / f"hostile-{name}.rpm")


@pytest.mark.parametrize(
    ("tag", "bad_name"),
    [("dotdot", "../../escaped"), ("inner", "./usr/../../escaped"), ("abs", "/tmp/escaped")],
)
def test_payload_names_outside_are_refused(fx: Fixtures, tag: str, bad_name: str) -> None:
    symvers = (fx.tree / "Module.symvers").read_bytes()
    path = _hostile(fx, tag, [
        (f"./usr/src/kernels/{fx.release}/Module.symvers", stat.S_IFREG | 0o644, symvers),
        (bad_name, stat.S_IFREG | 0o644, b"pwned\n"),
    ])
    for read in (rpm.kernel_from_rpm, rpm.modules_from_rpm):
        with pytest.raises(UserError, match="unsafe file name") as info:
            read(path)
        assert info.value.where == str(path)
    assert not (fx.workdir / "escaped").exists()
    assert not Path("/tmp/escaped").exists()


def test_payload_symlink_to_host_file_is_not_read(fx: Fixtures, tmp_path: Path) -> None:
    # A valid Module.symvers outside the package, which a followed link would read.
    outside = tmp_path / "host-symvers"
    outside.write_bytes((fx.tree / "Module.symvers").read_bytes())
    path = _hostile(fx, "symlink", [
        (f"./usr/src/kernels/{fx.release}", stat.S_IFDIR | 0o755, b""),
        (f"./usr/src/kernels/{fx.release}/Module.symvers", stat.S_IFLNK | 0o777,
         str(outside).encode()),
    ])
    with pytest.raises(UserError, match=r"no Module\.symvers") as info:
        rpm.kernel_from_rpm(path)
    assert info.value.where == str(path)


def test_payload_written_through_a_later_link_is_refused(fx: Fixtures) -> None:
    # Each link points inside when it is made: "up" while "q" does not exist
    # yet resolves to the root; "q" then points two levels up, which makes
    # "up" point three levels above the unpack directory.
    path = _hostile(fx, "relink", [
        ("./d1/d2/up", stat.S_IFLNK | 0o777, b"q/../../.."),
        ("./d1/d2/q", stat.S_IFLNK | 0o777, b"../.."),
        ("./d1/d2/up/escaped-through-link", stat.S_IFREG | 0o644, b"pwned\n"),
    ])
    with pytest.raises(UserError, match="outside the package") as info:
        rpm.kernel_from_rpm(path)
    assert info.value.where == str(path)
    # Where the file would have landed: three levels above <cache>/unpacked-rpm/<entry>.
    assert not (cache_subdir("unpacked-rpm").parent.parent / "escaped-through-link").exists()
