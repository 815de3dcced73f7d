"""Results as JSON-ready data: one shape for the CLI's --json and, later, the web API."""

from __future__ import annotations

from typing import Any

from kmodgate.abi.compare import Verdict
from kmodgate.abi.diff import KernelDiff
from kmodgate.abi.model import KernelABI, ModuleInfo
from kmodgate.advise.advice import Advice


def crc_text(crc: int | None) -> str | None:
    return None if crc is None else f"0x{crc:08x}"


def module_json(m: ModuleInfo) -> dict[str, Any]:
    return {
        "name": m.name,
        "path": m.path,
        "vermagic": m.vermagic,
        "license": m.license,
        "srcversion": m.srcversion,
        "depends": m.depends,
        "import_ns": m.import_ns,
        "machine": m.machine,
        "sha256": m.sha256,
        "versions": (
            None
            if m.versions is None
            else [{"symbol": s, "crc": crc_text(c)} for s, c in m.versions.items()]
        ),
        "exports": [
            {
                "symbol": e.symbol,
                "crc": crc_text(e.crc),
                "export_type": e.export_type.value,
                "namespace": e.namespace,
            }
            for e in m.exports
        ],
        "undefined": m.undefined,
        "weak_undefined": m.weak_undefined,
        "modinfo": [[k, v] for k, v in m.modinfo],
    }


def kernel_json(k: KernelABI) -> dict[str, Any]:
    return {
        "release": k.release,
        "origin": k.origin,
        "vermagic": k.vermagic,
        "machine": k.machine,
        "modversions": k.modversions,
        "cc_version_text": k.cc_version_text,
        "exports": len(k.exports),
        "exports_gpl": sum(1 for e in k.exports.values() if e.export_type.value.endswith("GPL")),
        "namespaces": sorted({e.namespace for e in k.exports.values() if e.namespace}),
    }


def verdict_json(v: Verdict, kind: str = "abi") -> dict[str, Any]:
    return {
        "module": v.module.name,
        "module_path": v.module.path,
        "kernel": v.kernel.release,
        "kernel_ref": v.kernel.origin,
        "kind": kind,
        "outcome": v.outcome.value,
        "reasons": [r.to_json() for r in v.reasons],
        "needs_modules": v.needs_modules,
    }


def diff_json(d: KernelDiff) -> dict[str, Any]:
    return {
        "old": d.old.release,
        "new": d.new.release,
        "counts": d.counts(),
        "changes": [c.to_json() for c in d.changes.values()],
        "impact": [
            {
                "module": new.module.name,
                "old_outcome": old.outcome.value,
                "new_outcome": new.outcome.value,
                "breaking_symbols": breaking,
                "reasons": [r.to_json() for r in new.reasons],
            }
            for old, new, breaking in d.impact
        ],
        "stablelisted_changes": [c.to_json() for c in d.stablelisted],
    }


def advice_json(a: Advice, top: int) -> dict[str, Any]:
    return {
        "base": a.base,
        "line": a.line,
        "reference": a.reference.release,
        "survival": [
            {"kernel": p.release, "modules": p.total, "loading": p.loading,
             "share": p.share, "loading_if_kept": p.loading_if_kept,
             "share_if_kept": p.share_if_kept}
            for p in a.survival
        ],
        "churn": {
            line: {
                "kernels": lc.releases,
                "changed_per_update": lc.changed_per_update,
                "subsystems": dict(lc.subsystem_changes(a.reference).most_common(top)),
            }
            for line, lc in a.churn.items()
        },
        "symbols": [
            {"rank": u.rank, "symbol": u.symbol, "modules": u.modules, "users": len(u.modules),
             "export_type": u.export_type, "provider": u.provider,
             "stablelisted": u.stablelisted, "crc_changes": u.changes, "updates": u.updates,
             "churn": {line: {"changes": c, "updates": n, "last_change": last}
                       for line, (c, n, last) in u.churn.items()},
             "why": u.why}
            for u in a.usage[:top]
        ],
        "symbols_total": len(a.usage),
        "coverage": [
            {"module": c.module, "used": c.used, "covered": c.covered, "share": c.share,
             "uncovered": c.uncovered}
            for c in a.coverage
        ],
        "proposal": {"symbols": a.proposal, "coverage": a.proposal_coverage,
                     "target": a.coverage_target},
    }
