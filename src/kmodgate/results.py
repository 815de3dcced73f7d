"""One check result, whatever its kind: the record the store, the gate and the
notifications share.  Check engines (abi, build, load) each produce these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kmodgate.abi.compare import Outcome, Verdict

KINDS = ("abi", "build", "load")


@dataclass
class CheckResult:
    module: str  # module (or module source) name
    module_version: str  # package version, git commit, or the binary's sha256 prefix
    kernel: str  # kernel release, e.g. "6.1.0-56-amd64"
    kind: str  # one of KINDS
    outcome: Outcome
    # Each reason: {"code": ..., "message": ..., optional "symbol", "file", "line", ...}
    reasons: list[dict[str, Any]] = field(default_factory=list)
    # Hash of every input that decides the outcome (source/binary hash, kernel
    # ABI or tree identity, toolchain, recipe version); with kind, unique.
    fingerprint: str = ""
    reproducer: str = ""  # a command a maintainer can run by hand
    toolchain: str | None = None
    log_path: str | None = None  # compressed full log, when there is one
    artifacts: list[str] = field(default_factory=list)  # content-addressed built .ko paths
    duration_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific extras

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        return data


def abi_result(v: Verdict, fingerprint: str = "") -> CheckResult:
    """An abi verdict as a CheckResult."""
    m = v.module
    return CheckResult(
        module=m.name,
        module_version=(m.srcversion or (m.sha256 or "")[:12]),
        kernel=v.kernel.release,
        kind="abi",
        outcome=v.outcome,
        reasons=[r.to_json() for r in v.reasons],
        fingerprint=fingerprint,
        reproducer=f"kmodgate check --kind abi --kernel {v.kernel.origin} --module {m.path}",
        details={"module_path": m.path, "needs_modules": v.needs_modules},
    )
