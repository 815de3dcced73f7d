"""Read what the module loader reads from a kernel module (.ko) file.

A small ELF reader written for speed: reading all ~4,000 modules of a
distribution kernel is the hot path of every abi check, and a general ELF
library costs 10-50x more per file (benchmarks/read_modules.py).  The tests hold
it to pyelftools and to ``modprobe --dump-modversions`` / ``modinfo``.

It reads both ELF classes and byte orders, like kmod does.  Symbol names and
.modinfo keys are interned: "kfree" stands in thousands of modules, twice in
each (__versions and the symbol table), and shared strings make the parsed
image half the size to keep, pickle between processes and cache.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from sys import intern

from kmodgate.abi.model import ExportType, ModuleExport, ModuleInfo
from kmodgate.errors import UserError

ELF_MAGIC = b"\x7fELF"
ET_REL = 1
SHT_SYMTAB = 2
SHT_NOBITS = 8
SHN_UNDEF = 0
STB_WEAK = 2

# A struct modversion_info is always 64 bytes: an unsigned long CRC and the
# rest of MODULE_NAME_LEN (64 - sizeof(unsigned long)) for the NUL-padded name.
MODVERSION_INFO_SIZE = 64

# e_machine values kmodgate names in messages (elf.h); others print as numbers.
MACHINES = {
    3: "i386",
    8: "mips",
    20: "ppc",
    21: "ppc64",
    22: "s390",
    40: "arm",
    62: "x86_64",
    183: "aarch64",
    243: "riscv",
    258: "loongarch",
}

EXPORT_SECTIONS = {"__ksymtab": ExportType.PLAIN, "__ksymtab_gpl": ExportType.GPL}
CRC_SECTIONS = {"__ksymtab": "__kcrctab", "__ksymtab_gpl": "__kcrctab_gpl"}


@dataclass(frozen=True, slots=True)
class _Layout:
    """struct formats for one ELF class and byte order."""

    header: struct.Struct  # from e_type to e_shstrndx
    section: struct.Struct
    symbol: str  # iter_unpack format
    symbol_size: int
    sym_fields: tuple[int, int, int, int]  # indexes of name, info, shndx, value
    versions: str  # iter_unpack format of one struct modversion_info
    u32: struct.Struct


def _layout(is64: bool, order: str) -> _Layout:
    if is64:
        return _Layout(
            header=struct.Struct(order + "HHIQQQIHHHHHH"),
            section=struct.Struct(order + "IIQQQQIIQQ"),
            symbol=order + "IBBHQQ",
            symbol_size=24,
            sym_fields=(0, 1, 3, 4),
            versions=order + "Q56s",
            u32=struct.Struct(order + "I"),
        )
    return _Layout(
        header=struct.Struct(order + "HHIIIIIHHHHHH"),
        section=struct.Struct(order + "IIIIIIIIII"),
        symbol=order + "IIIBBH",
        symbol_size=16,
        sym_fields=(0, 3, 5, 1),
        versions=order + "I60s",
        u32=struct.Struct(order + "I"),
    )


_LAYOUTS = {
    (1, 1): _layout(False, "<"),
    (1, 2): _layout(False, ">"),
    (2, 1): _layout(True, "<"),
    (2, 2): _layout(True, ">"),
}


@dataclass(frozen=True, slots=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int
    info: int


def _cstr(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    if end < 0:
        end = len(data)
    return data[offset:end].decode("utf-8", "replace")


def read_module(data: bytes, path: str, *, sha256: str | None = None) -> ModuleInfo:
    """Parse an uncompressed .ko; raise UserError naming *path* if it is not one."""
    if not data.startswith(ELF_MAGIC):
        raise UserError("not an ELF file (bad magic), so not a kernel module", where=path)
    if len(data) < 52:
        raise UserError("truncated ELF file (no complete header)", where=path)
    layout = _LAYOUTS.get((data[4], data[5]))
    if layout is None:
        raise UserError(
            f"unsupported ELF class {data[4]} / byte order {data[5]}", where=path
        )
    try:
        return _read(data, path, layout, sha256)
    except (struct.error, IndexError, ValueError) as exc:
        raise UserError(f"truncated or corrupt ELF file ({exc})", where=path) from None


def _read(data: bytes, path: str, layout: _Layout, sha256: str | None) -> ModuleInfo:
    size = len(data)
    (e_type, e_machine, _v, _entry, _phoff, shoff, _flags, _ehsize, _phentsize, _phnum,
     shentsize, shnum, shstrndx) = layout.header.unpack_from(data, 16)
    if e_type != ET_REL:
        raise UserError(
            f"not a kernel module: ELF type {e_type}, a module is relocatable (1)", where=path
        )
    if shentsize != layout.section.size or shnum == 0:
        raise UserError("corrupt ELF file: bad section header table", where=path)
    if shoff + shnum * shentsize > size:
        raise UserError("truncated ELF file: section headers lie past the end", where=path)
    table = memoryview(data)[shoff : shoff + shnum * shentsize]
    raw = list(struct.iter_unpack(layout.section.format, table))
    if shstrndx >= shnum:
        raise UserError("corrupt ELF file: bad section name table index", where=path)
    names_off, names_size = raw[shstrndx][4], raw[shstrndx][5]
    _check_range(names_off, names_size, size, path, "section name table")
    names = data[names_off : names_off + names_size]
    # Only the sections the loader's checks need get a name and an object:
    # a module has ~50 sections and this runs for thousands of modules.
    wanted = _wanted_name_offsets(names)
    sections: dict[int, _Section] = {}
    by_name: dict[str, int] = {}
    symtab_index = None
    for i, (sh_name, sh_type, _fl, _addr, off, sz, link, info, _al, _es) in enumerate(raw):
        name = wanted.get(sh_name)
        if name is None and not (sh_type == SHT_SYMTAB and symtab_index is None):
            continue
        if sh_type == SHT_SYMTAB:
            symtab_index = i
            if link < shnum:  # the symbol table's string table
                _, _, _, _, s_off, s_size, _, _, _, _ = raw[link]
                sections[link] = _Section("", 0, s_off, s_size, 0, 0)
                _check_range(s_off, s_size, size, path, "symbol string table")
        _check_range(off, sz, size, path, f"section {name or i}")
        sections[i] = _Section(name or "", sh_type, off, sz, link, info)
        if name:
            by_name.setdefault(name, i)

    def section_bytes(index: int) -> bytes:
        s = sections[index]
        return data[s.offset : s.offset + s.size]

    modinfo_index = by_name.get(".modinfo")
    if modinfo_index is None or ".gnu.linkonce.this_module" not in by_name:
        raise UserError(
            "not a kernel module: no .modinfo or .gnu.linkonce.this_module section", where=path
        )
    modinfo = _parse_modinfo(section_bytes(modinfo_index))

    versions: dict[str, int] | None = None
    vers_index = by_name.get("__versions")
    if vers_index is not None:
        versions = _parse_versions(section_bytes(vers_index), layout, path)

    undefined: list[str] = []
    weak: list[str] = []
    exports: list[ModuleExport] = []
    if symtab_index is not None:
        symtab = sections[symtab_index]
        if symtab.link not in sections:
            raise UserError("corrupt ELF file: symbol table has no string table", where=path)
        strtab = section_bytes(symtab.link)
        wants_exports = any(
            by_name.get(n) is not None and sections[by_name[n]].size for n in EXPORT_SECTIONS
        )
        undefined, weak, exports = _scan_symbols(
            section_bytes(symtab_index), symtab.info, strtab, layout, data, sections,
            by_name, wants_exports,
        )

    name = next((v for k, v in modinfo if k == "name"), None)
    if not name:
        from kmodgate.abi.model import module_name_from_path

        name = module_name_from_path(path)
    return ModuleInfo(
        name=name,
        path=path,
        machine=MACHINES.get(e_machine, f"machine-{e_machine}"),
        modinfo=modinfo,
        versions=versions,
        exports=exports,
        undefined=undefined,
        weak_undefined=weak,
        sha256=sha256,
    )


_WANTED_SECTIONS = (
    ".modinfo",
    ".gnu.linkonce.this_module",
    "__versions",
    "__ksymtab_strings",
    *EXPORT_SECTIONS,
    *CRC_SECTIONS.values(),
)


def _wanted_name_offsets(names: bytes) -> dict[int, str]:
    """Offsets in the section name table at which a wanted name starts.

    Names may share tails (".rela__ksymtab" holds "__ksymtab"), so every
    NUL-terminated occurrence counts.
    """
    found: dict[int, str] = {}
    for name in _WANTED_SECTIONS:
        needle = name.encode() + b"\0"
        pos = names.find(needle)
        while pos >= 0:
            found[pos] = name
            pos = names.find(needle, pos + 1)
    return found


def _check_range(offset: int, length: int, size: int, path: str, what: str) -> None:
    if offset + length > size:
        raise UserError(f"truncated ELF file: {what} lies past the end", where=path)


def _parse_modinfo(raw: bytes) -> list[tuple[str, str]]:
    """NUL-separated key=value strings, padding NULs skipped; order kept (modinfo -F does)."""
    pairs: list[tuple[str, str]] = []
    for item in raw.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if sep:
            pairs.append((intern(key.decode("utf-8", "replace")),
                          value.decode("utf-8", "replace")))
    return pairs


def _parse_versions(raw: bytes, layout: _Layout, path: str) -> dict[str, int]:
    if len(raw) % MODVERSION_INFO_SIZE:
        raise UserError(
            f"corrupt __versions section: {len(raw)} bytes is not a whole number of "
            f"{MODVERSION_INFO_SIZE}-byte entries",
            where=path,
        )
    # check_version() compares the whole unsigned long, so no bits are dropped;
    # it stops at the first entry of a name, so a duplicate never overrides.
    entries = [
        (intern(name.split(b"\0", 1)[0].decode("utf-8", "replace")), crc)
        for crc, name in struct.iter_unpack(layout.versions, raw)
    ]
    versions = dict(entries)
    if len(versions) != len(entries):
        versions = {}
        for name, crc in entries:
            versions.setdefault(name, crc)
    return versions


def _scan_symbols(
    symtab: bytes,
    first_global: int,
    strtab: bytes,
    layout: _Layout,
    data: bytes,
    sections: dict[int, _Section],
    by_name: dict[str, int],
    wants_exports: bool,
) -> tuple[list[str], list[str], list[ModuleExport]]:
    """Undefined symbols (the loader resolves these) and, if any, the module's exports."""
    name_i, info_i, shndx_i, value_i = layout.sym_fields
    usable = len(symtab) - len(symtab) % layout.symbol_size
    # Locals come first (sh_info is the first global); undefined symbols are global,
    # so the hot path skips the locals unless the module exports something.
    start = 0 if wants_exports else min(first_global, usable // layout.symbol_size)
    entries = list(
        struct.iter_unpack(layout.symbol, memoryview(symtab)[start * layout.symbol_size : usable])
    )
    find = strtab.find
    undefined: list[str] = []
    weak: list[str] = []
    for entry in entries:
        if entry[shndx_i] == SHN_UNDEF and entry[name_i]:
            st_name = entry[name_i]
            sym = intern(strtab[st_name : find(b"\0", st_name)].decode("utf-8", "replace"))
            (weak if entry[info_i] >> 4 == STB_WEAK else undefined).append(sym)
    if not wants_exports:
        return undefined, weak, []

    marker_sections = {by_name[n] for n in EXPORT_SECTIONS if n in by_name}
    strings_index = by_name.get("__ksymtab_strings", -1)
    export_syms: dict[str, tuple[int, int]] = {}  # symbol -> (section index, value)
    namespace_at: dict[str, int] = {}  # symbol -> file offset of its namespace string
    for entry in entries:
        shndx = entry[shndx_i]
        if shndx in marker_sections:
            st_name = entry[name_i]
            if strtab.startswith(b"__ksymtab_", st_name):
                sym = strtab[st_name + 10 : find(b"\0", st_name)].decode("utf-8", "replace")
                export_syms[sym] = (shndx, entry[value_i])
        elif shndx == strings_index:
            st_name = entry[name_i]
            if strtab.startswith(b"__kstrtabns_", st_name):
                sym = strtab[st_name + 12 : find(b"\0", st_name)].decode("utf-8", "replace")
                namespace_at[sym] = sections[shndx].offset + entry[value_i]
    return undefined, weak, _exports(export_syms, namespace_at, layout, data, sections, by_name)


def _exports(
    export_syms: dict[str, tuple[int, int]],
    namespaces: dict[str, int],
    layout: _Layout,
    data: bytes,
    sections: dict[int, _Section],
    by_name: dict[str, int],
) -> list[ModuleExport]:
    """Exports from ``__ksymtab_<sym>`` markers.

    The CRC of the i-th entry of __ksymtab[_gpl] is the i-th u32 of
    __kcrctab[_gpl]: the loader pairs them by position (kernel/module/main.c,
    find_exported_symbol_in_section / symversion), whatever the entry size.
    """
    counts: dict[int, int] = {}
    for shndx, _ in export_syms.values():
        counts[shndx] = counts.get(shndx, 0) + 1
    out = []
    for sym, (shndx, value) in export_syms.items():
        section = sections[shndx]
        export_type = EXPORT_SECTIONS.get(section.name)
        if export_type is None:
            continue
        crc = None
        crc_index = by_name.get(CRC_SECTIONS[section.name])
        if crc_index is not None and counts[shndx]:
            entry_size = section.size // counts[shndx]
            if entry_size:
                crc_sec = sections[crc_index]
                pos = crc_sec.offset + (value // entry_size) * 4
                if pos + 4 <= crc_sec.offset + crc_sec.size:
                    crc = layout.u32.unpack_from(data, pos)[0]
        namespace = ""
        ns_off = namespaces.get(sym, -1)
        if 0 <= ns_off < len(data):
            namespace = _cstr(data, ns_off)
        out.append(ModuleExport(sym, export_type, namespace, crc))
    out.sort(key=lambda e: e.symbol)
    return out
