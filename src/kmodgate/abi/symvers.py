"""Module.symvers: the kernel build's table of exported symbols and their CRCs.

Five tab-separated columns since Linux 5.9 (commit 5190044c2965 ("modpost:
move the namespace field in Module.symvers last")):
``0xCRC<TAB>symbol<TAB>vmlinux|module/path<TAB>EXPORT_SYMBOL[_GPL]<TAB>namespace``.
Older files have four columns; both are read.
"""

from __future__ import annotations

from kmodgate.abi.model import Export, ExportType
from kmodgate.errors import UserError

_EXPORT_TYPES = {t.value: t for t in ExportType if t is not ExportType.UNKNOWN}


def parse_symvers(text: str, where: str) -> dict[str, Export]:
    """Exports by symbol; a malformed line is a UserError naming its line number."""
    exports: dict[str, Export] = {}
    # Split on newlines only: splitlines() also breaks at form feeds and other
    # Unicode line ends, and the line numbers in errors would drift.
    for lineno, raw_line in enumerate(text.split("\n"), 1):
        line = raw_line.removesuffix("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (4, 5):
            raise UserError(
                f"malformed Module.symvers line: expected 4 or 5 tab-separated fields, "
                f"found {len(fields)}",
                where=f"{where}:{lineno}",
            )
        crc_text, symbol, provider, export_text = fields[:4]
        namespace = fields[4] if len(fields) == 5 else ""
        try:
            crc = int(crc_text, 16)
        except ValueError:
            crc = -1
        if not crc_text.startswith("0x") or not 0 <= crc <= 0xFFFFFFFF:
            raise UserError(
                f"malformed Module.symvers line: bad CRC {crc_text!r}", where=f"{where}:{lineno}"
            )
        export_type = _EXPORT_TYPES.get(export_text)
        if export_type is None or not symbol or not provider:
            raise UserError(
                f"malformed Module.symvers line: bad export type {export_text!r}"
                if export_type is None
                else "malformed Module.symvers line: empty symbol or provider",
                where=f"{where}:{lineno}",
            )
        exports[symbol] = Export(symbol, crc, provider, export_type, namespace)
    return exports


def format_symvers(exports: dict[str, Export]) -> str:
    """The inverse of parse_symvers, in the five-column form."""
    return "".join(
        f"0x{e.crc or 0:08x}\t{e.symbol}\t{e.provider}\t{e.export_type.value}\t{e.namespace}\n"
        for e in exports.values()
    )
