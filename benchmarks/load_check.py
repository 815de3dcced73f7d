#!/usr/bin/env python3
"""The load check's wall time: one kernel, twelve modules, boot to power-off.

Boots the newest 6.1 amd64 kernel the archive offers with twelve of its own
in-tree modules (plus the in-tree modules they depend on) and prints, per
run: the accelerator and why, seconds to /init, seconds to power-off.  The
target (issue 7): under 10 s of wall time under TCG on a 2-core machine.

Then, for comparison, the same initramfs booted from the compressed vmlinuz
(what the kernel package ships) instead of the extracted vmlinux, two
kernels (6.1 and 6.12) booted in parallel, and the agreement of the abi check
with the kernel's verdicts on every cell booted here.

Run: .venv/bin/python benchmarks/load_check.py [--runs N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kmodgate.abi.compare import check_module
from kmodgate.boot import initramfs
from kmodgate.boot.kernel_image import KernelImage, boot_kernel, load_kernel_image
from kmodgate.boot.loadcheck import (
    KERNEL_CMDLINE,
    ModuleUnderTest,
    agreement,
    load_order,
    run_load_checks,
    run_load_matrix,
)
from kmodgate.boot.qemu import boot_command, choose_accelerator, run_qemu
from kmodgate.results import CheckResult, abi_result
from kmodgate.sources import debian
from kmodgate.sources.kernels import load_kernel
from kmodgate.sources.modules import read_module_file

# In-tree modules that load in a bare VM; bonding and vxlan bring dependencies.
MODULES = ("crc7", "crc8", "crc_itu_t", "ts_bm", "ts_kmp", "ts_fsm", "dummy", "veth",
           "ifb", "nlmon", "bonding", "vxlan")


def newest(series: str) -> str:
    found = [r for r in debian.available_kernel_releases("amd64")
             if r.startswith(series) and "-rt-" not in r and "-cloud-" not in r]
    if not found:
        raise SystemExit(f"the archive offers no {series} amd64 kernel")
    return found[-1]


def module_paths(image: KernelImage) -> list[Path]:
    return [image.module_files[name] for name in MODULES if name in image.module_files]


def boot_from(image: KernelImage, kernel_file: Path, paths: list[Path]) -> float:
    """Wall seconds of one boot of *paths* from *kernel_file*, to power-off."""
    accel = choose_accelerator()
    tests = [ModuleUnderTest(p, read_module_file(p)) for p in paths]
    steps = load_order(tests, image)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = initramfs.write_initramfs(steps, initramfs.busybox_binary(),
                                           Path(tmp) / "initramfs.cpio")
        run = run_qemu(boot_command(accel, kernel_file, initrd, KERNEL_CMDLINE), accel,
                       timeout=300, done=lambda text: initramfs.MARK_DONE in text)
    if not run.finished:
        raise SystemExit(f"boot from {kernel_file} did not finish: {run.console[-500:]}")
    return run.duration_seconds


def summarize(results: list[CheckResult]) -> str:
    outcomes = sorted({r.outcome.value for r in results})
    counts = ", ".join(f"{sum(r.outcome.value == o for r in results)} {o}" for o in outcomes)
    return f"{len(results)} modules: {counts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    release = newest("6.1.")
    start = time.perf_counter()
    image = load_kernel_image(f"debian:{release}")
    paths = module_paths(image)
    print(f"kernel {release}: resolved through apt in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    accel = choose_accelerator()
    print(f"accelerator: {accel.name} ({accel.reason}); chosen in "
          f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    kernel_file = boot_kernel(image.vmlinuz)
    print(f"boot kernel: {kernel_file.name} ready in {time.perf_counter() - start:.1f} s "
          "(extracted once, then cached)")

    deps = {s.name for s in load_order(
        [ModuleUnderTest(p, read_module_file(p)) for p in paths], image) if not s.under_test}
    print(f"{len(paths)} modules under test, {len(deps)} in-tree dependencies loaded first "
          f"({', '.join(sorted(deps))})")
    walls: list[float] = []
    results: list[CheckResult] = []
    for n in range(args.runs):
        start = time.perf_counter()
        results = run_load_checks(f"debian:{release}", paths)
        wall = time.perf_counter() - start
        walls.append(wall)
        first = results[0].details
        print(f"run {n + 1}: {summarize(results)}; /init after {first['seconds_to_init']:.2f} s, "
              f"power-off after {first['boot_seconds']:.2f} s; run_load_checks {wall:.2f} s wall")
    best = min(walls)
    verdict = "within" if best < 10 else "OVER"
    print(f"best of {args.runs}: {best:.2f} s wall for {len(paths)} modules on one kernel "
          f"under {accel.name.upper()} ({verdict} the 10 s target)")

    vmlinuz_wall = boot_from(image, image.vmlinuz, paths)
    vmlinux_wall = boot_from(image, kernel_file, paths)
    print(f"same boot from the compressed vmlinuz: {vmlinuz_wall:.2f} s; from the extracted "
          f"vmlinux: {vmlinux_wall:.2f} s ({vmlinuz_wall / vmlinux_wall:.1f}x)")

    other = newest("6.12.")
    other_paths = module_paths(load_kernel_image(f"debian:{other}"))
    start = time.perf_counter()
    # Both kernels, both module sets: two boots per kernel (the names repeat), kernels
    # in parallel.
    matrix = run_load_matrix([f"debian:{release}", f"debian:{other}"], paths + other_paths)
    print(f"{release} and {other} in parallel, {len(paths + other_paths)} modules each: "
          f"{time.perf_counter() - start:.2f} s wall, {summarize(matrix)}")

    abi: list[CheckResult] = []
    for rel in (release, other):
        kernel = load_kernel(f"debian:{rel}")
        abi += [abi_result(check_module(read_module_file(p), kernel))
                for p in paths + other_paths]
    for line in agreement(abi, matrix).summary_lines():
        print(line)


if __name__ == "__main__":
    main()
