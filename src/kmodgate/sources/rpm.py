"""RPM kernels and kmods: kernel-devel trees, ``kernel(sym)`` Provides, kmod Requires.

Three shapes of package carry kernel ABI facts:

* ``kernel-devel``: a headers tree under ``/usr/src/kernels/<release>`` with
  Module.symvers and .config; it is unpacked into the cache and read like any
  other headers tree;
* ``kernel`` / ``kernel-core``: ``Provides: kernel(sym) = 0xCRC`` for every
  exported symbol, and on RHEL a ``symvers.gz`` in the payload, which also
  says who provides each symbol, how it is exported and in which namespace;
* a kABI-tracking kmod: its ``.ko`` files, or, when only its metadata is at
  hand, ``Requires: kernel(sym) = 0xCRC``, which rpm's kabi dependency
  generator writes from the module's __versions.

Headers are read with rpmfile, and rpmfile decompresses the payload.  The
payload's cpio framing is walked here in one forward pass: rpmfile's
``extractfile`` seeks its decompressed stream back to each member, which for
gzip and xz restarts decompression from the start, quadratic on a
kernel-devel of ~20,000 files.

File names inside a package are whatever its builder wrote, so nothing is
ever written outside the directory it is unpacked into (see ``_Unpacker``).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import rpmfile
import zstandard

from kmodgate.abi.compare import MODULE_LAYOUT
from kmodgate.abi.compression import decompress
from kmodgate.abi.kconfig import parse_config
from kmodgate.abi.model import VMLINUX, Export, ExportType, KernelABI, ModuleInfo
from kmodgate.abi.symvers import parse_symvers
from kmodgate.cache import cache_subdir, staging_dir
from kmodgate.errors import InfraError, UserError

# The 96-byte lead every RPM file starts with (lib/rpmlead.c).
LEAD_MAGIC = b"\xed\xab\xee\xdb"
LEAD_SIZE = 96
LEAD_TYPE_SOURCE = 1

# Dependency sense flags (include/rpm/rpmds.h); only the comparison bits matter here.
RPMSENSE_LESS = 1 << 1
RPMSENSE_GREATER = 1 << 2
RPMSENSE_EQUAL = 1 << 3
RPMSENSE_COMPARE = RPMSENSE_LESS | RPMSENSE_GREATER | RPMSENSE_EQUAL
# A %ghost file is listed in the header but has no data in the payload (rpmfiles.h).
RPMFILE_GHOST = 1 << 6

# RPMTAG_PAYLOADDIGESTALGO values (PGPHASHALGO_*, include/rpm/rpmpgp.h).
DIGEST_ALGOS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
# Payload compressors rpmfile can undo (rpmfile.RPMFile.data_file).
PAYLOAD_COMPRESSORS = frozenset({"gzip", "bzip2", "xz", "zstd"})

# ELF machine names of kmodgate's elf reader, by RPM architecture.  An
# architecture not listed keeps its RPM name, and then matches nothing.
MACHINE_OF_RPM_ARCH = {
    "x86_64": "x86_64",
    "i386": "i386",
    "i486": "i386",
    "i586": "i386",
    "i686": "i386",
    "aarch64": "aarch64",
    "armv7hl": "arm",
    "ppc64le": "ppc64",
    "ppc64": "ppc64",
    "s390x": "s390",
    "riscv64": "riscv",
    "loongarch64": "loongarch",
}

# ``kernel(sym) = 0xCRC``.  The same name space also holds ``kernel(x86-64) =
# <version>`` (the package's arch-qualified self-provide), which the CRC
# pattern keeps out.
_ABI_DEP_RE = re.compile(r"^kernel\((.+)\)$")
_CRC_RE = re.compile(r"^0x[0-9a-fA-F]{1,16}$")
UNAME_PROVIDE = "kernel-uname-r"

# Where kernel packages keep their symvers and config: RHEL 8+ ships them in
# /lib/modules/<release>/ (the /boot copies are %ghost files made at install
# time); older ones ship /boot/symvers-<release>.gz and /boot/config-<release>.
_MODULES_DIR_RE = re.compile(r"^(?:usr/)?lib/modules/([^/]+)/")
_SYMVERS_RES = (
    re.compile(r"^boot/symvers-(.+?)(?:\.gz|\.xz|\.zst)?$"),
    re.compile(r"^(?:usr/)?lib/modules/([^/]+)/symvers(?:\.gz|\.xz|\.zst)?$"),
)
_CONFIG_RES = (
    re.compile(r"^boot/config-(.+)$"),
    re.compile(r"^(?:usr/)?lib/modules/([^/]+)/config$"),
)
_DEVEL_SYMVERS_RE = re.compile(r"^usr/src/[^/]+(?:/[^/]+)?/Module\.symvers$")
_MODULE_FILE_RE = re.compile(r"\.ko(?:\.xz|\.zst|\.gz)?$")

# Reading a payload: chunk size for copying member data.
_CHUNK = 1 << 20


class Dependency(NamedTuple):
    """One Provides or Requires entry, as ``rpm -q --provides`` prints it."""

    name: str
    flags: int
    version: str

    def __str__(self) -> str:
        if not self.version:
            return self.name
        op = {
            RPMSENSE_EQUAL: "=",
            RPMSENSE_LESS: "<",
            RPMSENSE_GREATER: ">",
            RPMSENSE_LESS | RPMSENSE_EQUAL: "<=",
            RPMSENSE_GREATER | RPMSENSE_EQUAL: ">=",
        }.get(self.flags & RPMSENSE_COMPARE, "?")
        return f"{self.name} {op} {self.version}"


@dataclass(frozen=True, slots=True)
class Package:
    """What kmodgate reads from an RPM's header."""

    path: Path
    name: str
    version: str
    release: str
    arch: str
    provides: list[Dependency]
    requires: list[Dependency]
    files: list[str]  # payload paths of non-ghost files, relative ("usr/src/...")
    compressor: str
    data_offset: int  # where the compressed payload starts
    payload_digest: tuple[str, str] | None  # (hashlib name, hex digest)

    @property
    def nvra(self) -> str:
        return f"{self.name}-{self.version}-{self.release}.{self.arch}"

    @property
    def machine(self) -> str:
        return MACHINE_OF_RPM_ARCH.get(self.arch, self.arch)


