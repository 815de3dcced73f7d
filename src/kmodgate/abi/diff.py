"""Kernel against kernel: what changed in the exported ABI, and whom it breaks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kmodgate.abi.compare import Verdict, check_module
from kmodgate.abi.model import Export, KernelABI, ModuleInfo
from kmodgate.abi.stablelist import Stablelist


class Change(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CRC = "crc_changed"
    EXPORT_TYPE = "export_type_changed"
    NAMESPACE = "namespace_changed"
    MOVED = "moved"


# The changes that can break a module built against the old kernel.
BREAKING = frozenset({Change.REMOVED, Change.CRC, Change.EXPORT_TYPE, Change.NAMESPACE})


@dataclass(frozen=True, slots=True)
class SymbolChange:
    symbol: str
    changes: tuple[Change, ...]
    old: Export | None
    new: Export | None

    def to_json(self) -> dict[str, object]:
        def side(e: Export | None) -> dict[str, object] | None:
            if e is None:
                return None
            return {
                "crc": None if e.crc is None else f"0x{e.crc:08x}",
                "provider": e.provider,
                "export_type": e.export_type.value,
                "namespace": e.namespace,
            }

        return {
            "symbol": self.symbol,
            "changes": [c.value for c in self.changes],
            "old": side(self.old),
            "new": side(self.new),
        }


@dataclass(slots=True)
class KernelDiff:
    old: KernelABI
    new: KernelABI
    changes: dict[str, SymbolChange]
    impact: list[tuple[Verdict, Verdict, list[str]]] = field(default_factory=list)
    stablelisted: list[SymbolChange] = field(default_factory=list)

    def by_change(self, change: Change) -> list[SymbolChange]:
        return [c for c in self.changes.values() if change in c.changes]

    def counts(self) -> dict[str, int]:
        return {c.value: len(self.by_change(c)) for c in Change}


def diff_exports(old: dict[str, Export], new: dict[str, Export]) -> dict[str, SymbolChange]:
    changes: dict[str, SymbolChange] = {}
    for symbol in sorted(old.keys() | new.keys()):
        a, b = old.get(symbol), new.get(symbol)
        kinds: list[Change] = []
        if a is None:
            kinds.append(Change.ADDED)
        elif b is None:
            kinds.append(Change.REMOVED)
        else:
            if a.crc != b.crc:
                kinds.append(Change.CRC)
            if a.export_type != b.export_type:
                kinds.append(Change.EXPORT_TYPE)
            if a.namespace != b.namespace:
                kinds.append(Change.NAMESPACE)
            if a.provider != b.provider:
                kinds.append(Change.MOVED)
        if kinds:
            changes[symbol] = SymbolChange(symbol, tuple(kinds), a, b)
    return changes


def diff_kernels(
    old: KernelABI,
    new: KernelABI,
    modules: list[ModuleInfo] | None = None,
    stablelist: Stablelist | None = None,
) -> KernelDiff:
    """The ABI diff; with *modules*, each module's verdict on both kernels and the
    breaking changes among the symbols it uses; with *stablelist*, the protected
    symbols that changed in a breaking way (what check-kabi refuses at build time)."""
    result = KernelDiff(old, new, diff_exports(old.exports, new.exports))
    for module in modules or []:
        used = set(module.undefined)
        if module.versions:
            used.update(module.versions)
        breaking = sorted(
            s
            for s in used
            if s in result.changes and BREAKING.intersection(result.changes[s].changes)
        )
        result.impact.append((check_module(module, old), check_module(module, new), breaking))
    if stablelist is not None:
        result.stablelisted = [
            c
            for s, c in result.changes.items()
            if s in stablelist.symbols and BREAKING.intersection(c.changes)
        ]
    return result
