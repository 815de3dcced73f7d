"""A bootable kernel: its image (vmlinuz) and its modules directory.

Kernel references accepted for the load check:

* ``debian:<release>``: the release's ``linux-image-<release>`` package
  (``-unsigned`` when that is what the archive has) through apt;
* a ``.deb`` of a linux-image package, or an RPM kernel package
  (``kernel-core``-style: ``lib/modules/<release>/vmlinuz`` beside the modules);
* a directory: an unpacked package root (``boot/vmlinuz-<release>`` and
  ``lib/modules/<release>``), a ``lib/modules/<release>`` directory holding a
  ``vmlinuz`` (as Fedora installs it), or any directory holding a
  ``vmlinuz*`` file and a modules tree below it.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from kmodgate.abi.model import module_name_from_path
from kmodgate.cache import atomic_write_bytes, cache_subdir
from kmodgate.errors import UserError
from kmodgate.sources import debian, rpm
from kmodgate.sources.kernels import DEBIAN_PREFIX
from kmodgate.sources.modules import is_module_file


@dataclass(frozen=True)
class KernelImage:
    ref: str  # as the person named it
    release: str
    vmlinuz: Path
    modules_dir: Path  # lib/modules/<release>, or wherever the modules are

    @functools.cached_property
    def module_files(self) -> dict[str, Path]:
        """The kernel's own modules by the loader's name for them."""
        found: dict[str, Path] = {}
        for dirpath, _dirs, files in os.walk(self.modules_dir):
            for f in sorted(files):
                if is_module_file(f):
                    found.setdefault(module_name_from_path(f), Path(dirpath) / f)
        return found

    @property
    def config_path(self) -> Path | None:
        """The kernel's .config, where the package ships one."""
        for candidate in (
            self.vmlinuz.parent / f"config-{self.release}",
            self.modules_dir / "config",
            self.modules_dir / "build/.config",
        ):
            if candidate.is_file():
                return candidate
        return None


def load_kernel_image(ref: str) -> KernelImage:
    """Resolve *ref* to a bootable kernel; UserError if it names none."""
    if ref.startswith(DEBIAN_PREFIX):
        return _debian_image(ref)
    path = Path(ref)
    if not path.exists():
        raise UserError(
            "no such file or directory, and not a known kernel reference "
            "(debian:<release>, a linux-image .deb, a kernel RPM, or a directory with a "
            "vmlinuz and its modules)",
            where=ref,
        )
    if path.is_dir():
        return image_from_root(path, ref)
    if path.suffix == ".deb":
        return image_from_root(debian.unpack(path), ref)
    if path.suffix == ".rpm":
        return image_from_root(rpm.unpack(rpm.read_package(path)), ref)
    raise UserError("not a kernel image reference: expected a directory, .deb or .rpm",
                    where=ref)


@functools.lru_cache(maxsize=64)
def _debian_image(ref: str) -> KernelImage:
    """Asked once per process: apt's answer does not change within a run, and
    each question costs seconds on a busy machine."""
    return image_from_root(debian.fetch_image(ref[len(DEBIAN_PREFIX):]), ref)


def image_from_root(root: Path, ref: str) -> KernelImage:
    """The one kernel below *root*, found by the layouts packages use."""
    # A package root: boot/vmlinuz-<release> with lib/modules/<release>.
    for base in (root / "boot", root):
        for vmlinuz in sorted(base.glob("vmlinuz-*")):
            release = vmlinuz.name[len("vmlinuz-"):]
            for mods in (root / "lib/modules" / release, root / "usr/lib/modules" / release):
                if mods.is_dir():
                    return KernelImage(ref, release, vmlinuz, mods)
    # Fedora/RPM: lib/modules/<release>/vmlinuz, or root is that directory.
    candidates = [root, *sorted(root.glob("lib/modules/*")),
                  *sorted(root.glob("usr/lib/modules/*"))]
    for mods in candidates:
        if (mods / "vmlinuz").is_file():
            return KernelImage(ref, mods.name, mods / "vmlinuz", mods)
    # A bare directory: one vmlinuz* file and modules somewhere below.
    images = sorted(p for p in root.glob("vmlinuz*") if p.is_file())
    if len(images) == 1:
        release = images[0].name.removeprefix("vmlinuz").lstrip("-") or root.name
        return KernelImage(ref, release, images[0], root)
    raise UserError(
        "no kernel image found: expected boot/vmlinuz-<release> with lib/modules/<release>, "
        "lib/modules/<release>/vmlinuz, or one vmlinuz file beside the modules",
        where=ref,
    )


