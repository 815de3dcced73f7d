"""The whole advice for one corpus of module binaries and a set of kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kmodgate.abi.compare import Outcome, check_module
from kmodgate.abi.model import KernelABI, ModuleInfo
from kmodgate.abi.stablelist import format_stablelist
from kmodgate.advise.churn import LineChurn, line_churn
from kmodgate.advise.survival import SurvivalPoint, survival_curve
from kmodgate.advise.usage import (
    ModuleCoverage,
    SymbolUsage,
    line_exports,
    module_coverage,
    propose_stablelist,
    symbol_usage,
)
from kmodgate.errors import UserError
from kmodgate.lines import kernel_line, release_sort_key


@dataclass(slots=True)
class Advice:
    base: str  # the kernel the corpus was built for
    line: str  # the base's line, along which survival is measured
    churn: dict[str, LineChurn]
    usage: list[SymbolUsage]
    coverage: list[ModuleCoverage]  # against the given stablelist
    proposal: list[str]
    proposal_coverage: float  # share of symbol uses covered by given + proposed
    coverage_target: float
    survival: list[SurvivalPoint]
    reference: KernelABI  # the newest kernel of the line: providers and export types

    @property
    def kept(self) -> frozenset[str]:
        return frozenset(self.proposal) | {u.symbol for u in self.usage if u.stablelisted}


def find_base(modules: Sequence[ModuleInfo], kernels: Sequence[KernelABI]) -> KernelABI:
    """The kernel the corpus was built for: the one most of it loads on (oldest on a tie)."""
    oldest_first = sorted(kernels, key=lambda k: release_sort_key(k.release))
    # max() keeps the first of equal maxima, so a tie goes to the oldest kernel.
    return max(
        oldest_first,
        key=lambda k: sum(check_module(m, k).outcome is Outcome.PASS for m in modules),
    )


def advise(
    kernels: Sequence[KernelABI],
    modules: Sequence[ModuleInfo],
    *,
    base: str | None = None,
    stablelist: frozenset[str] = frozenset(),
    coverage_target: float = 0.9,
) -> Advice:
    if not kernels or not modules:
        raise UserError("advice needs at least one kernel and one module")
    if not 0.0 < coverage_target <= 1.0:
        raise UserError(f"coverage target {coverage_target} is not in (0, 1]")
    lines: dict[str, list[KernelABI]] = {}
    for k in sorted(kernels, key=lambda k: release_sort_key(k.release)):
        lines.setdefault(kernel_line(k.release), []).append(k)
    churn = {line: line_churn(line, ks) for line, ks in lines.items()}

    if base is None:
        base_kernel = find_base(modules, kernels)
    else:
        found = [k for k in kernels if k.release == base or k.origin == base]
        if not found:
            raise UserError(f"the base kernel {base!r} is not among the kernels given")
        base_kernel = found[0]
    line = kernel_line(base_kernel.release)
    along = lines[line]
    later = along[along.index(base_kernel):]
    reference = along[-1]

    exports = line_exports(along)
    usage = symbol_usage(modules, exports, churn, stablelist)
    proposal, reached = propose_stablelist(usage, coverage_target)
    kept = frozenset(proposal) | stablelist
    return Advice(
        base=base_kernel.release,
        line=line,
        churn=churn,
        usage=usage,
        coverage=module_coverage(modules, exports, stablelist),
        proposal=proposal,
        proposal_coverage=reached,
        coverage_target=coverage_target,
        survival=survival_curve(modules, later, kept),
        reference=reference,
    )


def proposed_stablelist(a: Advice, modules: Sequence[ModuleInfo]) -> str:
    """The stablelist kept plus proposed, in kabi_stablelist format."""
    # A bare Module.symvers does not say its architecture; the modules' ELF does.
    machine = a.reference.machine or next((m.machine for m in modules if m.machine),
                                          "unknown")
    return format_stablelist(f"kmodgate_{machine}_stablelist", sorted(a.kept))
