"""The initramfs a load check boots: busybox, the modules, and an /init that
insmods them one by one and reports each result on the serial console.

The archive is a newc cpio written here (a few dozen lines; no cpio(1) and no
root needed for the /dev/console node).  It is left uncompressed: it is a few
megabytes, the kernel unpacks it faster than it could decompress it, and QEMU
hands it over in memory.

The console protocol, one line each, ``<i>`` the step's index in load order:

* ``KMODGATE-BOOTED <uname -r>``: /init started;
* ``KMODGATE-START <i> <name>``: insmod of step i begins;
* ``KMODGATE-ERR <i> <line>``: what insmod printed on stderr;
* ``KMODGATE-KLOG <i> <line>``: what the kernel logged while loading it (dmesg -c);
* ``KMODGATE-RESULT <i> <name> <rc>``: insmod's exit status;
* ``KMODGATE-OOPS <i> <tainted>``: the kernel died in that step ('D' taint): /init
  powers off at once, since nothing after an oops can be trusted;
* ``KMODGATE-DONE``: every step ran; power-off follows.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kmodgate.abi.compression import decompress
from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import InfraError, KmodgateError
from kmodgate.sources import debian

BUSYBOX_PACKAGE = "busybox-static"

MARK_BOOTED = "KMODGATE-BOOTED"
MARK_START = "KMODGATE-START"
MARK_ERR = "KMODGATE-ERR"
MARK_KLOG = "KMODGATE-KLOG"
MARK_RESULT = "KMODGATE-RESULT"
MARK_OOPS = "KMODGATE-OOPS"
MARK_DONE = "KMODGATE-DONE"

# TAINT_DIE ('D', bit 7 of /proc/sys/kernel/tainted): set by oops_end() when
# the kernel killed a task because of an oops.
TAINT_DIE = 1 << 7


@dataclass(frozen=True, slots=True)
class LoadStep:
    """One insmod of the boot: a module under test or an in-tree dependency."""

    name: str  # the loader's name for it
    source: Path  # the module file on the host (.ko, .ko.xz, ...)
    under_test: bool


@dataclass(frozen=True, slots=True)
class CpioEntry:
    path: str  # inside the archive, without a leading '/'
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """*entries* as a newc ("070701") cpio archive, as the kernel's initramfs
    unpacker (init/initramfs.c) reads it: ASCII-hex headers, names and data
    padded to four bytes, a ``TRAILER!!!`` entry at the end."""
    out = bytearray()
    ino = 1
    for entry in [*entries, CpioEntry("TRAILER!!!", 0)]:
        name = entry.path.encode() + b"\0"
        is_trailer = entry.path == "TRAILER!!!"
        fields = (
            0 if is_trailer else ino,
            entry.mode,
            0, 0,  # uid, gid: root
            2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
            0,  # mtime: fixed, so equal inputs give equal archives
            len(entry.data),
            0, 0,  # devmajor, devminor of the archive's filesystem
            entry.rdev[0], entry.rdev[1],
            len(name),
            0,  # check: unused by newc
        )
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        out += b"\0" * (-len(out) % 4)
        out += entry.data
        out += b"\0" * (-len(out) % 4)
        ino += 1
    return bytes(out)


def busybox_binary() -> Path:
    """A statically linked busybox: from the Debian package ``busybox-static``
    through apt (cached), else an installed one that needs no dynamic loader.

    The choice is remembered in the cache: asking apt costs seconds on a busy
    machine, and any busybox release serves /init equally well.
    """
    remembered = cache_subdir("boot") / "busybox-path"
    try:
        path = Path(remembered.read_text().strip())
        if path.is_file():
            return path
    except OSError:
        pass
    found = _find_busybox()
    atomic_write_bytes(remembered, str(found).encode())
    return found


def _find_busybox() -> Path:
    try:
        root = debian.unpack(debian.download(BUSYBOX_PACKAGE))
        candidate = root / "bin/busybox"
        if candidate.is_file():
            return candidate
    except KmodgateError:
        pass  # offline, or the archive lacks it: try the installed one below
    installed = shutil.which("busybox")
    if installed and is_static_elf(Path(installed)):
        return Path(installed)
    raise InfraError(
        f"no statically linked busybox: install the Debian package {BUSYBOX_PACKAGE} "
        "or let apt download it"
    )


def is_static_elf(path: Path) -> bool:
    """True when *path* is an ELF file without a PT_INTERP program header."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False  # only 64-bit little-endian, the hosts kmodgate boots on
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        p_type = int.from_bytes(data[phoff + i * phentsize: phoff + i * phentsize + 4], "little")
        if p_type == 3:  # PT_INTERP
            return False
    return True


