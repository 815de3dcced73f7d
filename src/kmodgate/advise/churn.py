"""How often exported symbols change their CRC along a kernel line."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from kmodgate.abi.model import VMLINUX, KernelABI


@dataclass(slots=True)
class SymbolChurn:
    """One symbol's history along one line of N kernels (N - 1 updates)."""

    symbol: str
    updates: int = 0  # consecutive pairs in which the symbol was exported before
    changes: int = 0  # of those, how many changed its CRC or dropped it
    last_change: str | None = None  # the release that changed it last


@dataclass(slots=True)
class LineChurn:
    line: str
    releases: list[str]
    symbols: dict[str, SymbolChurn] = field(default_factory=dict)
    changed_per_update: list[int] = field(default_factory=list)  # one count per update

    def subsystem_changes(self, kernel: KernelABI) -> Counter[str]:
        """CRC changes per subsystem, from the providers in *kernel*'s Module.symvers."""
        counts: Counter[str] = Counter()
        for s in self.symbols.values():
            if s.changes:
                export = kernel.exports.get(s.symbol)
                counts[subsystem(export.provider if export else VMLINUX)] += s.changes
        return counts


def subsystem(provider: str) -> str:
    """"drivers/usb/core/usbcore" -> "drivers/usb"; vmlinux stays vmlinux (Module.symvers
    does not say which part of the core kernel exports a symbol)."""
    if provider == VMLINUX:
        return VMLINUX
    parts = provider.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def line_churn(line: str, kernels: Sequence[KernelABI]) -> LineChurn:
    """Walk a line oldest first and count, for every symbol, the updates that broke it."""
    churn = LineChurn(line, [k.release for k in kernels])
    for before, after in itertools.pairwise(kernels):
        changed = 0
        for symbol, export in before.exports.items():
            record = churn.symbols.get(symbol)
            if record is None:
                record = churn.symbols[symbol] = SymbolChurn(symbol)
            record.updates += 1
            new = after.exports.get(symbol)
            if new is None or new.crc != export.crc:
                record.changes += 1
                record.last_change = after.release
                changed += 1
        churn.changed_per_update.append(changed)
    return churn
