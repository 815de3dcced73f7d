#!/usr/bin/env python3
"""Reading every module of a real kernel image: kmodgate against kmod.

Prints, for the newest 6.1 image (uncompressed .ko) and the newest 6.12 image
(.ko.xz) the archive offers:
  * `modprobe --dump-modversions FILE` run once per module (the reference tool);
  * kmodgate's first read (every file parsed, both cores), and the ratio;
  * pure xz decompression of the same files (one core and both cores), and the
    ratio of kmodgate's read to it;
  * kmodgate's repeated read on unchanged files (content-keyed index), and the
    ratio to the modprobe loop.
Run: .venv/bin/python benchmarks/read_modules.py
"""

from __future__ import annotations

import lzma
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kmodgate.sources import debian
from kmodgate.sources.modules import find_module_files, read_module_tree


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def modprobe_loop(files: list[str]) -> None:
    for f in files:
        subprocess.run(["modprobe", "--dump-modversions", f], stdout=subprocess.DEVNULL,
                       check=True)


def _decompress(paths: list[str]) -> int:
    return sum(len(lzma.decompress(Path(p).read_bytes())) for p in paths)


def xz_decompress(files: list[str], workers: int) -> None:
    if workers == 1:
        _decompress(files)
        return
    chunks = [files[i::workers * 4] for i in range(workers * 4)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decompress, chunks))


def newest(series: str) -> str:
    releases = [r for r in debian.available_kernel_releases("amd64")
                if r.startswith(series) and "-rt-" not in r and "-cloud-" not in r]
    if not releases:
        sys.exit(f"the archive offers no {series} amd64 kernel")
    return releases[-1]


def bench_image(release: str) -> None:
    root = debian.fetch_image(release) / "lib/modules"
    files = find_module_files(root)
    cores = os.cpu_count() or 1
    print(f"\n{release}: {len(files)} modules ({files[0].rsplit('.', 1)[-1]} files), {cores} cores")
    t_modprobe = timed(lambda: modprobe_loop(files))
    print(f"  modprobe --dump-modversions, one call per module: {t_modprobe:7.2f} s")
    t_cold = min(timed(lambda: read_module_tree(root, index=False)) for _ in range(2))
    print(f"  kmodgate first read (all files parsed):          {t_cold:7.2f} s"
          f"   {t_modprobe / t_cold:6.1f}x faster than modprobe")
    if files[0].endswith(".xz"):
        t_xz1 = timed(lambda: xz_decompress(files, 1))
        t_xz = timed(lambda: xz_decompress(files, cores))
        print(f"  pure xz decompression, 1 core:                   {t_xz1:7.2f} s")
        print(f"  pure xz decompression, {cores} cores:                  {t_xz:7.2f} s"
              f"   kmodgate takes {t_cold / t_xz:4.2f}x of it")
    read_module_tree(root)  # fill the index
    t_warm = min(timed(lambda: read_module_tree(root)) for _ in range(3))
    print(f"  kmodgate repeated read (unchanged files):        {t_warm:7.2f} s"
          f"   {t_modprobe / t_warm:6.1f}x faster than modprobe")


def main() -> None:
    for release in (newest("6.1."), newest("6.12.")):
        bench_image(release)


if __name__ == "__main__":
    main()
