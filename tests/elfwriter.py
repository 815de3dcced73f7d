"""Synthesize kernel-module-like ELF relocatable (.ko) files for hermetic tests.

Only what the module loader (and kmodgate) reads is written, laid out the way
modpost and the module linker script (scripts/module.lds.S) lay it out:

* ``.modinfo``: NUL-separated ``key=value`` strings;
* ``.gnu.linkonce.this_module``: a zeroed stand-in for ``struct module``;
* ``__versions``: 64-byte ``struct modversion_info`` entries, an ``unsigned
  long`` CRC (4 or 8 bytes, in the file's byte order) and the NUL-padded name;
* ``__ksymtab`` / ``__ksymtab_gpl``: 12-byte ``struct kernel_symbol`` entries
  (PREL32 layout), each marked by a local ``__ksymtab_<sym>`` symbol, and
  ``__kcrctab`` / ``__kcrctab_gpl`` holding one u32 CRC per entry, by position;
* ``__ksymtab_strings``: symbol and namespace strings, marked by local
  ``__kstrtab_<sym>`` and ``__kstrtabns_<sym>`` symbols;
* ``.symtab`` / ``.strtab``: locals first, ``sh_info`` = index of the first
  global; undefined globals and weak undefined symbols.

Both ELF classes and byte orders are written.  ``ModuleSpec`` also carries a
few ways to break the file, for the bad-input tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

EM_386 = 3
EM_MIPS = 8
EM_PPC = 20
EM_PPC64 = 21
EM_S390 = 22
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183

ET_REL = 1
SHT_NULL = 0
SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_NOBITS = 8
SHF_WRITE = 1
SHF_ALLOC = 2
SHF_EXECINSTR = 4
STB_LOCAL = 0
STB_GLOBAL = 1
STB_WEAK = 2
STT_NOTYPE = 0
STT_OBJECT = 1
STT_FUNC = 2
STT_SECTION = 3
SHN_UNDEF = 0

KERNEL_SYMBOL_SIZE = 12  # struct kernel_symbol with PREL32 relocations
MODVERSION_INFO_SIZE = 64

DEFAULT_VERMAGIC = "6.1.0-56-amd64 SMP preempt mod_unload modversions "
DEFAULT_LAYOUT_CRC = 0x7C797B6A


@dataclass(frozen=True)
class ExportSpec:
    """One EXPORT_SYMBOL[_GPL][_NS] of the synthesized module."""

    symbol: str
    gpl: bool = False
    crc: int = 0
    namespace: str = ""


@dataclass
class ModuleSpec:
    """What to write; the defaults make a plausible x86_64 module."""

    name: str = "synth"
    elf_class: int = 64  # 32 or 64
    big_endian: bool = False
    machine: int = EM_X86_64
    e_type: int = ET_REL
    # None: no "name=" entry is added; otherwise modinfo is written as given.
    modinfo: list[tuple[str, str]] | None = None
    license: str | None = "GPL"
    vermagic: str | None = DEFAULT_VERMAGIC
    versions: list[tuple[str, int]] | None = field(
        default_factory=lambda: [("module_layout", DEFAULT_LAYOUT_CRC)]
    )
    undefined: list[str] = field(default_factory=list)
    weak: list[str] = field(default_factory=list)
    exports: list[ExportSpec] = field(default_factory=list)
    # Static functions: local symbols defined in .text.
    local_functions: list[str] = field(default_factory=lambda: ["synth_helper"])
    kcrctab: bool = True  # write __kcrctab[_gpl] for the exports
    namespace_markers: bool = True  # a __kstrtabns_<sym> for every export, "" if none
    # Store "__ksymtab" as the tail of ".rela__ksymtab" in .shstrtab, as GNU ld does.
    tail_merge_names: bool = True
    extra_sections: list[tuple[str, bytes]] = field(default_factory=list)
    # Ways to break the file.
    truncate_to: int | None = None
    versions_extra_bytes: int = 0  # __versions no longer a whole number of entries
    shstrndx: int | None = None  # overrides e_shstrndx
    shentsize: int | None = None  # overrides e_shentsize
    symtab_link: int | None = None  # overrides .symtab's sh_link
    section_size_override: dict[str, int] = field(default_factory=dict)
    section_offset_override: dict[str, int] = field(default_factory=dict)

    @property
    def all_modinfo(self) -> list[tuple[str, str]]:
        if self.modinfo is not None:
            return list(self.modinfo)
        pairs: list[tuple[str, str]] = []
        if self.license is not None:
            pairs.append(("license", self.license))
        pairs.append(("depends", ""))
        pairs.append(("retpoline", "Y"))
        pairs.append(("name", self.name))
        if self.vermagic is not None:
            pairs.append(("vermagic", self.vermagic))
        return pairs


@dataclass
class _Section:
    name: str
    type: int
    flags: int
    data: bytes
    link: int = 0
    info: int = 0
    align: int = 1
    entsize: int = 0


@dataclass
class _Symbol:
    name: str
    section: str | None  # None: SHN_UNDEF
    value: int = 0
    size: int = 0
    bind: int = STB_GLOBAL
    type: int = STT_NOTYPE


class _StringTable:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}

    def add(self, text: str) -> int:
        if text not in self.offsets:
            self.offsets[text] = len(self.data)
            self.data += text.encode() + b"\0"
        return self.offsets[text]


def _order(spec: ModuleSpec) -> str:
    return ">" if spec.big_endian else "<"


def _modinfo_bytes(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def versions_bytes(
    versions: list[tuple[str, int]], *, elf_class: int = 64, big_endian: bool = False
) -> bytes:
    """A __versions section: struct modversion_info entries in the file's layout."""
    order = ">" if big_endian else "<"
    crc_format = "Q" if elf_class == 64 else "I"
    name_size = MODVERSION_INFO_SIZE - struct.calcsize(crc_format)
    out = bytearray()
    for name, crc in versions:
        encoded = name.encode()
        if len(encoded) >= name_size:
            raise ValueError(f"symbol name too long for __versions: {name}")
        out += struct.pack(order + crc_format, crc) + encoded.ljust(name_size, b"\0")
    return bytes(out)