# The x86 boot protocol (Documentation/arch/x86/boot.rst): "HdrS" at 0x202,
# the protocol version at 0x206, setup_sects at 0x1f1, and from version 2.08
# payload_offset/payload_length at 0x248, locating the compressed vmlinux
# inside the protected-mode part.
_HDRS_OFFSET = 0x202
_PAYLOAD_FIELDS = 0x248
_MIN_PAYLOAD_PROTOCOL = 0x0208
_PT_NOTE = 4
# XEN_ELFNOTE_PHYS32_ENTRY (include/xen/interface/elfnote.h): the 32-bit
# entry point that QEMU's -kernel uses to boot an ELF vmlinux directly (PVH).
_XEN_ELFNOTE_PHYS32_ENTRY = 18

# Bump when extraction changes, so cached kernels are made again.
_EXTRACT_VERSION = 1


def boot_kernel(vmlinuz: Path) -> Path:
    """The file to hand QEMU's -kernel: the uncompressed ELF vmlinux when the
    kernel can boot from it through PVH (CONFIG_PVH), else *vmlinuz* itself.

    Why: under TCG the kernel's own decompressor is emulated instruction by
    instruction.  For Debian's xz-compressed 6.1 kernels that is two thirds of
    the boot (measured: 20.6 s to power-off from vmlinuz, 6.3 s from the
    extracted vmlinux); the host decompresses it in about 2 s, once, cached.
    QEMU boots an ELF vmlinux through its PVH entry since QEMU 4.0; the entry
    point dates from Linux commit 7243b93345f7 ("xen/pvh: Bootstrap PVH
    guest") (v4.11).  A kernel without it boots from *vmlinuz* as before.
    """
    data = _read(vmlinuz)
    digest = hashlib.sha256(data).hexdigest()[:24]
    cache = cache_subdir("vmlinux")
    target = cache / f"{digest}-{_EXTRACT_VERSION}.elf"
    unusable = cache / f"{digest}-{_EXTRACT_VERSION}.none"
    if target.is_file():
        return target
    if unusable.exists():
        return vmlinuz
    elf = extract_vmlinux(data)
    if elf is None or not has_pvh_entry(elf):
        atomic_write_bytes(unusable, b"")
        return vmlinuz
    atomic_write_bytes(target, elf)
    return target


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage, or None if it cannot be found or read."""
    if len(bzimage) < 0x250 or bzimage[_HDRS_OFFSET:_HDRS_OFFSET + 4] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < _MIN_PAYLOAD_PROTOCOL:
        return None
    setup_sects = bzimage[0x1F1] or 4  # 0 means 4, for very old kernels
    offset, length = struct.unpack_from("<II", bzimage, _PAYLOAD_FIELDS)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    # The payload ends with its uncompressed size (4 bytes): each decompressor
    # below stops at the end of its stream and leaves that trailer unread.
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x28\xb5\x2f\xfd"):
            out = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            out = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16).decompress(payload)
        else:
            return None  # lz4, lzo, bzip2, lzma: leave them to the kernel
    except (lzma.LZMAError, zstandard.ZstdError, zlib.error):
        return None
    return out if out.startswith(b"\x7fELF") else None


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF carries a Xen PHYS32_ENTRY note."""
    if len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != _PT_NOTE:
            continue
        off, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        pos, end = off, min(off + size, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the kernel image: {exc.strerror}", where=path) from None
