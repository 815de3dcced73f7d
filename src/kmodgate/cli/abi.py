"""Commands of the abi engine: kernels, inspect, check, diff."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kmodgate.abi.compare import Outcome, Verdict, check_module, companion_exports
from kmodgate.abi.diff import Change, diff_kernels
from kmodgate.abi.model import KernelABI, ModuleInfo
from kmodgate.abi.stablelist import parse_stablelist
from kmodgate.cli import JobsOpt, JsonOpt, app, emit_json, err, inspect_app, out
from kmodgate.errors import EXIT_FAIL, EXIT_INFRA_ERROR, EXIT_PASS, UserError
from kmodgate.report import diff_json, kernel_json, module_json, verdict_json
from kmodgate.results import CheckResult
from kmodgate.sources.module_sources import is_source_ref


@app.command("kernels")
def kernels_cmd(
    available: Annotated[
        bool, typer.Option("--available", help="List the kernel builds the archive offers.")
    ] = False,
    flavour: Annotated[
        str | None, typer.Option("--flavour", help="Only this flavour, e.g. amd64, cloud-amd64.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List kernel builds: with --available, those the host's apt sources offer."""
    from kmodgate.sources import debian

    if not available:
        raise UserError("nothing to list yet: use --available")
    releases = debian.available_kernel_releases(flavour)
    if as_json:
        emit_json({"kernels": [{"ref": f"debian:{r}", "release": r} for r in releases]})
        return
    for r in releases:
        out.print(f"debian:{r}")


@inspect_app.command("module")
def inspect_module(
    refs: Annotated[list[str], typer.Argument(help="Module references (.ko, dir, .deb, .rpm, "
                                                   "debian-image:<release>).")],
    as_json: JsonOpt = False,
    jobs: JobsOpt = None,
) -> None:
    """What the module loader reads from each module: modinfo, __versions, exports."""
    from kmodgate.sources.modules import load_modules

    modules = load_modules(refs, jobs=jobs)
    if as_json:
        emit_json({"modules": [module_json(m) for m in modules]})
        return
    table = Table("module", "vermagic", "license", "depends", "versions", "exports", "undefined")
    for m in modules:
        table.add_row(
            m.name, m.vermagic or "-", m.license or "-", ",".join(m.depends) or "-",
            "-" if m.versions is None else str(len(m.versions)), str(len(m.exports)),
            str(len(m.undefined)),
        )
    out.print(table)


@inspect_app.command("kernel")
def inspect_kernel(
    refs: Annotated[list[str], typer.Argument(help="Kernel references (debian:<release>, "
                                                   "Module.symvers, headers tree, .deb, .rpm).")],
    as_json: JsonOpt = False,
) -> None:
    """What a kernel build offers modules: release, vermagic, exports."""
    from kmodgate.sources.kernels import load_kernel

    kernels = [load_kernel(r) for r in refs]
    if as_json:
        emit_json({"kernels": [kernel_json(k) for k in kernels]})
        return
    table = Table("kernel", "vermagic", "exports", "GPL-only", "compiler")
    for k in kernels:
        data = kernel_json(k)
        table.add_row(k.release, k.vermagic or "-", str(data["exports"]),
                      str(data["exports_gpl"]), k.cc_version_text or "-")
    out.print(table)


@app.command("check")
def check_cmd(
    kernel_refs: Annotated[list[str], typer.Option("--kernel", "-k", help="Kernel reference; "
                                                   "repeat for several.")],
    module_refs: Annotated[list[str], typer.Option("--module", "-m", help="Module reference; "
                                                   "repeat for several.")],
    kind: Annotated[str, typer.Option("--kind", help="abi, build or load.")] = "abi",
    compare_abi: Annotated[bool, typer.Option("--compare-abi", help="With --kind load: "
                           "compare the kernel's verdicts with the abi check's.")] = False,
    as_json: JsonOpt = False,
    jobs: JobsOpt = None,
) -> None:
    """Check every module against every kernel; exit 1 if any fails."""
    from kmodgate.sources.kernels import expand_kernel_refs, load_kernel
    from kmodgate.sources.modules import load_module_ref

    if kind not in ("abi", "build", "load"):
        raise UserError(f"unknown check kind {kind!r}: expected abi, build or load")
    kernel_refs = expand_kernel_refs(kernel_refs)
    if kind == "build" or any(is_source_ref(r) for r in module_refs):
        check_sources(kind, kernel_refs, module_refs, as_json, jobs)
        return
    if kind == "load":
        check_load(kernel_refs, module_refs, compare_abi, as_json, jobs)
        return
    kernels = [load_kernel(r) for r in kernel_refs]
    groups = [(r, load_module_ref(r, jobs=jobs)) for r in module_refs]
    cells: list[tuple[str, KernelABI, list[Verdict]]] = []
    for kernel in kernels:
        for ref, group in groups:
            # Modules named by one reference are loaded together (a package's
            # several .ko files), so they may use each other's exports.
            extra = companion_exports(group)
            cells.append((ref, kernel, [check_module(m, kernel, extra) for m in group]))
    verdicts = [v for _, _, vs in cells for v in vs]
    failed = any(v.outcome is Outcome.FAIL for v in verdicts)
    if as_json:
        emit_json({
            "results": [verdict_json(v) for v in verdicts],
            "summary": dict(Counter(v.outcome.value for v in verdicts)),
        })
    else:
        render_verdicts(verdicts)
        for ref, kernel, vs in cells:
            out.print(survival_line(ref, kernel, vs), soft_wrap=True)
    raise typer.Exit(EXIT_FAIL if failed else EXIT_PASS)