def build_module(spec: ModuleSpec) -> bytes:
    """The bytes of a relocatable ELF file shaped like a kernel module."""
    order = _order(spec)
    is64 = spec.elf_class == 64
    sections: list[_Section] = []
    symbols: list[_Symbol] = []

    text = b"\xc3" * 16 * (1 + len(spec.exports) + len(spec.local_functions))
    sections.append(_Section(".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, text, align=16))
    sections.append(_Section(".modinfo", SHT_PROGBITS, SHF_ALLOC, _modinfo_bytes(
        spec.all_modinfo)))
    if spec.versions is not None:
        data = versions_bytes(spec.versions, elf_class=spec.elf_class, big_endian=spec.big_endian)
        data += b"\0" * spec.versions_extra_bytes
        sections.append(_Section("__versions", SHT_PROGBITS, SHF_ALLOC, data, align=32))
    this_module = b"\0" * (0x18) + spec.name.encode()[:55].ljust(56, b"\0") + b"\0" * 64
    sections.append(_Section(".gnu.linkonce.this_module", SHT_PROGBITS, SHF_ALLOC | SHF_WRITE,
                             this_module, align=64))

    strings = bytearray()
    string_markers: list[_Symbol] = []
    for e in spec.exports:
        string_markers.append(_Symbol(f"__kstrtab_{e.symbol}", "__ksymtab_strings",
                                      len(strings), bind=STB_LOCAL, type=STT_OBJECT))
        strings += e.symbol.encode() + b"\0"
        if spec.namespace_markers or e.namespace:
            string_markers.append(_Symbol(f"__kstrtabns_{e.symbol}", "__ksymtab_strings",
                                          len(strings), bind=STB_LOCAL, type=STT_OBJECT))
            strings += e.namespace.encode() + b"\0"

    export_markers: list[_Symbol] = []
    for gpl, tab, crctab in ((False, "__ksymtab", "__kcrctab"),
                             (True, "__ksymtab_gpl", "__kcrctab_gpl")):
        group = [e for e in spec.exports if e.gpl == gpl]
        if not group:
            continue
        # Entry contents are relocations in a real module; zeros are fine here.
        sections.append(_Section(tab, SHT_PROGBITS, SHF_ALLOC,
                                 b"\0" * (KERNEL_SYMBOL_SIZE * len(group)), align=4))
        if spec.kcrctab:
            sections.append(_Section(crctab, SHT_PROGBITS, SHF_ALLOC,
                                     b"".join(struct.pack(order + "I", e.crc) for e in group),
                                     align=4))
        for i, e in enumerate(group):
            export_markers.append(_Symbol(f"__ksymtab_{e.symbol}", tab, i * KERNEL_SYMBOL_SIZE,
                                          KERNEL_SYMBOL_SIZE, STB_LOCAL, STT_OBJECT))
            if spec.kcrctab:
                export_markers.append(_Symbol(f"__kcrctab_{e.symbol}", crctab, i * 4, 4,
                                              STB_LOCAL, STT_OBJECT))
    if spec.exports:
        sections.append(_Section("__ksymtab_strings", SHT_PROGBITS, SHF_ALLOC, bytes(strings)))
        # A relocation section whose name holds "__ksymtab" as its tail.
        sections.append(_Section(".rela__ksymtab", SHT_RELA, 0, b"", entsize=24 if is64 else 12,
                                 align=8))
    for name, data in spec.extra_sections:
        sections.append(_Section(name, SHT_PROGBITS, SHF_ALLOC, data))

    # Symbols: the null symbol, section symbols, other locals, then globals.
    symbols.append(_Symbol("", None, bind=STB_LOCAL))
    for s in sections:
        symbols.append(_Symbol("", s.name, bind=STB_LOCAL, type=STT_SECTION))
    fn_offset = 16
    for fn in spec.local_functions:
        symbols.append(_Symbol(fn, ".text", fn_offset, 16, STB_LOCAL, STT_FUNC))
        fn_offset += 16
    symbols.extend(export_markers)
    symbols.extend(string_markers)
    first_global = len(symbols)
    symbols.append(_Symbol("init_module", ".text", 0, 16, STB_GLOBAL, STT_FUNC))
    for e in spec.exports:
        symbols.append(_Symbol(e.symbol, ".text", fn_offset, 16, STB_GLOBAL, STT_FUNC))
        fn_offset += 16
    symbols.extend(_Symbol(u, None) for u in spec.undefined)
    symbols.extend(_Symbol(w, None, bind=STB_WEAK) for w in spec.weak)

    names = [".null"] + [s.name for s in sections] + [".symtab", ".strtab", ".shstrtab"]
    index_of = {name: i for i, name in enumerate(names)}
    for s in sections:
        if s.type == SHT_RELA:
            s.link = index_of[".symtab"]
            s.info = index_of.get("__ksymtab", index_of.get("__ksymtab_gpl", 0))
    strtab = _StringTable()
    symtab = bytearray()
    for sym in symbols:
        st_name = strtab.add(sym.name)
        shndx = SHN_UNDEF if sym.section is None else index_of[sym.section]
        info = (sym.bind << 4) | sym.type
        if is64:
            symtab += struct.pack(order + "IBBHQQ", st_name, info, 0, shndx, sym.value, sym.size)
        else:
            symtab += struct.pack(order + "IIIBBH", st_name, sym.value, sym.size, info, 0, shndx)
    symtab_index = index_of[".symtab"]
    sections.append(_Section(".symtab", SHT_SYMTAB, 0, bytes(symtab),
                             link=spec.symtab_link if spec.symtab_link is not None
                             else symtab_index + 1,
                             info=first_global, align=8 if is64 else 4,
                             entsize=24 if is64 else 16))
    sections.append(_Section(".strtab", SHT_STRTAB, 0, bytes(strtab.data)))

    shstrtab = _StringTable()
    if spec.tail_merge_names and "__ksymtab" in index_of and ".rela__ksymtab" in index_of:
        rela = shstrtab.add(".rela__ksymtab")
        shstrtab.offsets["__ksymtab"] = rela + len(".rela")
    name_offsets = [shstrtab.add(s.name) for s in sections]
    shstrtab_name = shstrtab.add(".shstrtab")
    sections.append(_Section(".shstrtab", SHT_STRTAB, 0, b""))
    name_offsets.append(shstrtab_name)
    sections[-1].data = bytes(shstrtab.data)

    ehsize = 64 if is64 else 52
    shentsize = 64 if is64 else 40
    out = bytearray(ehsize)
    offsets: list[int] = []
    for s in sections:
        align = max(s.align, 1)
        out += b"\0" * (-len(out) % align)
        offsets.append(len(out))
        out += s.data
    out += b"\0" * (-len(out) % 8)
    shoff = len(out)
    headers = bytearray(shentsize)  # the null section
    for s, name_off, offset in zip(sections, name_offsets, offsets, strict=True):
        size = spec.section_size_override.get(s.name, len(s.data))
        offset = spec.section_offset_override.get(s.name, offset)
        fields = (name_off, s.type, s.flags, 0, offset, size, s.link, s.info, s.align, s.entsize)
        headers += struct.pack(order + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII"), *fields)
    out += headers
    shnum = len(sections) + 1
    shstrndx = spec.shstrndx if spec.shstrndx is not None else shnum - 1
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 2 if spec.big_endian else 1, 1, 0])
    ident = ident.ljust(16, b"\0")
    header_format = order + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
    out[0:ehsize] = ident + struct.pack(
        header_format, spec.e_type, spec.machine, 1, 0, 0, shoff, 0, ehsize, 0, 0,
        spec.shentsize if spec.shentsize is not None else shentsize, shnum, shstrndx,
    )
    if spec.truncate_to is not None:
        del out[spec.truncate_to :]
    return bytes(out)


# The four ELF class / byte order combinations, each with a machine that uses it.
LAYOUTS: list[tuple[int, bool, int]] = [
    (64, False, EM_X86_64),
    (64, True, EM_S390),
    (32, False, EM_386),
    (32, True, EM_PPC),
]


def layout_id(layout: tuple[int, bool, int]) -> str:
    elf_class, big_endian, _machine = layout
    return f"elf{elf_class}{'be' if big_endian else 'le'}"
