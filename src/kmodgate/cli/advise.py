"""The advise command: stablelist advice, churn and survival."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kmodgate.abi.stablelist import parse_stablelist
from kmodgate.advise.advice import Advice
from kmodgate.cli import JobsOpt, JsonOpt, app, emit_json, err, out
from kmodgate.cli.gate import ConfigOpt, DbOpt, config_path, open_gate
from kmodgate.config import load_config
from kmodgate.errors import UserError


@app.command("advise")
def advise_cmd(
    kernel_refs: Annotated[list[str], typer.Option("--kernel", "-k", help="Kernels of the "
                           "line(s); debian-line:6.1/amd64 names every release of a line.")],
    module_refs: Annotated[list[str], typer.Option("--module", "-m", help="Module binaries "
                           "(the corpus), built for one kernel of the line.")],
    base: Annotated[str | None, typer.Option("--base", help="The kernel the corpus was built "
                    "for (default: the one most of it loads on).")] = None,
    stablelist: Annotated[Path | None, typer.Option("--stablelist",
                          help="The stablelist in force (RHEL kabi_stablelist format).")] = None,
    coverage: Annotated[float, typer.Option("--coverage", help="Share of the corpus's symbol "
                        "uses the proposal must cover.")] = 0.9,
    top: Annotated[int, typer.Option("--top", help="Rows per table.")] = 20,
    fmt: Annotated[str, typer.Option("--format", help="table, or stablelist to print the "
                   "proposal in kabi_stablelist format.")] = "table",
    plots: Annotated[Path | None, typer.Option("--plots", help="Write survival and churn "
                     "plots (PNG, SVG) here.")] = None,
    record: Annotated[bool, typer.Option("--record", help="Keep the report in the store, "
                      "for the dashboard's advice page.")] = False,
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
    jobs: JobsOpt = None,
) -> None:
    """Stablelist advice, churn and survival from real module data."""
    from kmodgate.advise.advice import advise, proposed_stablelist
    from kmodgate.advise.plots import advice_figures, save
    from kmodgate.report import advice_json
    from kmodgate.sources.files import read_file
    from kmodgate.sources.kernels import expand_kernel_refs, load_kernel
    from kmodgate.sources.modules import load_modules

    if fmt not in ("table", "stablelist"):
        raise UserError(f"unknown format {fmt!r}: expected table or stablelist")
    if record:  # a configuration that cannot work says so before minutes of reading
        load_config(config_path(config))
    kernels = [load_kernel(r) for r in expand_kernel_refs(kernel_refs)]
    modules = load_modules(module_refs, jobs=jobs)
    listed: frozenset[str] = frozenset()
    if stablelist is not None:
        listed = parse_stablelist(read_file(stablelist).decode("utf-8", "replace"),
                                  str(stablelist)).symbols
    a = advise(kernels, modules, base=base, stablelist=listed, coverage_target=coverage)
    if plots is not None:
        for name, figure in advice_figures(a, len(modules), top).items():
            save(figure, plots / name)
    if record:
        # Imported only here: the store costs the command a second of SQLAlchemy.
        from kmodgate.advise.record import record_advice
        from kmodgate.gate.service import utcnow

        with open_gate(config, db) as gate:
            report = record_advice(gate.store, a, modules, utcnow())
        err.print(f"advice recorded as report {report}: the dashboard shows it at /advice")
    if fmt == "stablelist":
        sys.stdout.write(proposed_stablelist(a, modules))
        return
    if as_json:
        emit_json(advice_json(a, top))
        return
    render_advice(a, len(modules), top, bool(listed))


def render_advice(a: Advice, corpus: int, top: int, has_stablelist: bool) -> None:
    out.print(f"{corpus} modules built for {a.base}; survival along {a.line}:", soft_wrap=True)
    table = Table("kernel", "still load", "had the stablelist been kept")
    for p in a.survival:
        table.add_row(p.release, f"{p.loading} ({100 * p.share:.0f}%)",
                      f"{p.loading_if_kept} ({100 * p.share_if_kept:.0f}%)")
    out.print(table)
    for line, lc in a.churn.items():
        out.print(f"{line}: CRC changes per update {lc.changed_per_update}", soft_wrap=True)
    table = Table("rank", "symbol", "modules", "why")
    for u in a.usage[:top]:
        table.add_row(str(u.rank), u.symbol, str(len(u.modules)), u.why)
    out.print(table)
    if has_stablelist:
        table = Table("module", "covered", "not covered (first)")
        for c in a.coverage[:top]:
            table.add_row(c.module, f"{c.covered}/{c.used} ({100 * c.share:.0f}%)",
                          ", ".join(c.uncovered[:4]))
        out.print(table)
    out.print(f"proposal: {len(a.proposal)} symbols; with those already listed they cover "
              f"{100 * a.proposal_coverage:.1f}% of the corpus's symbol uses "
              f"(target {100 * a.coverage_target:.0f}%); --format stablelist prints it",
              soft_wrap=True)
