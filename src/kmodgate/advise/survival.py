"""Survival: of the modules built for a base kernel, how many still load on each
later kernel of its line — and how many would, had a stablelist been kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kmodgate.abi.compare import MODULE_LAYOUT, Outcome, ReasonCode, Verdict, check_module
from kmodgate.abi.model import KernelABI, ModuleInfo

# Reasons a kABI promise on the symbol would have prevented.  module_layout is
# protected implicitly: a distribution keeping a stablelist keeps struct module
# stable too, or no kABI-tracking module would ever survive an update.
PROMISABLE = frozenset({ReasonCode.CRC_MISMATCH, ReasonCode.MISSING_SYMBOL,
                        ReasonCode.MODULE_LAYOUT})


@dataclass(frozen=True, slots=True)
class SurvivalPoint:
    release: str
    total: int
    loading: int  # pass the abi check as they are
    loading_if_kept: int  # would pass had the stablelist's symbols been kept stable

    @property
    def share(self) -> float:
        return self.loading / self.total if self.total else 1.0

    @property
    def share_if_kept(self) -> float:
        return self.loading_if_kept / self.total if self.total else 1.0


def survives_if_kept(verdict: Verdict, kept: frozenset[str]) -> bool:
    return all(
        r.code in PROMISABLE and (r.symbol in kept or r.symbol == MODULE_LAYOUT)
        for r in verdict.reasons
    )


def survival_curve(
    modules: Sequence[ModuleInfo], kernels: Sequence[KernelABI], kept: frozenset[str]
) -> list[SurvivalPoint]:
    """One point per kernel (the base first), each checked with the loader's rules."""
    points = []
    for kernel in kernels:
        verdicts = [check_module(m, kernel) for m in modules]
        loading = sum(1 for v in verdicts if v.outcome is Outcome.PASS)
        if_kept = sum(1 for v in verdicts if survives_if_kept(v, kept))
        points.append(SurvivalPoint(kernel.release, len(modules), loading, if_kept))
    return points