def kernel_from_rpm(path: Path) -> KernelABI:
    """The ABI of a kernel-devel, kernel or kernel-core package."""
    pkg = read_package(path)
    if any(_DEVEL_SYMVERS_RE.match(f) for f in pkg.files):
        return _kernel_from_devel(pkg)
    return _kernel_from_provides(pkg)


def modules_from_rpm(path: Path) -> list[ModuleInfo]:
    """The modules of a kmod package: its .ko files, else its kernel(sym) Requires."""
    # Imported here: sources.modules imports this module at load time.
    from kmodgate.sources.modules import _parse

    pkg = read_package(path)
    if any(_MODULE_FILE_RE.search(f) for f in pkg.files):
        members = read_members(pkg, lambda name: bool(_MODULE_FILE_RE.search(name)))
        modules = [_parse(f"{path}:/{name}", data) for name, data in sorted(members.items())]
        if modules:
            return modules
    versions = abi_dependencies(pkg.requires)
    if versions:
        return [
            ModuleInfo(
                name=pkg.name,
                path=str(path),
                machine=pkg.machine,
                modinfo=[],
                versions=versions,
                exports=[],
                # module_layout is a __versions entry the loader checks on its
                # own (check_modstruct_version), never a symbol it resolves.
                undefined=[s for s in versions if s != MODULE_LAYOUT],
                sha256=_file_digest(path, "sha256"),
                origin_kind="rpm-requires",
            )
        ]
    raise UserError(
        "the package contains no kernel modules (no .ko files, and no "
        "'Requires: kernel(symbol) = 0xCRC' to stand in for them)",
        where=path,
    )


def abi_dependencies(deps: list[Dependency]) -> dict[str, int]:
    """symbol -> CRC of every ``kernel(sym) = 0xCRC`` entry, in header order."""
    out: dict[str, int] = {}
    for dep in deps:
        m = _ABI_DEP_RE.match(dep.name)
        if m is None or dep.flags & RPMSENSE_COMPARE != RPMSENSE_EQUAL:
            continue
        if not _CRC_RE.match(dep.version):
            continue
        # Generators on 64-bit hosts once printed the unsigned long the CRC
        # was stored in; the loader compares the low 32 bits, as elf.py does.
        out.setdefault(m.group(1), int(dep.version, 16) & 0xFFFFFFFF)
    return out