def module_file_name(index: int, step: LoadStep) -> str:
    """Where step *index* lives in the initramfs: indexed, so two modules of the
    same name (e.g. one built for each of two ABIs) never collide."""
    return f"m/{index:03d}-{step.name}.ko"


def init_script(steps: Sequence[LoadStep]) -> str:
    """The /init shell script for *steps*, in order."""
    lines = [
        "#!/bin/busybox sh",
        "bb=/bin/busybox",
        "$bb mount -t proc proc /proc",
        "$bb mount -t sysfs sysfs /sys",
        "$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null",
        # Boot messages are not wanted on the slow emulated serial line, only
        # what each insmod provokes: drop them unread.
        "$bb dmesg -c >/dev/null",
        f'echo "{MARK_BOOTED} $($bb uname -r)"',
        "step() {",
        # $1 index, $2 name, $3 file
        f'  echo "{MARK_START} $1 $2"',
        '  $bb insmod "$3" 2>/tmp/err',
        "  rc=$?",
        f'  $bb sed "s/^/{MARK_ERR} $1 /" /tmp/err',
        f'  $bb dmesg -c | $bb sed "s/^/{MARK_KLOG} $1 /"',
        f'  echo "{MARK_RESULT} $1 $2 $rc"',
        "  t=$($bb cat /proc/sys/kernel/tainted)",
        f"  if [ $((t & {TAINT_DIE})) -ne 0 ]; then",
        f'    echo "{MARK_OOPS} $1 $t"',
        "    $bb poweroff -f",
        "  fi",
        "}",
    ]
    for i, s in enumerate(steps):
        lines.append(f"step {i} {s.name} /{module_file_name(i, s)}")
    lines += [f'echo "{MARK_DONE}"', "$bb poweroff -f", ""]
    return "\n".join(lines)


def build_initramfs(steps: Sequence[LoadStep], busybox: Path) -> bytes:
    """The initramfs image (uncompressed newc) that loads *steps* in order.

    Modules are stored decompressed: the kernel takes compressed modules
    only through finit_module(2) and only with CONFIG_MODULE_DECOMPRESS
    (Debian's 6.12 has it, its 6.1 does not), Linux commit b1ae6dc41eaa
    ("module: add in-kernel support for decompressing") (v5.17), and busybox
    insmod falls back to init_module(2), which never decompresses.
    Decompressing here works for every kernel.
    """
    entries = [
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        # The kernel opens /dev/console for init before anything is mounted.
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("proc", stat.S_IFDIR | 0o755),
        CpioEntry("sys", stat.S_IFDIR | 0o755),
        CpioEntry("tmp", stat.S_IFDIR | 0o1777),
        CpioEntry("m", stat.S_IFDIR | 0o755),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, _read(busybox)),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("init", stat.S_IFREG | 0o755, init_script(steps).encode()),
    ]
    for i, s in enumerate(steps):
        data = decompress(_read(s.source), str(s.source))
        entries.append(CpioEntry(module_file_name(i, s), stat.S_IFREG | 0o644, data))
    return newc_archive(entries)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InfraError(f"cannot read {path}: {exc.strerror or exc}") from None


def write_initramfs(steps: Sequence[LoadStep], busybox: Path, target: Path) -> Path:
    target.write_bytes(build_initramfs(steps, busybox))
    os.chmod(target, 0o644)
    return target