def check_sources(kind: str, kernel_refs: list[str], source_refs: list[str], as_json: bool,
                  jobs: int | None) -> None:
    """Build every source against every kernel; with --kind abi, check the binaries
    built for each kernel against every kernel (the carry-over question)."""
    from rich.progress import Progress

    from kmodgate.build.carryover import carryover
    from kmodgate.build.matrix import run_build_matrix
    from kmodgate.sources.kernels import load_kernel

    bad = [r for r in source_refs if not is_source_ref(r)]
    if bad:
        raise UserError(f"{bad[0]}: not a module source (a -dkms package, a directory with "
                        "dkms.conf, git+<repo>@<ref>, a tarball); --kind build needs sources")
    total = len(kernel_refs) * len(source_refs)
    with Progress(console=err, transient=True, disable=as_json) as progress:
        task = progress.add_task("building", total=total)

        def advance(result: CheckResult) -> None:
            progress.advance(task)
            progress.update(task, description=f"{result.module} on {result.kernel}")

        builds = run_build_matrix(kernel_refs, source_refs, jobs=jobs, on_result=advance)
    results = builds
    if kind == "abi":
        results = list(carryover(builds, [load_kernel(r) for r in kernel_refs]))
    elif kind == "load":
        from kmodgate.boot.grouping import load_builds

        results = [r for ref, release in zip(kernel_refs, _releases(kernel_refs), strict=True)
                   for r in load_builds(ref, [b for b in builds if b.kernel == release])]
    if as_json:
        emit_json({"results": [r.to_json() for r in results],
                   "summary": dict(Counter(r.outcome.value for r in results))})
    else:
        render_result_matrix(results, by_built_for=kind == "abi")
    outcomes = {r.outcome for r in results}
    raise typer.Exit(EXIT_FAIL if Outcome.FAIL in outcomes else
                     EXIT_INFRA_ERROR if Outcome.ERROR in outcomes else EXIT_PASS)


def _releases(kernel_refs: list[str]) -> list[str]:
    from kmodgate.sources.kernels import load_kernel

    return [load_kernel(r).release for r in kernel_refs]


def check_load(kernel_refs: list[str], module_refs: list[str], compare_abi: bool,
               as_json: bool, jobs: int | None) -> None:
    """Boot every kernel once with every module and let the kernel decide."""
    from kmodgate.boot.loadcheck import agreement, run_load_matrix
    from kmodgate.results import abi_result
    from kmodgate.sources.kernels import load_kernel
    from kmodgate.sources.modules import load_module_ref

    modules = [m for r in module_refs for m in load_module_ref(r, jobs=jobs)]
    unloadable = [m.path for m in modules if not Path(m.path).is_file()]
    if unloadable:
        raise UserError("only module files can be loaded in a VM (unpack the package first)",
                        where=unloadable[0])
    results = run_load_matrix(kernel_refs, [Path(m.path) for m in modules], jobs=jobs)
    report = None
    if compare_abi:
        abi = [abi_result(check_module(m, k, companion_exports(modules)))
               for k in (load_kernel(r) for r in kernel_refs) for m in modules]
        report = agreement(abi, results)
    if as_json:
        data = {"results": [r.to_json() for r in results],
                "summary": dict(Counter(r.outcome.value for r in results))}
        if report is not None:
            data["agreement"] = report.to_json()
        emit_json(data)
    else:
        render_result_matrix(results, by_built_for=False)
        for line in report.summary_lines() if report is not None else []:
            out.print(line, soft_wrap=True)
    outcomes = {r.outcome for r in results}
    raise typer.Exit(EXIT_FAIL if Outcome.FAIL in outcomes else
                     EXIT_INFRA_ERROR if Outcome.ERROR in outcomes else EXIT_PASS)


