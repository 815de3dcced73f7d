"""Kernel references: the strings a person types to name a kernel build.

* ``debian:<release>``: the release's linux-headers package through apt;
* a ``Module.symvers`` file (also ``symvers-<release>.gz`` as RPM kernels ship it);
* an unpacked headers tree, ``/lib/modules/<release>/build``, ``/lib/modules/<release>``,
  or any directory holding exactly one such tree (an unpacked .deb/.rpm);
* a ``linux-headers-*.deb``; an RPM ``kernel-devel`` or kernel package.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from kmodgate.abi.compression import decompress
from kmodgate.abi.kconfig import (
    MACHINE_OF_ARCH,
    VERMAGIC_EXACT_ARCHES,
    derive_vermagic,
    is_enabled,
    parse_config,
)
from kmodgate.abi.model import KernelABI
from kmodgate.abi.symvers import parse_symvers
from kmodgate.errors import UserError
from kmodgate.lines import kernel_line
from kmodgate.sources import debian, rpm
from kmodgate.sources.files import path_kind, read_file

DEBIAN_PREFIX = "debian:"
DEBIAN_LINE_PREFIX = "debian-line:"
_UTS_RELEASE_RE = re.compile(r'#define\s+UTS_RELEASE\s+"([^"]+)"')
_ARCH_RE = re.compile(r"^\s*(?:override\s+)?(?:SRC)?ARCH\s*[:?]?=\s*(\S+)", re.MULTILINE)


def expand_kernel_refs(refs: Iterable[str]) -> list[str]:
    """Each ``debian-line:<series>/<flavour>`` (e.g. ``debian-line:6.1/amd64``) becomes
    every release of that line the archive offers, oldest first; others stay."""
    out: list[str] = []
    for ref in refs:
        if not ref.startswith(DEBIAN_LINE_PREFIX):
            out.append(ref)
            continue
        line = ref[len(DEBIAN_LINE_PREFIX):]
        flavour = line.partition("/")[2]
        releases = [r for r in debian.available_kernel_releases(flavour or None)
                    if kernel_line(r) == line]
        if not releases:
            raise UserError(f"no kernel of line {line!r} in the host's apt sources "
                            "(see `kmodgate kernels --available`)", where=ref)
        out.extend(DEBIAN_PREFIX + r for r in releases)
    return out


def load_kernel(ref: str) -> KernelABI:
    """Resolve a kernel reference; UserError if it names nothing kmodgate can read."""
    if ref.startswith(DEBIAN_PREFIX):
        release = ref[len(DEBIAN_PREFIX):]
        kernel = kernel_from_directory(debian.fetch_headers(release), origin=ref)
        kernel.origin = ref
        return kernel
    path = Path(ref)
    kind = path_kind(ref, "a kernel reference")
    if kind == "dir":
        return kernel_from_directory(path, origin=ref)
    if kind is None:
        raise UserError(
            "no such file or directory, and not a known reference "
            "(debian:<release>, a Module.symvers, a headers tree, a .deb or .rpm)",
            where=ref,
        )
    if path.suffix == ".deb":
        return kernel_from_directory(debian.unpack(path), origin=ref)
    if path.suffix == ".rpm":
        return rpm.kernel_from_rpm(path)
    return kernel_from_symvers_file(path)


def kernel_from_symvers_file(path: Path, release: str | None = None) -> KernelABI:
    text = decompress(read_file(path), str(path)).decode("utf-8", "replace")
    exports = parse_symvers(text, str(path))
    if release is None:
        m = re.match(r"symvers-(.+?)(?:\.gz|\.xz|\.zst)?$", path.name)
        release = m.group(1) if m else "unknown"
    return KernelABI(release=release, exports=exports, origin=str(path))


def find_build_tree(root: Path) -> Path:
    """The one headers tree (a directory holding Module.symvers) under *root*."""
    for candidate in (root, root / "build"):
        if (candidate / "Module.symvers").is_file():
            return candidate
    # Packages ship the tree under usr/src and point lib/modules/<release>/build
    # at it; only when usr/src has none is the build link itself the tree.
    found: list[Path] = []
    for patterns in (
        ("usr/src/*/Module.symvers", "usr/src/kernels/*/Module.symvers"),
        ("lib/modules/*/build/Module.symvers",),
    ):
        found = sorted({p.parent for pattern in patterns for p in root.glob(pattern)})
        if found:
            break
    if not found:
        raise UserError("no kernel build tree here (no Module.symvers found)", where=root)
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise UserError(f"several kernel build trees here ({names}); name one", where=root)
    return found[0]


def kernel_from_directory(root: Path, origin: str) -> KernelABI:
    tree = find_build_tree(root)
    kernel = kernel_from_symvers_file(tree / "Module.symvers", release=tree_release(tree))
    kernel.origin = origin
    config_path = tree / ".config"
    if config_path.is_file():
        config = parse_config(read_file(config_path).decode("utf-8", "replace"))
        apply_config(kernel, config, arch=tree_arch(tree))
    return kernel


def apply_config(kernel: KernelABI, config: dict[str, str], arch: str | None) -> None:
    """Fill in what the loader's checks take from .config."""
    kernel.config = config
    kernel.modversions = is_enabled(config, "CONFIG_MODVERSIONS")
    kernel.force_load = is_enabled(config, "CONFIG_MODULE_FORCE_LOAD")
    kernel.cc_version_text = config.get("CONFIG_CC_VERSION_TEXT")
    if arch is None and config.get("CONFIG_X86_64") == "y":
        arch = "x86_64"
    kernel.machine = MACHINE_OF_ARCH.get(arch or "", arch)
    if kernel.machine in VERMAGIC_EXACT_ARCHES and kernel.release != "unknown":
        kernel.vermagic = derive_vermagic(kernel.release, config)


def tree_release(tree: Path) -> str:
    """The kernel release (uname -r) the tree builds for.

    utsrelease.h comes first: Debian's include/config/kernel.release holds the
    upstream version ("6.1.192"), not the package release ("6.1.0-56-amd64").
    """
    uts = tree / "include/generated/utsrelease.h"
    if uts.is_file():
        m = _UTS_RELEASE_RE.search(uts.read_text(errors="replace"))
        if m:
            return m.group(1)
    for name in ("include/config/kernel.release",):
        p = tree / name
        if p.is_file():
            return p.read_text(errors="replace").strip()
    if tree.name.startswith("linux-headers-"):
        return tree.name[len("linux-headers-"):]
    return tree.name


def tree_arch(tree: Path) -> str | None:
    for name in (".kernelvariables", "Makefile"):
        p = tree / name
        if p.is_file():
            m = _ARCH_RE.search(p.read_text(errors="replace"))
            if m and not m.group(1).startswith("$"):
                return m.group(1)
    return None
