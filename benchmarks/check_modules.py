#!/usr/bin/env python3
"""The abi check of a whole kernel image against one kernel.

Checks every module of the newest 6.1 image against its own kernel and
against the oldest 6.1 kernel the archive offers, and prints the time per
kernel and per module (the floor the issue names: 4,000 modules under 1 s).
Run: .venv/bin/python benchmarks/check_modules.py
"""

from __future__ import annotations

import time

from kmodgate.abi.compare import Outcome, check_module
from kmodgate.sources import debian
from kmodgate.sources.kernels import load_kernel
from kmodgate.sources.modules import load_module_ref


def main() -> None:
    releases = [r for r in debian.available_kernel_releases("amd64")
                if r.startswith("6.1.") and "-rt-" not in r and "-cloud-" not in r]
    newest, oldest = releases[-1], releases[0]
    modules = load_module_ref(f"debian-image:{newest}")
    for release in (newest, oldest):
        kernel = load_kernel(f"debian:{release}")
        start = time.perf_counter()
        verdicts = [check_module(m, kernel) for m in modules]
        elapsed = time.perf_counter() - start
        passed = sum(v.outcome is Outcome.PASS for v in verdicts)
        reasons = sum(len(v.reasons) for v in verdicts)
        print(f"{len(modules)} modules of {newest} on {release}: {elapsed:.3f} s "
              f"({elapsed / len(modules) * 1e6:.0f} us/module), {passed} pass, "
              f"{reasons} reasons")


if __name__ == "__main__":
    main()
