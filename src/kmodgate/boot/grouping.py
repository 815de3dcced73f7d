"""Load results per module *package*: a DKMS package builds several .ko files,
and the gate asks whether the package loads, so the per-file results of one
boot are folded into one result per (build, kernel)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from kmodgate.abi.compare import Outcome
from kmodgate.boot.loadcheck import DEFAULT_BOOT_TIMEOUT, run_load_checks
from kmodgate.results import CheckResult

# The outcome of a package: its worst file.
_SEVERITY = {Outcome.PASS: 0, Outcome.SKIP: 1, Outcome.FAIL: 2, Outcome.ERROR: 3}


def load_builds(kernel_ref: str, builds: Sequence[CheckResult],
                *, timeout: float = DEFAULT_BOOT_TIMEOUT) -> list[CheckResult]:
    """Boot *kernel_ref* once with the binaries of every passing build made for it
    and return one load result per build."""
    loadable = [b for b in builds if b.outcome is Outcome.PASS and b.artifacts]
    if not loadable:
        return []
    paths = [Path(a) for b in loadable for a in b.artifacts]
    per_file = run_load_checks(kernel_ref, paths, timeout=timeout)
    by_path = {os.path.realpath(str(r.details.get("module_path", ""))): r for r in per_file}
    out = []
    for build in loadable:
        files = [by_path[os.path.realpath(a)] for a in build.artifacts
                 if os.path.realpath(a) in by_path]
        worst = max((f.outcome for f in files), key=_SEVERITY.__getitem__,
                    default=Outcome.ERROR)
        seed = "\0".join(sorted(f.fingerprint for f in files))
        out.append(CheckResult(
            module=build.module,
            module_version=build.module_version,
            kernel=build.kernel,
            kind="load",
            outcome=worst,
            reasons=[{**r, "binary": f.module} for f in files for r in f.reasons]
            or ([] if files else [{"code": "vm_error",
                                   "message": "the boot produced no result for these modules"}]),
            fingerprint=hashlib.sha256(f"load\0{build.fingerprint}\0{seed}".encode()).hexdigest(),
            reproducer=files[0].reproducer if files else "",
            log_path=files[0].log_path if files else None,
            artifacts=list(build.artifacts),
            details={"built_for": build.kernel,
                     "binaries": {f.module: f.outcome.value for f in files},
                     "accelerator": files[0].details.get("accelerator") if files else None},
        ))
    return out