def render_result_matrix(results: list[CheckResult], *, by_built_for: bool) -> None:
    """Modules (or, for carry-over, builds) down, kernels across, first reason below."""
    kernels = list(dict.fromkeys(r.kernel for r in results))

    def row_key(r: CheckResult) -> str:
        return f"{r.module} (built for {r.details['built_for']})" if by_built_for else r.module

    rows: dict[str, dict[str, CheckResult]] = {}
    for r in results:
        rows.setdefault(row_key(r), {})[r.kernel] = r
    colours = {"pass": "green", "fail": "red", "skip": "yellow", "error": "magenta"}
    table = Table("module", *kernels)
    for name, cells in rows.items():
        row = []
        for k in kernels:
            cell = cells.get(k)
            if cell is None:
                row.append("")
                continue
            text = f"[{colours[cell.outcome.value]}]{cell.outcome.value}[/]"
            if cell.reasons:
                text += "\n" + str(cell.reasons[0].get("message", ""))[:120]
            row.append(text)
        table.add_row(name, *row)
    out.print(table)
    for r in results:
        if r.outcome in (Outcome.FAIL, Outcome.ERROR) and r.reproducer:
            out.print(f"reproduce {r.module} on {r.kernel}: {r.reproducer}", soft_wrap=True)


# Past this many rows a table stops being read: show failures and a summary.
MAX_TABLE_ROWS = 40


def render_verdicts(verdicts: list[Verdict]) -> None:
    shown = verdicts if len(verdicts) <= MAX_TABLE_ROWS else [
        v for v in verdicts if v.outcome is not Outcome.PASS
    ][:MAX_TABLE_ROWS]
    if not shown:
        return
    table = Table("module", "kernel", "outcome", "reasons")
    for v in shown:
        colour = "green" if v.outcome is Outcome.PASS else "red"
        reasons = "\n".join(r.message for r in v.reasons[:3])
        if len(v.reasons) > 3:
            reasons += f"\n… and {len(v.reasons) - 3} more"
        table.add_row(v.module.name, v.kernel.release, f"[{colour}]{v.outcome.value}[/]", reasons)
    out.print(table)
    hidden = sum(1 for v in verdicts if v.outcome is not Outcome.PASS) - len(
        [v for v in shown if v.outcome is not Outcome.PASS])
    if hidden > 0:
        out.print(f"… {hidden} more failing results (use --json for all)")


def survival_line(ref: str, kernel: KernelABI, verdicts: list[Verdict]) -> str:
    """"Of N modules from REF, M load on KERNEL", and the commonest reason if not all."""
    passed = sum(1 for v in verdicts if v.outcome is Outcome.PASS)
    line = f"{ref} on {kernel.release}: {passed} of {len(verdicts)} modules load"
    codes = Counter(v.reasons[0].code.value for v in verdicts if v.reasons)
    if codes:
        code, n = codes.most_common(1)[0]
        line += f" ({n} refused first for {code.replace('_', ' ')})"
    return line


@app.command("diff")
def diff_cmd(
    old_ref: Annotated[str, typer.Argument(metavar="OLD", help="The kernel built for.")],
    new_ref: Annotated[str, typer.Argument(metavar="NEW", help="The kernel to move to.")],
    module_refs: Annotated[list[str] | None, typer.Option("--module", "-m",
                           help="Show the impact on these modules.")] = None,
    stablelist: Annotated[Path | None, typer.Option("--stablelist",
                          help="RHEL kabi_stablelist file: exit 1 if a listed symbol "
                               "changed.")] = None,
    as_json: JsonOpt = False,
    jobs: JobsOpt = None,
) -> None:
    """What changed in the exported ABI between two kernels, and whom it breaks."""
    from kmodgate.sources.files import read_file
    from kmodgate.sources.kernels import load_kernel
    from kmodgate.sources.modules import load_modules

    old, new = load_kernel(old_ref), load_kernel(new_ref)
    modules: list[ModuleInfo] = load_modules(module_refs or [], jobs=jobs)
    listed = None
    if stablelist is not None:
        listed = parse_stablelist(read_file(stablelist).decode("utf-8", "replace"),
                                  str(stablelist))
    d = diff_kernels(old, new, modules, listed)
    broken = [new_v for old_v, new_v, _ in d.impact
              if old_v.outcome is Outcome.PASS and new_v.outcome is Outcome.FAIL]
    failed = bool(d.stablelisted) or bool(broken)
    if as_json:
        emit_json(diff_json(d))
        raise typer.Exit(EXIT_FAIL if failed else EXIT_PASS)
    counts = d.counts()
    out.print(f"{old.release} -> {new.release}: " + ", ".join(
        f"{n} {c.value.replace('_', ' ')}" for c in Change if (n := counts[c.value])
    ) or "no ABI changes")
    if d.impact:
        table = Table("module", f"on {old.release}", f"on {new.release}", "changed symbols used")
        for old_v, new_v, breaking in d.impact:
            table.add_row(new_v.module.name, old_v.outcome.value, new_v.outcome.value,
                          ", ".join(breaking[:8]) + (" …" if len(breaking) > 8 else ""))
        out.print(table)
    if listed is not None:
        if d.stablelisted:
            out.print(f"[red]{len(d.stablelisted)} stablelisted symbols changed:[/]")
            for c in d.stablelisted:
                out.print(f"  {c.symbol}: {', '.join(x.value for x in c.changes)}")
        else:
            out.print("[green]no stablelisted symbol changed[/]")
    raise typer.Exit(EXIT_FAIL if failed else EXIT_PASS)
