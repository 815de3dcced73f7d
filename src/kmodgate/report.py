"""Results as JSON-ready data: one shape for the CLI's --json and, later, the web API."""

from __future__ import annotations

from typing import Any

from kmodgate.abi.compare import Verdict
from kmodgate.abi.diff import KernelDiff
from kmodgate.abi.model import KernelABI, ModuleInfo


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