def _kernel_from_devel(pkg: Package) -> KernelABI:
    # Imported here: sources.kernels imports this module at load time.
    from kmodgate.sources.kernels import apply_config, kernel_from_directory

    root = unpack(pkg)
    try:
        kernel = kernel_from_directory(root, origin=str(pkg.path))
    except UserError as exc:
        # Name the package and the file inside it, not the cache directory.
        where = exc.where or ""
        inside = where[len(str(root)):] if where.startswith(str(root)) else ""
        raise UserError(exc.message, where=f"{pkg.path}:{inside}" if inside else pkg.path
                        ) from None
    if kernel.config:
        # The package's architecture is surer than the tree's Makefile guess.
        apply_config(kernel, kernel.config, arch=pkg.machine)
    else:
        kernel.machine = pkg.machine
    return kernel


def _kernel_from_provides(pkg: Package) -> KernelABI:
    from kmodgate.sources.kernels import apply_config

    wanted = {f for f in pkg.files if _match_any(_SYMVERS_RES, f) or _match_any(_CONFIG_RES, f)}
    members = read_members(pkg, wanted.__contains__) if wanted else {}
    release = _kernel_release(pkg)
    symvers = _pick(members, _SYMVERS_RES, release)
    if symvers is not None:
        name, data = symvers
        where = f"{pkg.path}:/{name}"
        text = decompress(data, where).decode("utf-8", "replace")
        exports = parse_symvers(text, where)
    else:
        exports = {
            sym: Export(sym, crc, VMLINUX, ExportType.UNKNOWN)
            for sym, crc in abi_dependencies(pkg.provides).items()
        }
    if not exports:
        raise UserError(
            "the package holds no kernel ABI: no Module.symvers, no symvers file and no "
            "'Provides: kernel(symbol) = 0xCRC' (is it a kernel, kernel-core or "
            "kernel-devel package?)",
            where=pkg.path,
        )
    kernel = KernelABI(release=release, exports=exports, origin=str(pkg.path),
                       machine=pkg.machine)
    config = _pick(members, _CONFIG_RES, release)
    if config is not None:
        apply_config(kernel, parse_config(config[1].decode("utf-8", "replace")),
                     arch=pkg.machine)
    return kernel


def _kernel_release(pkg: Package) -> str:
    """uname -r of the kernel the package installs."""
    for dep in pkg.provides:
        if dep.name == UNAME_PROVIDE and dep.version:
            return dep.version
    releases = {m.group(1) for f in pkg.files if (m := _MODULES_DIR_RE.match(f))}
    if len(releases) == 1:
        return releases.pop()
    return pkg.nvra


def _match_any(patterns: tuple[re.Pattern[str], ...], name: str) -> re.Match[str] | None:
    for pattern in patterns:
        m = pattern.match(name)
        if m:
            return m
    return None


def _pick(
    members: dict[str, bytes], patterns: tuple[re.Pattern[str], ...], release: str
) -> tuple[str, bytes] | None:
    """The member matching *patterns*, preferring the one for *release*."""
    found = sorted((n, d) for n, d in members.items() if _match_any(patterns, n))
    for name, data in found:
        m = _match_any(patterns, name)
        if m is not None and m.group(1) == release:
            return name, data
    return found[0] if found else None


# --- the header -------------------------------------------------------------


def read_package(path: Path) -> Package:
    """The header facts of the RPM at *path*; UserError if it is not a readable RPM."""
    try:
        with path.open("rb") as f:
            lead = f.read(LEAD_SIZE)
            if len(lead) < LEAD_SIZE or not lead.startswith(LEAD_MAGIC):
                raise UserError("not an RPM package (no RPM lead at the start)", where=path)
            if int.from_bytes(lead[6:8], "big") == LEAD_TYPE_SOURCE:
                raise UserError("a source RPM holds no kernel or modules", where=path)
            f.seek(0)
            size = os.fstat(f.fileno()).st_size
            try:
                # Everything rpmfile can raise on bad input: it asserts, raises
                # RPMError, bare Exception or lets struct and index errors through.
                with rpmfile.RPMFile(fileobj=f) as rpm:
                    headers: dict[Any, Any] = dict(rpm.headers)
                    data_offset = int(rpm.data_offset)
            except Exception as exc:
                raise UserError(
                    f"truncated or corrupt RPM header ({type(exc).__name__}: {exc})", where=path
                ) from None
    except FileNotFoundError:
        raise UserError("no such file", where=path) from None
    except IsADirectoryError:
        raise UserError("is a directory, expected an .rpm file", where=path) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=path) from None
    if data_offset > size:
        raise UserError("truncated RPM: the header runs past the end of the file", where=path)
    return _package_from_headers(path, headers, data_offset)


