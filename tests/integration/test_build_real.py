"""The build check on real Debian -dkms packages and real Debian kernels.

One matrix, built once per session: four -dkms packages against an early and
a late 6.1 ABI and the newest 6.12.  The breakages asserted are the ones the
archive really has (see FACTS.md), and a few cells are rebuilt with Debian's
own ``dkms build`` to show the verdicts agree.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.abi.compare import Outcome, check_module
from kmodgate.build.kbuild import read_log
from kmodgate.build.kernel_tree import stage_kernel_tree
from kmodgate.build.matrix import run_build_matrix
from kmodgate.build.sandbox import run_sandboxed
from kmodgate.cache import cache_subdir
from kmodgate.results import CheckResult
from kmodgate.sources import debian
from kmodgate.sources.kernels import load_kernel
from kmodgate.sources.module_sources import load_source
from kmodgate.sources.modules import read_module_file

pytestmark = pytest.mark.integration

PACKAGES = (
    "v4l2loopback-dkms",
    "acpi-call-dkms",
    "openrazer-driver-dkms",
    "dm-writeboost-dkms",
)
# The 6.1 stable update that gave hid_report_raw_event() its extra argument
# reached Debian between ABIs 6.1.0-47 and 6.1.0-50 (FACTS.md).
OPENRAZER_LAST_GOOD = "6.1.0-47-amd64"
PLAIN_FLAVOUR = re.compile(r"^\d+\.\d+\.\d+(?:-\d+)?(?:\+deb\d+)?-amd64$")


def _kernels() -> dict[str, str]:
    """Three ABIs: the earliest and the latest 6.1 the archive has, the newest 6.12."""
    for tool in ("bwrap", "make", "gcc-12", "pahole", "apt-get"):
        require_tool(tool)
    releases = [r for r in debian.available_kernel_releases("amd64") if PLAIN_FLAVOUR.match(r)]
    series_61 = [r for r in releases if r.startswith("6.1.0-")]
    series_612 = [r for r in releases if r.startswith("6.12.")]
    if len(series_61) < 2 or not series_612:
        pytest.skip(f"the archive offers too few kernels for the matrix: {releases}")
    return {"early-6.1": series_61[0], "late-6.1": series_61[-1], "6.12": series_612[-1]}


@pytest.fixture(scope="module")
def kernels() -> dict[str, str]:
    return _kernels()


@pytest.fixture(scope="module")
def matrix(kernels: dict[str, str]) -> dict[tuple[str, str], CheckResult]:
    kernel_refs = [f"debian:{r}" for r in kernels.values()]
    source_refs = [f"debian:{p}" for p in PACKAGES]
    results = run_build_matrix(kernel_refs, source_refs)
    assert len(results) == len(PACKAGES) * len(kernel_refs)
    # Results come in (source, kernel) order.
    expected_order = [(p, r) for p in PACKAGES for r in kernels.values()]
    got = {}
    for (package, release), result in zip(expected_order, results, strict=True):
        assert result.kernel == release
        got[(package, release)] = result
    return got


def _reason(result: CheckResult) -> dict[str, object]:
    assert result.reasons, f"{result.module} on {result.kernel}: no reason given"
    return result.reasons[0]


def test_no_cell_is_an_infrastructure_error(
    matrix: dict[tuple[str, str], CheckResult],
) -> None:
    errors = {k: r.reasons for k, r in matrix.items() if r.outcome is Outcome.ERROR}
    assert not errors


def test_acpi_call_builds_everywhere(
    matrix: dict[tuple[str, str], CheckResult], kernels: dict[str, str]
) -> None:
    for release in kernels.values():
        assert matrix[("acpi-call-dkms", release)].outcome is Outcome.PASS, release


def test_openrazer_breaks_inside_the_61_stable_series(
    matrix: dict[tuple[str, str], CheckResult], kernels: dict[str, str]
) -> None:
    late = matrix[("openrazer-driver-dkms", kernels["late-6.1"])]
    assert late.outcome is Outcome.FAIL
    reason = _reason(late)
    assert reason["code"] == "too_few_arguments"
    assert reason["symbol"] == "hid_report_raw_event"
    assert str(reason["file"]).startswith("driver/")
    assert isinstance(reason["line"], int)
    if kernels["early-6.1"] != OPENRAZER_LAST_GOOD:
        pytest.skip(f"the archive no longer has {OPENRAZER_LAST_GOOD}, the last ABI openrazer "
                    f"builds on; its earliest 6.1 is {kernels['early-6.1']}")
    assert matrix[("openrazer-driver-dkms", OPENRAZER_LAST_GOOD)].outcome is Outcome.PASS


def test_v4l2loopback_fails_on_612_because_strlcpy_is_gone(
    matrix: dict[tuple[str, str], CheckResult], kernels: dict[str, str]
) -> None:
    result = matrix[("v4l2loopback-dkms", kernels["6.12"])]
    assert result.outcome is Outcome.FAIL
    reason = _reason(result)
    assert (reason["code"], reason["symbol"], reason["file"]) == (
        "implicit_declaration", "strlcpy", "v4l2loopback.c")
    assert matrix[("v4l2loopback-dkms", kernels["late-6.1"])].outcome is Outcome.PASS


def test_dm_writeboost_fails_on_612_because_bd_inode_is_gone(
    matrix: dict[tuple[str, str], CheckResult], kernels: dict[str, str]
) -> None:
    result = matrix[("dm-writeboost-dkms", kernels["6.12"])]
    assert result.outcome is Outcome.FAIL
    reason = _reason(result)
    assert (reason["code"], reason["member"], reason["struct"]) == (
        "missing_member", "bd_inode", "struct block_device")
    assert matrix[("dm-writeboost-dkms", kernels["late-6.1"])].outcome is Outcome.PASS


def test_every_result_is_complete(matrix: dict[tuple[str, str], CheckResult]) -> None:
    for result in matrix.values():
        assert result.kind == "build"
        assert result.toolchain and "gcc" in result.toolchain
        assert result.details["toolchain"]["match"] == "exact"
        assert len(result.fingerprint) == 64
        assert result.reproducer.startswith("kmodgate check --kind build")
        assert result.log_path and "make" in read_log(result.log_path)
        assert result.module_version


def test_built_modules_are_content_addressed_and_load_only_on_their_kernel(
    matrix: dict[tuple[str, str], CheckResult], kernels: dict[str, str]
) -> None:
    early, late = kernels["early-6.1"], kernels["late-6.1"]
    built = matrix[("acpi-call-dkms", early)]
    assert built.outcome is Outcome.PASS and len(built.artifacts) == 1
    path = Path(built.artifacts[0])
    assert path.name == hashlib.sha256(path.read_bytes()).hexdigest() + ".ko"
    module = read_module_file(path)
    assert module.vermagic is not None and module.vermagic.startswith(early + " ")
    # The abi check's question: does the module built for A load on B?
    assert check_module(module, load_kernel(f"debian:{early}")).outcome is Outcome.PASS
    on_late = check_module(module, load_kernel(f"debian:{late}"))
    assert on_late.outcome is Outcome.FAIL
    assert "module_layout_mismatch" in {r.code.value for r in on_late.reasons}


def test_an_unchanged_second_run_is_read_from_the_cache(
    matrix: dict[tuple[str, str], CheckResult], kernels: dict[str, str]
) -> None:
    started = time.monotonic()
    seen: list[CheckResult] = []
    again = run_build_matrix([f"debian:{r}" for r in kernels.values()],
                             [f"debian:{p}" for p in PACKAGES], on_result=seen.append)
    elapsed = time.monotonic() - started
    assert len(seen) == len(again) == len(matrix)
    assert all(r.details.get("cached") for r in again)
    first = {(r.module, r.kernel): r.outcome for r in matrix.values()}
    assert {(r.module, r.kernel): r.outcome for r in again} == first
    assert elapsed < 10, f"a fully cached matrix took {elapsed:.1f}s"


@pytest.mark.parametrize(
    ("package", "kernel_key"),
    [
        ("openrazer-driver-dkms", "early-6.1"),
        ("openrazer-driver-dkms", "late-6.1"),
        ("v4l2loopback-dkms", "6.12"),
        ("acpi-call-dkms", "6.12"),
    ],
)
def test_verdict_agrees_with_debians_dkms_build(
    matrix: dict[tuple[str, str], CheckResult], kernels: dict[str, str],
    package: str, kernel_key: str,
) -> None:
    """Debian's own dkms, on the same source and the same unpacked kernel
    presented at its canonical paths: its exit status is the reference verdict."""
    require_tool("dkms")
    release = kernels[kernel_key]
    ours = matrix[(package, release)]
    conf = ours.details["dkms"]
    passed, output = dkms_build(f"debian:{package}", conf["package_name"],
                                conf["package_version"], f"debian:{release}")
    assert (ours.outcome is Outcome.PASS) == passed, (package, release, ours.reasons, output)


def dkms_build(source_ref: str, name: str, version: str, kernel_ref: str) -> tuple[bool, str]:
    """Whether ``dkms build`` succeeds for the source on the kernel (in the sandbox),
    and the tail of what it said."""
    source = load_source(source_ref)
    kernel = stage_kernel_tree(kernel_ref)
    work = Path(cache_subdir("build-work")) / f"dkms-ref-{name}-{kernel.release}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "dkms").mkdir(parents=True)
    shutil.copytree(source.tree, work / "src" / f"{name}-{version}", symlinks=True)
    try:
        run = run_sandboxed(
            ["dkms", "build", "-m", name, "-v", version, "-k", kernel.release,
             "--dkmstree", str(work / "dkms"), "--sourcetree", str(work / "src"),
             "--kernelsourcedir", kernel.build_dir, "--no-depmod"],
            workdir=work, mounts=kernel.mounts,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return run.returncode == 0, run.output.decode("utf-8", "replace")[-2000:]
