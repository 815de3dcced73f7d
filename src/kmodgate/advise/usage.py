"""Which symbols real modules use, and which a stablelist should protect first.

The ranking puts wide use first and low churn second: a symbol forty modules
need is worth a promise even if it moved once, a symbol one module needs is
not, and among equally used symbols the stable ones are the cheap promises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kmodgate.abi.model import Export, KernelABI, ModuleInfo
from kmodgate.advise.churn import LineChurn


@dataclass(slots=True)
class SymbolUsage:
    symbol: str
    modules: list[str]
    export_type: str
    provider: str
    stablelisted: bool
    # per line: (CRC changes, updates, release of the last change)
    churn: dict[str, tuple[int, int, str | None]] = field(default_factory=dict)
    rank: int = 0
    why: str = ""

    @property
    def changes(self) -> int:
        return sum(c for c, _, _ in self.churn.values())

    @property
    def updates(self) -> int:
        return sum(u for _, u, _ in self.churn.values())

    @property
    def churn_rate(self) -> float:
        return self.changes / self.updates if self.updates else 0.0


@dataclass(slots=True)
class ModuleCoverage:
    """The ksc-style figure: the share of a module's kernel symbols a stablelist covers."""

    module: str
    used: int
    covered: int
    uncovered: list[str]

    @property
    def share(self) -> float:
        return self.covered / self.used if self.used else 1.0


def line_exports(kernels: Sequence[KernelABI]) -> dict[str, Export]:
    """Every symbol any kernel of a line exports, as its newest kernel exports it: a
    symbol a later update removed is still one the corpus uses and lost."""
    merged: dict[str, Export] = {}
    for k in kernels:  # oldest first, so the newest definition wins
        merged.update(k.exports)
    return merged


def kernel_symbols_used(module: ModuleInfo, exports: Mapping[str, Export]) -> set[str]:
    """The symbols *module* takes from the kernel (its other needs are not the kernel's ABI)."""
    return {s for s in module.undefined if s in exports}


def symbol_usage(
    modules: Sequence[ModuleInfo],
    exports: Mapping[str, Export],
    churn: Mapping[str, LineChurn],
    stablelist: frozenset[str] = frozenset(),
) -> list[SymbolUsage]:
    """Every kernel symbol the corpus uses, ranked for the stablelist (rank 1 first)."""
    users: dict[str, list[str]] = {}
    for m in modules:
        for s in kernel_symbols_used(m, exports):
            users.setdefault(s, []).append(m.name)
    rows = []
    for symbol, names in users.items():
        export = exports[symbol]
        row = SymbolUsage(symbol, sorted(set(names)), export.export_type.value, export.provider,
                          symbol in stablelist)
        for line, lc in churn.items():
            record = lc.symbols.get(symbol)
            if record is not None:
                row.churn[line] = (record.changes, record.updates, record.last_change)
        rows.append(row)
    rows.sort(key=lambda r: (-len(r.modules), r.churn_rate, r.symbol))
    total = len({m.name for m in modules})
    for rank, row in enumerate(rows, 1):
        row.rank = rank
        row.why = explain(row, total)
    return rows


def explain(row: SymbolUsage, total_modules: int) -> str:
    parts = [f"used by {len(row.modules)} of {total_modules} modules"]
    for line, (changes, updates, last) in row.churn.items():
        if changes:
            parts.append(f"CRC changed in {changes} of {updates} updates of {line} "
                         f"(last in {last})")
        elif updates:
            parts.append(f"stable across {updates} updates of {line}")
    if row.stablelisted:
        parts.append("already stablelisted")
    return "; ".join(parts)


def module_coverage(
    modules: Iterable[ModuleInfo], exports: Mapping[str, Export], stablelist: frozenset[str]
) -> list[ModuleCoverage]:
    out = []
    for m in modules:
        used = kernel_symbols_used(m, exports)
        uncovered = sorted(used - stablelist)
        out.append(ModuleCoverage(m.name, len(used), len(used) - len(uncovered), uncovered))
    out.sort(key=lambda c: (c.share, c.module))
    return out


def propose_stablelist(
    usage: Sequence[SymbolUsage], coverage_target: float
) -> tuple[list[str], float]:
    """The fewest top-ranked symbols that, with those already listed, cover
    *coverage_target* of the corpus's symbol uses; and the coverage reached.

    A "use" is one (module, symbol) pair, so a symbol counts as often as
    modules need it: covering 90% of uses is what keeps most modules whole.
    """
    total = sum(len(r.modules) for r in usage)
    if total == 0:
        return [], 1.0
    covered = sum(len(r.modules) for r in usage if r.stablelisted)
    proposal: list[str] = []
    for row in usage:  # already in rank order
        if covered / total >= coverage_target:
            break
        if row.stablelisted:
            continue
        proposal.append(row.symbol)
        covered += len(row.modules)
    return sorted(proposal), covered / total