def _package_from_headers(path: Path, headers: dict[Any, Any], data_offset: int) -> Package:
    h = _Headers(path, headers)
    compressor = h.string("archive_compression") or "gzip"
    payload_format = h.string("archive_format") or "cpio"
    if payload_format != "cpio":
        raise UserError(f"unsupported payload format {payload_format!r}", where=path)
    if compressor not in PAYLOAD_COMPRESSORS:
        raise UserError(f"unsupported payload compression {compressor!r}", where=path)
    digest = None
    digests = h.strings("payloaddigest")
    algo = DIGEST_ALGOS.get(next(iter(h.ints("payloaddigestalgo")), 8))
    if digests and algo:
        digest = (algo, digests[0].lower())
    name = h.string("name")
    if not name:
        raise UserError("corrupt RPM header: no package name", where=path)
    return Package(
        path=path,
        name=name,
        version=h.string("version"),
        release=h.string("release"),
        arch=h.string("arch"),
        provides=h.dependencies("provides", "provideflags", "provideversion"),
        requires=h.dependencies("requirename", "requireflags", "requireversion"),
        files=h.files(),
        compressor=compressor,
        data_offset=data_offset,
        payload_digest=digest,
    )


class _Headers:
    """Typed access to rpmfile's header dict, whose values are bytes, lists of
    bytes, ints or tuples of ints depending on the entry's type and count."""

    def __init__(self, path: Path, headers: dict[Any, Any]) -> None:
        self.path = path
        self.headers = headers

    def _bad(self, key: str) -> UserError:
        return UserError(f"corrupt RPM header: unexpected type of {key}", where=self.path)

    def strings(self, key: str) -> list[str]:
        value = self.headers.get(key)
        if value is None:
            return []
        if isinstance(value, bytes):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, bytes) for v in value):
            raise self._bad(key)
        return [v.decode("utf-8", "surrogateescape") for v in value]

    def string(self, key: str) -> str:
        values = self.strings(key)
        return values[0] if values else ""

    def ints(self, key: str) -> list[int]:
        value = self.headers.get(key)
        if value is None:
            return []
        if isinstance(value, int):
            return [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
            raise self._bad(key)
        return list(value)

    def dependencies(self, names_key: str, flags_key: str, versions_key: str) -> list[Dependency]:
        names = self.strings(names_key)
        flags = self.ints(flags_key)
        versions = self.strings(versions_key)
        if not (len(names) == len(flags) == len(versions)):
            raise UserError(
                f"corrupt RPM header: {names_key}, {flags_key} and {versions_key} differ "
                "in length",
                where=self.path,
            )
        return [Dependency(n, f, v) for n, f, v in zip(names, flags, versions, strict=True)]

    def files(self) -> list[str]:
        basenames = self.strings("basenames")
        dirnames = self.strings("dirnames")
        dirindexes = self.ints("dirindexes")
        if basenames:
            if len(dirindexes) != len(basenames) or any(
                not 0 <= i < len(dirnames) for i in dirindexes
            ):
                raise UserError("corrupt RPM header: bad file list", where=self.path)
            full = [dirnames[i] + b for i, b in zip(dirindexes, basenames, strict=True)]
        else:
            full = self.strings("oldfilenames")
        flags = self.ints("fileflags")
        if flags and len(flags) != len(full):
            raise UserError("corrupt RPM header: bad file flags", where=self.path)
        return [
            name.lstrip("/")
            for i, name in enumerate(full)
            if not (flags and flags[i] & RPMFILE_GHOST)
        ]


# --- the payload ------------------------------------------------------------


class _Member(NamedTuple):
    path: str  # normalised, relative, never empty
    mode: int
    ino: int
    nlink: int
    size: int


class _PayloadStream:
    """The decompressed payload; decompression failures become UserErrors."""

    def __init__(self, pkg: Package, raw: IO[bytes]) -> None:
        self.where = pkg.path
        try:
            rpm = rpmfile.RPMFile(fileobj=raw)
            self.stream: IO[bytes] = rpm.data_file
        except Exception as exc:  # rpmfile raises anything; see read_package
            raise self._corrupt(exc) from None

    def _corrupt(self, exc: BaseException) -> UserError:
        return UserError(f"corrupt or truncated payload ({type(exc).__name__}: {exc})",
                         where=self.where)

    def read(self, n: int) -> bytes:
        try:
            data = self.stream.read(n)
        except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error,
                zstandard.ZstdError) as exc:
            raise self._corrupt(exc) from None
        if len(data) != n:
            raise UserError("truncated payload: it ends inside an archive member",
                            where=self.where)
        return data


