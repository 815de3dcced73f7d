"""Regressions: for each module, check kind and kernel line, the first failing
kernel after the last passing one, what changed between them, and the kernel
where it passes again.

Only ``pass`` and ``fail`` are evidence: ``error`` (our infrastructure
failed), ``skip`` (not applicable) and missing results neither open nor close
a regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from kmodgate.abi.compare import Outcome, ReasonCode
from kmodgate.gate.streams import kernels_by_line
from kmodgate.store.models import Result
from kmodgate.store.queries import latest_results

# abi reasons that say a symbol the module uses changed or disappeared.
_SYMBOL_CHANGES = {
    ReasonCode.CRC_MISMATCH.value: "crc",
    ReasonCode.MISSING_SYMBOL.value: "removed",
    ReasonCode.GPL_ONLY.value: "gpl_only",
    ReasonCode.NAMESPACE.value: "namespace",
}


@dataclass
class Regression:
    module: str
    kind: str
    line: str
    first_bad: str
    last_good: str | None  # None: it never passed on this line
    fixed_in: str | None = None
    module_version: str = ""
    reasons: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    reproducer: str = ""
    log_path: str | None = None

    @property
    def is_open(self) -> bool:
        return self.fixed_in is None

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module, "kind": self.kind, "line": self.line,
            "first_bad": self.first_bad, "last_good": self.last_good,
            "fixed_in": self.fixed_in, "module_version": self.module_version,
            "reasons": self.reasons, "changes": self.changes,
            "reproducer": self.reproducer, "log_path": self.log_path,
        }


def what_changed(kind: str, reasons: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The change that broke the module, as far as the failing result tells.

    abi: the symbols it uses whose CRC changed or that disappeared (the
    loader checks every imported symbol, so a failure names exactly those);
    build and load: the first error, which is what a maintainer fixes first.
    """
    if kind == "abi":
        out = []
        for r in reasons:
            change = _SYMBOL_CHANGES.get(str(r.get("code")))
            if change is None or "symbol" not in r:
                continue
            entry = {"symbol": r["symbol"], "change": change}
            for key in ("required_crc", "provided_crc"):
                if key in r:
                    entry[key] = r[key]
            out.append(entry)
        if out:
            return out
    return [dict(reasons[0])] if reasons else []


def find_regressions(session: Session, *, modules: Sequence[str] | None = None,
                     kinds: Sequence[str] | None = None) -> list[Regression]:
    """Every regression, open or fixed, in module, kind, line and kernel order."""
    return [r for h in line_histories(session, modules=modules, kinds=kinds)
            for r in h["regressions"]]


def line_histories(session: Session, *, modules: Sequence[str] | None = None,
                   kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per (module, kind, line): the outcome on each kernel, oldest first, and
    the regressions found in that sequence."""
    lines = kernels_by_line(session)
    latest = latest_results(session, modules=modules, kinds=kinds)
    cells: dict[tuple[str, str], dict[str, Result]] = {}
    for (module, kernel, kind), result in latest.items():
        cells.setdefault((module, kind), {})[kernel] = result
    out: list[dict[str, Any]] = []
    for (module, kind), by_kernel in sorted(cells.items()):
        for line, kernels in lines.items():
            sequence = [(k.release, by_kernel[k.release]) for k in kernels
                        if k.release in by_kernel]
            if not sequence:
                continue
            out.append({
                "module": module, "kind": kind, "line": line,
                "kernels": [{"kernel": k, "outcome": r.outcome,
                             "module_version": r.module_version} for k, r in sequence],
                "regressions": _walk(module, kind, line, sequence),
            })
    return out


def _walk(module: str, kind: str, line: str,
          sequence: list[tuple[str, Result]]) -> list[Regression]:
    found: list[Regression] = []
    last_good: str | None = None
    current: Regression | None = None
    for kernel, result in sequence:
        if result.outcome == Outcome.PASS.value:
            if current is not None:
                current.fixed_in = kernel
                current = None
            last_good = kernel
        elif result.outcome == Outcome.FAIL.value and current is None:
            current = Regression(
                module=module, kind=kind, line=line, first_bad=kernel, last_good=last_good,
                module_version=result.module_version, reasons=list(result.reasons),
                changes=what_changed(kind, result.reasons), reproducer=result.reproducer,
                log_path=result.log_path,
            )
            found.append(current)
    return found


def module_history(session: Session, module: str) -> dict[str, Any]:
    """What ``kmodgate history MODULE`` shows: per kind and line, the outcome
    sequence and its regressions, each with first-bad, last-good and fix."""
    histories = line_histories(session, modules=[module])
    return {
        "module": module,
        "lines": [{**h, "regressions": [r.to_json() for r in h["regressions"]]}
                  for h in histories],
        "open": [r.to_json() for h in histories for r in h["regressions"] if r.is_open],
    }
