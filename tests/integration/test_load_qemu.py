"""The load check on real Debian kernels booted under QEMU.

Test modules are built here from tests/fixtures against the archive's own
headers (not through the project's build engine, so a regression there does
not hide one here).  Each kernel boots once per session for all its modules
(twice for 6.12, whose deliberately broken module sits in the middle of the
load order so that the rerun of the others is exercised).

The abi check's prediction is compared with the kernel's verdict for every
cell: a disagreement is a bug in one of the two checks and fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import archive_releases, require_tool
from kmodgate.abi.compare import Outcome, ReasonCode, check_module
from kmodgate.boot import initramfs
from kmodgate.boot.kernel_image import boot_kernel, load_kernel_image
from kmodgate.boot.loadcheck import KERNEL_CMDLINE, OOPS, VM_ERROR, agreement, run_load_checks
from kmodgate.boot.qemu import Accelerator, boot_command, choose_accelerator, run_qemu
from kmodgate.errors import UserError
from kmodgate.results import CheckResult, abi_result
from kmodgate.sources import debian
from kmodgate.sources.kernels import load_kernel
from kmodgate.sources.modules import read_module_file

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# Generous: the CI machine runs other builds beside these TCG guests.
BOOT_TIMEOUT = 120.0
# In-tree modules that load in a bare VM (no hardware needed); bonding
# depends on tls in 6.1, which exercises dependency resolution.
IN_TREE = ("crc7", "crc8", "dummy", "bonding")


def merged_build_tree(release: str, dest: Path) -> Path:
    """The flavour headers tree of *release*, with -common and kbuild beside it.

    Debian's packages expect to be installed in one root: their ``scripts``
    and ``tools`` are relative links into ``usr/lib/linux-kbuild-*`` and the
    flavour Makefile includes the -common one by absolute path.  A farm of
    links, one level deep, gives them one root without copying the trees.
    """
    for root in debian.fetch_build_tree(release):
        trees = [*(root / "usr/src").glob("*"), *(root / "usr/lib").glob("linux-kbuild-*")]
        for tree in trees:
            if tree.is_symlink():
                continue
            target = dest / tree.relative_to(root)
            target.mkdir(parents=True, exist_ok=True)
            for entry in tree.iterdir():
                link = target / entry.name
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), link)  # relative: resolves in dest
                elif entry.name == "Makefile" and tree.name == f"linux-headers-{release}":
                    text = entry.read_text()
                    link.write_text(text.replace("include /usr/src/", f"include {dest}/usr/src/"))
                else:
                    os.symlink(entry, link)
    tree = dest / "usr/src" / f"linux-headers-{release}"
    assert (tree / "Module.symvers").is_file(), tree
    return tree


def build_fixture_module(fixture: str, tree: Path, workdir: Path, name: str) -> Path:
    """Build tests/fixtures/<fixture> against *tree* as module *name*.

    Renaming lets one boot hold builds of the same source for several ABIs:
    the loader refuses a second module of a name already loaded.
    """
    src = FIXTURES / fixture
    (c_file,) = src.glob("*.c")
    work = workdir / f"{name}-{tree.name}"
    shutil.copytree(src, work)
    (work / c_file.name).rename(work / f"{name}.c")
    (work / "Kbuild").write_text(f"obj-m := {name}.o\n")
    proc = subprocess.run(
        ["make", "-C", str(tree), f"M={work}", "modules"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return work / f"{name}.ko"


@pytest.fixture(scope="module")
def releases() -> dict[str, str]:
    series_61 = archive_releases("6.1.")
    series_612 = archive_releases("6.12.")
    if len(series_61) < 2:
        pytest.skip("the archive offers a single 6.1 ABI: no other ABI to refuse")
    return {"61": series_61[-1], "61old": series_61[0], "612": series_612[-1]}


@pytest.fixture(scope="module")
def modules(releases: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("make")
    require_tool("gcc")
    work = tmp_path_factory.mktemp("load-modules")
    trees = {key: merged_build_tree(rel, work / f"tree-{key}") for key, rel in releases.items()}
    return {
        "hello_61": build_fixture_module("hello_module", trees["61"], work, "kmodgate_hello"),
        "hello_61old": build_fixture_module("hello_module", trees["61old"], work,
                                            "kmodgate_hello_old"),
        "hello_612": build_fixture_module("hello_module", trees["612"], work,
                                          "kmodgate_hello_612"),
        "oops_61": build_fixture_module("oops_module", trees["61"], work, "kmodgate_oops"),
        "oops_612": build_fixture_module("oops_module", trees["612"], work, "kmodgate_oops"),
    }


def in_tree(release: str) -> list[Path]:
    files = load_kernel_image(f"debian:{release}").module_files
    return [files[name] for name in IN_TREE]


@pytest.fixture(scope="module")
def boot_61(releases: dict[str, str], modules: dict[str, Path]) -> dict[str, CheckResult]:
    """One boot of the newest 6.1: own modules, other ABIs' modules, and the
    oopsing module last (so no rerun is needed)."""
    require_tool("qemu-system-x86_64")
    paths = [*in_tree(releases["61"]), modules["hello_61"], modules["hello_61old"],
             modules["hello_612"], modules["oops_61"]]
    results = run_load_checks(f"debian:{releases['61']}", paths, timeout=BOOT_TIMEOUT)
    return {r.details["module_path"]: r for r in results}


@pytest.fixture(scope="module")
def boot_612(releases: dict[str, str], modules: dict[str, Path]) -> dict[str, CheckResult]:
    """The newest 6.12, its .ko.xz in-tree modules after the oopsing one."""
    require_tool("qemu-system-x86_64")
    paths = [modules["hello_612"], modules["hello_61"], modules["oops_612"],
             *in_tree(releases["612"])]
    results = run_load_checks(f"debian:{releases['612']}", paths, timeout=BOOT_TIMEOUT)
    return {r.details["module_path"]: r for r in results}


def abi_codes(module: Path, release: str) -> list[str]:
    verdict = check_module(read_module_file(module), load_kernel(f"debian:{release}"))
    return [r.code.value for r in verdict.reasons]


def test_accelerator_is_detected_and_stated() -> None:
    require_tool("qemu-system-x86_64")
    accel = choose_accelerator()
    assert accel.name in ("kvm", "tcg") and accel.reason
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if not re.search(r"\b(vmx|svm)\b", flags):
        assert accel.name == "tcg", accel  # no hardware virtualisation: KVM cannot work


def test_a_kernel_stalling_under_kvm_is_noticed(releases: dict[str, str],
                                                tmp_path: Path) -> None:
    """Where /dev/kvm exists without hardware virtualisation (these CI hosts),
    a real kernel makes no progress under KVM: the progress limit must see it."""
    require_tool("qemu-system-x86_64")
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if not Path("/dev/kvm").exists() or re.search(r"\b(vmx|svm)\b", flags):
        pytest.skip("needs /dev/kvm on a CPU without VMX/SVM, where KVM guests hang")
    image = load_kernel_image(f"debian:{releases['61']}")
    initrd = initramfs.write_initramfs([], initramfs.busybox_binary(), tmp_path / "i.cpio")
    kvm = Accelerator("kvm", "pretend the probe passed")
    run = run_qemu(boot_command(kvm, boot_kernel(image.vmlinuz), initrd, KERNEL_CMDLINE),
                   kvm, timeout=60, progress=(initramfs.MARK_BOOTED, 5.0))
    assert run.stalled and not run.finished and run.duration_seconds < 30


def test_61_own_module_loads(boot_61: dict[str, CheckResult], modules: dict[str, Path],
                             releases: dict[str, str]) -> None:
    r = boot_61[str(modules["hello_61"])]
    assert (r.kind, r.kernel, r.outcome) == ("load", releases["61"], Outcome.PASS), r.reasons
    assert "kmodgate_hello: loaded" in r.details["kernel_log"]
    assert r.details["accelerator"] in ("kvm", "tcg")
    assert r.log_path and Path(r.log_path).is_file()
    # The oopsing module was last: everything fitted in one boot.
    assert {x.details["boot_number"] for x in boot_61.values()} == {1}


def test_61_in_tree_modules_load_with_their_dependencies(
    boot_61: dict[str, CheckResult], releases: dict[str, str]
) -> None:
    for path in in_tree(releases["61"]):
        r = boot_61[str(path)]
        assert r.outcome is Outcome.PASS, (r.module, r.reasons, r.details.get("kernel_log"))
    bonding = boot_61[str(in_tree(releases["61"])[IN_TREE.index("bonding")])]
    assert set(bonding.details["dependencies"]) == set(
        read_module_file(in_tree(releases["61"])[IN_TREE.index("bonding")]).depends)


def test_61_refuses_other_abi_as_abi_predicted(
    boot_61: dict[str, CheckResult], modules: dict[str, Path], releases: dict[str, str]
) -> None:
    r = boot_61[str(modules["hello_61old"])]
    assert r.outcome is Outcome.FAIL
    assert [x["code"] for x in r.reasons] == [ReasonCode.MODULE_LAYOUT.value]
    assert r.reasons[0]["symbol"] == "module_layout"
    assert any("disagrees about version of symbol module_layout" in line
               for line in r.details["kernel_log"])
    assert ReasonCode.MODULE_LAYOUT.value in abi_codes(modules["hello_61old"], releases["61"])


def test_61_oops_is_fail_for_that_module_only(
    boot_61: dict[str, CheckResult], modules: dict[str, Path]
) -> None:
    r = boot_61[str(modules["oops_61"])]
    assert r.outcome is Outcome.FAIL
    assert r.reasons[0]["code"] == OOPS
    assert r.reasons[0]["symbol"] == "kmodgate_oops_init"
    assert "NULL pointer dereference" in r.reasons[0]["message"]


def test_612_oops_does_not_lose_the_other_results(
    boot_612: dict[str, CheckResult], modules: dict[str, Path], releases: dict[str, str]
) -> None:
    oops = boot_612[str(modules["oops_612"])]
    assert oops.outcome is Outcome.FAIL and oops.reasons[0]["code"] == OOPS
    own = boot_612[str(modules["hello_612"])]
    assert own.outcome is Outcome.PASS, own.reasons
    assert own.details["boot_number"] == 1
    # Loaded after the oops, in a fresh boot, from .ko.xz files.
    for path in in_tree(releases["612"]):
        assert path.name.endswith(".ko.xz")
        r = boot_612[str(path)]
        assert r.outcome is Outcome.PASS, (r.module, r.reasons, r.details.get("kernel_log"))
        assert r.details["boot_number"] == 2


def test_612_refuses_61_module_as_abi_predicted(
    boot_612: dict[str, CheckResult], modules: dict[str, Path], releases: dict[str, str]
) -> None:
    r = boot_612[str(modules["hello_61"])]
    assert r.outcome is Outcome.FAIL
    codes = [x["code"] for x in r.reasons]
    assert codes == [ReasonCode.MODULE_LAYOUT.value], r.details["kernel_log"]
    assert ReasonCode.MODULE_LAYOUT.value in abi_codes(modules["hello_61"], releases["612"])


def test_abi_and_load_agree_on_every_cell(
    boot_61: dict[str, CheckResult], boot_612: dict[str, CheckResult],
    releases: dict[str, str],
) -> None:
    load_results = [*boot_61.values(), *boot_612.values()]
    abi_results = []
    for key in ("61", "612"):
        kernel = load_kernel(f"debian:{releases[key]}")
        boot = boot_61 if key == "61" else boot_612
        for path in boot:
            abi_results.append(abi_result(check_module(read_module_file(Path(path)), kernel)))
    report = agreement(abi_results, load_results)
    summary = "\n".join(report.summary_lines())
    print(summary)
    assert not report.disagreements, summary
    data = report.to_json()
    assert data["compared"] == len(load_results) and data["abi_only"] == data["load_only"] == 0
    assert data["not_comparable"] == 0


def test_time_limit_makes_a_vm_error(
    releases: dict[str, str], modules: dict[str, Path]
) -> None:
    require_tool("qemu-system-x86_64")
    (r,) = run_load_checks(f"debian:{releases['61']}", [modules["hello_61"]], timeout=1.0)
    assert r.outcome is Outcome.ERROR
    assert r.reasons[0]["code"] == VM_ERROR
    assert "within 1 s" in r.reasons[0]["message"]


def test_unknown_kernel_is_a_user_error(modules: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError):
        run_load_checks(str(tmp_path / "no-such-kernel"), [modules["hello_61"]])


CRC_SYMBOL = "wake_up_process"  # the one symbol tests/fixtures/crc_module needs


@pytest.fixture(scope="module")
def same_layout_pair() -> tuple[str, str]:
    """Two 6.1 ABIs (older, newer) with the same module_layout CRC but a
    different CRC for CRC_SYMBOL: the newest such newer one."""
    series = archive_releases("6.1.")
    kernels = {r: load_kernel(f"debian:{r}") for r in series}
    for newer in reversed(series):
        for older in series[:series.index(newer)]:
            a, b = kernels[older].exports, kernels[newer].exports
            if (a["module_layout"].crc == b["module_layout"].crc
                    and a[CRC_SYMBOL].crc != b[CRC_SYMBOL].crc):
                return older, newer
    pytest.skip(f"no two 6.1 ABIs in the archive share module_layout and differ in "
                f"{CRC_SYMBOL}")


def test_crc_mismatch_of_one_symbol_as_abi_predicted(
    same_layout_pair: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Across ABIs that keep module_layout, the kernel names the one symbol
    whose CRC moved, and a module needing only unchanged symbols loads: both
    as the abi check predicts."""
    require_tool("qemu-system-x86_64")
    older, newer = same_layout_pair
    work = tmp_path_factory.mktemp("crc-modules")
    tree = merged_build_tree(older, work / "tree")
    crc = build_fixture_module("crc_module", tree, work, "kmodgate_crc")
    hello = build_fixture_module("hello_module", tree, work, "kmodgate_hello")
    results = run_load_checks(f"debian:{newer}", [crc, hello], timeout=BOOT_TIMEOUT)
    by_path = {r.details["module_path"]: r for r in results}
    refused, loaded = by_path[str(crc)], by_path[str(hello)]
    assert refused.outcome is Outcome.FAIL
    assert [(x["code"], x["symbol"]) for x in refused.reasons] == [
        (ReasonCode.CRC_MISMATCH.value, CRC_SYMBOL)], refused.details["kernel_log"]
    assert loaded.outcome is Outcome.PASS, loaded.reasons
    kernel = load_kernel(f"debian:{newer}")
    abi = [abi_result(check_module(read_module_file(p), kernel)) for p in (crc, hello)]
    report = agreement(abi, results)
    assert not report.disagreements and report.count("agree") == 2, report.summary_lines()