def _cpio_members(stream: _PayloadStream) -> Iterator[tuple[_Member | None, _MemberData]]:
    """Each member of the payload's cpio (newc) archive, in archive order.

    The consumer may read the member's data before asking for the next one;
    whatever it leaves is skipped.  A member naming the archive root itself
    comes as None.
    """
    while True:
        head = stream.read(110)
        magic = head[:6]
        if magic not in (b"070701", b"070702"):
            if magic == b"07070X":
                raise UserError("the payload uses rpm's large-file archive format, which "
                                "kmodgate cannot read", where=stream.where)
            raise UserError("corrupt payload: bad cpio header", where=stream.where)
        try:
            fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise UserError("corrupt payload: bad cpio header", where=stream.where) from None
        ino, mode, _uid, _gid, nlink, _mtime, size = fields[:7]
        namesize = fields[11]
        raw_name = stream.read(namesize)
        stream.read((4 - (110 + namesize) % 4) % 4)
        name = raw_name.rstrip(b"\0").decode("utf-8", "surrogateescape")
        if name == "TRAILER!!!":
            return
        path = _member_path(name, stream.where)
        data = _MemberData(stream, size)
        yield (_Member(path, mode, ino, nlink, size) if path else None), data
        data.skip_rest()
        stream.read((4 - size % 4) % 4)


class _MemberData:
    """One member's data in the payload stream, and how much of it is left."""

    def __init__(self, stream: _PayloadStream, size: int) -> None:
        self.stream = stream
        self.left = size

    def read(self, n: int) -> bytes:
        n = min(n, self.left)
        self.left -= n
        return self.stream.read(n) if n else b""

    def skip_rest(self) -> None:
        while self.left:
            self.read(_CHUNK)


def _member_path(name: str, where: Path) -> str:
    """*name* relative to the archive root; UserError if it could point outside."""
    rel = name[2:] if name.startswith("./") else name
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts or "\0" in rel:
        raise UserError(f"unsafe file name in the payload: {name!r}", where=where)
    return "/".join(p for p in parts if p not in ("", "."))


def _iterate_payload(pkg: Package) -> Iterator[tuple[_Member | None, _MemberData]]:
    """Verify the payload digest, then walk the payload's members."""
    try:
        if pkg.payload_digest is not None:
            algo, expected = pkg.payload_digest
            h = hashlib.new(algo)
            with pkg.path.open("rb") as f:
                f.seek(pkg.data_offset)
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            if h.hexdigest() != expected:
                raise UserError("corrupt or truncated payload: its digest does not match the "
                                "header's", where=pkg.path)
        with pkg.path.open("rb") as f:
            yield from _cpio_members(_PayloadStream(pkg, f))
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=pkg.path) from None


