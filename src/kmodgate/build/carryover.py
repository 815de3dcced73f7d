"""The kABI-tracking carry-over question: does the module built for kernel A
load on kernel B?  The build check keeps every built .ko (content-addressed);
this runs the abi check over them against other kernels."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kmodgate.abi.compare import Outcome, check_module, companion_exports
from kmodgate.abi.model import KernelABI, ModuleInfo
from kmodgate.results import CheckResult
from kmodgate.sources.modules import read_module_file


def kernel_abi_identity(kernel: KernelABI) -> str:
    """A hash of everything the abi check reads from a kernel."""
    h = hashlib.sha256()
    h.update(f"{kernel.release}\0{kernel.vermagic}\0{kernel.machine}\0"
             f"{kernel.modversions}\0{kernel.force_load}\n".encode())
    for symbol in sorted(kernel.exports):
        e = kernel.exports[symbol]
        h.update(f"{symbol}\0{e.crc}\0{e.provider}\0{e.export_type.value}\0"
                 f"{e.namespace}\n".encode())
    return h.hexdigest()


def group_abi_result(
    module: str,
    module_version: str,
    binaries: Sequence[ModuleInfo],
    kernel: KernelABI,
    *,
    kernel_identity: str,
    seed: str,
    details: dict[str, Any],
) -> CheckResult:
    """One abi result for a group of binaries loaded together (a package's several
    .ko may use each other's exports); it fails if any of them fails.  *seed*
    identifies the binaries (a build's fingerprint, or their content hashes)."""
    extra = companion_exports(binaries)
    verdicts = [check_module(m, kernel, extra) for m in binaries]
    failed = any(v.outcome is Outcome.FAIL for v in verdicts)
    return CheckResult(
        module=module,
        module_version=module_version,
        kernel=kernel.release,
        kind="abi",
        outcome=Outcome.FAIL if failed else Outcome.PASS,
        reasons=[{**r.to_json(), "binary": v.module.name} for v in verdicts for r in v.reasons],
        fingerprint=hashlib.sha256(f"abi\0{seed}\0{kernel_identity}".encode()).hexdigest(),
        reproducer=" ".join(["kmodgate check --kind abi", f"--kernel {kernel.origin}",
                             *(f"--module {m.path}" for m in binaries)]),
        details={**details, "binaries": {m.name: m.path for m in binaries}},
    )


def carryover(
    builds: Sequence[CheckResult], kernels: Sequence[KernelABI], *, same_kernel_only: bool = False
) -> Iterator[CheckResult]:
    """For every build that produced modules, their abi verdict on every kernel
    (or, with *same_kernel_only*, on the kernel they were built for)."""
    identities = {k.release: kernel_abi_identity(k) for k in kernels}
    for build in builds:
        if build.outcome is not Outcome.PASS or not build.artifacts:
            continue
        binaries = [read_module_file(Path(a)) for a in build.artifacts]
        for kernel in kernels:
            if same_kernel_only and kernel.release != build.kernel:
                continue
            yield group_abi_result(
                build.module, build.module_version, binaries, kernel,
                kernel_identity=identities[kernel.release], seed=build.fingerprint,
                details={"built_for": build.kernel},
            )
