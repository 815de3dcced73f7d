"""RHEL kABI stablelists (``kabi_stablelist_<arch>``): the symbols a kernel promises to keep.

The format is a section header in brackets naming the list, then one
tab-indented symbol a line, as in the kernel-abi-stablelists package.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmodgate.errors import UserError


@dataclass(frozen=True, slots=True)
class Stablelist:
    sections: tuple[str, ...]
    symbols: frozenset[str]


def parse_stablelist(text: str, where: str) -> Stablelist:
    sections: list[str] = []
    symbols: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]") or len(stripped) < 3:
                raise UserError("malformed stablelist section header", where=f"{where}:{lineno}")
            sections.append(stripped[1:-1])
            continue
        if not sections:
            raise UserError(
                "malformed stablelist: symbol before any [section] header",
                where=f"{where}:{lineno}",
            )
        if len(stripped.split()) != 1:
            raise UserError(
                "malformed stablelist line: expected one symbol", where=f"{where}:{lineno}"
            )
        symbols.add(stripped)
    if not sections:
        raise UserError("not a kABI stablelist: no [section] header", where=where)
    return Stablelist(tuple(sections), frozenset(symbols))


def format_stablelist(section: str, symbols: list[str]) -> str:
    return f"[{section}]\n" + "".join(f"\t{s}\n" for s in symbols)