def read_members(pkg: Package, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The data of the regular files *wanted* selects, by payload path.

    Symbolic links are not followed.  A hard-linked file's data comes with the
    last of its links in the archive, so earlier links take it from there.
    """
    out: dict[str, bytes] = {}
    waiting: dict[int, list[str]] = {}
    for member, data in _iterate_payload(pkg):
        if member is None or not stat.S_ISREG(member.mode):
            continue
        if member.nlink > 1 and member.size == 0:
            if wanted(member.path):
                waiting.setdefault(member.ino, []).append(member.path)
            continue
        content: bytes | None = None
        if wanted(member.path):
            content = out[member.path] = data.read(member.size)
        if member.nlink > 1 and member.ino in waiting:
            if content is None:
                content = data.read(member.size)
            for name in waiting.pop(member.ino):
                out[name] = content
    return out


def unpack(pkg: Package) -> Path:
    """*pkg*'s files under a cache directory keyed by the package's content."""
    final = cache_subdir("unpacked-rpm") / _file_digest(pkg.path, "sha256")[:24]
    if final.exists():
        return final
    with staging_dir(final) as tmp:
        _Unpacker(tmp, pkg.path).unpack(pkg)
    return final


class _Unpacker:
    """Writes payload members below *root* and nowhere else.

    Member names are checked (no absolute paths, no ``..``); besides, before
    anything is written, the real path of its directory must lie inside the
    root, links to outside the root are not made, and when all is written any
    link that a later member made point outside is removed.
    """

    def __init__(self, root: Path, where: Path) -> None:
        self.root = os.path.realpath(root)
        self.where = where  # the package, for messages

    def _inside(self, path: str) -> bool:
        return os.path.commonpath([self.root, path]) == self.root

    def _parent(self, rel: str) -> str:
        """The real directory *rel* goes into, created if need be."""
        parent = os.path.dirname(os.path.join(self.root, rel))
        real = os.path.realpath(parent)
        if not self._inside(real):
            raise UserError(f"unsafe payload: {rel!r} would be written outside the package "
                            "through a symbolic link", where=self.where)
        os.makedirs(real, exist_ok=True)
        return real

    def unpack(self, pkg: Package) -> None:
        try:
            self._unpack(pkg)
        except OSError as exc:
            raise InfraError(f"cannot unpack into the cache: {exc}", where=pkg.path) from None

    def _unpack(self, pkg: Package) -> None:
        links: dict[int, list[str]] = {}  # inode -> files of a hard-link set, written empty
        for member, data in _iterate_payload(pkg):
            if member is None:
                continue
            kind = stat.S_IFMT(member.mode)
            target = os.path.join(self._parent(member.path), os.path.basename(member.path))
            if kind == stat.S_IFDIR:
                if os.path.islink(target):
                    os.unlink(target)
                os.makedirs(target, exist_ok=True)
            elif kind == stat.S_IFREG:
                self._write(target, member, data)
                if member.nlink > 1:
                    siblings = links.setdefault(member.ino, [])
                    if member.size:
                        for other in siblings:
                            self._copy(target, other)
                    siblings.append(target)
            elif kind == stat.S_IFLNK:
                self._symlink(target, data.read(member.size).decode("utf-8", "surrogateescape"))
            # Devices, fifos and sockets carry nothing kmodgate reads.
        self._drop_escaping_links()

    def _clear(self, target: str) -> None:
        if os.path.islink(target) or os.path.isfile(target):
            os.unlink(target)
        elif os.path.isdir(target):
            raise UserError(f"corrupt payload: {target!r} is both a directory and a file",
                            where=self.where)

    def _write(self, target: str, member: _Member, data: _MemberData) -> None:
        self._clear(target)
        mode = 0o755 if member.mode & 0o111 else 0o644
        # O_NOFOLLOW | O_EXCL: never write through a link, never into a file we did not create.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            left = member.size
            while left:
                chunk = data.read(min(_CHUNK, left))
                f.write(chunk)
                left -= len(chunk)

    def _copy(self, source: str, target: str) -> None:
        self._clear(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f, open(source, "rb") as src:
            while chunk := src.read(_CHUNK):
                f.write(chunk)

    def _symlink(self, target: str, link: str) -> None:
        if os.path.isabs(link):
            return  # it names a file of the installed system, not of this package
        resolved = os.path.realpath(os.path.join(os.path.dirname(target), link))
        if not self._inside(resolved):
            return
        self._clear(target)
        os.symlink(link, target)

    def _drop_escaping_links(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) and not self._inside(os.path.realpath(path)):
                    os.unlink(path)


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=path) from None
    return h.hexdigest()
