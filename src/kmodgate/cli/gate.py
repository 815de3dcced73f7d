"""The gate's commands: decide, promote, pin, status, waivers, history."""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from kmodgate.cli import JsonOpt, app, emit_json, out
from kmodgate.config import DEFAULT_CONFIG_NAME, load_config, parse_duration
from kmodgate.errors import EXIT_FAIL, EXIT_PASS, UserError

if TYPE_CHECKING:
    # The gate pulls in SQLAlchemy (about a second to import): only the
    # commands that open a store pay for it, not `inspect` or `check`.
    from kmodgate.gate.service import Gate

gate_app = typer.Typer(help="Release streams: decisions, promotions, pins, waivers.",
                       no_args_is_help=True)
app.add_typer(gate_app, name="gate")

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help=f"The configuration (default: $KMODGATE_CONFIG or ./"
                           f"{DEFAULT_CONFIG_NAME}).")]
DbOpt = Annotated[str | None, typer.Option("--db", help="Store URL, overriding the "
                                           "configuration (sqlite:///…, postgresql://…).")]
AuthorOpt = Annotated[str | None, typer.Option("--author", help="Who does it (default: the "
                                               "login name); recorded for the audit.")]


def config_path(given: Path | None) -> Path:
    return given or Path(os.environ.get("KMODGATE_CONFIG", DEFAULT_CONFIG_NAME))


@contextmanager
def open_gate(config: Path | None, db: str | None) -> Iterator[Gate]:
    from kmodgate.gate.service import Gate

    gate = Gate.open(load_config(config_path(config)), url=db)
    try:
        yield gate
    finally:
        gate.close()


def author_of(given: str | None) -> str:
    if given:
        return given
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


@gate_app.command("decide")
def decide_cmd(
    kernel: Annotated[str, typer.Argument(help="Kernel release, e.g. 6.1.0-56-amd64.")],
    stream: Annotated[str, typer.Option("--stream", "-s", help="The stream to enter.")],
    config: ConfigOpt = None, db: DbOpt = None, as_json: JsonOpt = False,
) -> None:
    """May KERNEL enter the stream now? Exit 0 if allowed, 1 if not."""
    with open_gate(config, db) as gate:
        decision = gate.decide(kernel, stream)
    data = decision.to_json()
    if as_json:
        emit_json(data)
    else:
        render_decision(data)
    raise typer.Exit(EXIT_PASS if decision.allowed else EXIT_FAIL)


def render_decision(d: dict[str, Any]) -> None:
    verdict = "[green]allowed[/]" if d["allowed"] else "[red]not allowed[/]"
    out.print(f"{d['kernel']} into {d['stream']} ({d['line']}): {verdict}", soft_wrap=True)
    for blocker in d.get("blockers") or []:
        out.print(f"  blocked: {blocker}", soft_wrap=True)
    if d["unsatisfied"]:
        table = Table("module", "kind", "outcome", "reason")
        for u in d["unsatisfied"]:
            reasons = u.get("reasons") or []
            first = reasons[0].get("message", "") if reasons else ""
            table.add_row(u["module"], u["kind"], u["outcome"] or "missing", first)
        out.print(table)
    for w in d["waived"]:
        out.print(f"  waived: {w['module']} {w['kind']} ({w['outcome']}) by waiver "
                  f"{w.get('waiver')}", soft_wrap=True)


@gate_app.command("promote")
def promote_cmd(
    kernel: Annotated[str, typer.Argument(help="Kernel release.")],
    to: Annotated[str, typer.Option("--to", help="The stream to promote into.")],
    force: Annotated[bool, typer.Option("--force", help="Override a refusing decision "
                                        "(needs --reason; audited).")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (required with --force).")] = "",
    author: AuthorOpt = None, config: ConfigOpt = None, db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record KERNEL entering a stream, only if the decision allows it (or --force)."""
    if force and not reason.strip():
        raise UserError("--force needs --reason: overrides are audited")
    with open_gate(config, db) as gate:
        done = gate.promote(kernel, to, author=author_of(author), force=force, reason=reason)
    if as_json:
        emit_json(done)
        return
    out.print(f"promoted {done['kernel']} into {done['stream']} ({done['line']}) "
              f"via {done['via']}", soft_wrap=True)


@gate_app.command("pin")
def pin_cmd(
    stream: Annotated[str, typer.Argument(help="The stream to hold.")],
    kernel: Annotated[str, typer.Argument(help="The kernel to hold it on.")],
    reason: Annotated[str, typer.Option("--reason", help="Why.")],
    author: AuthorOpt = None, config: ConfigOpt = None, db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Hold a stream on a kernel until unpinned (also rolls the stream back to it)."""
    with open_gate(config, db) as gate:
        done = gate.pin(stream, kernel, author=author_of(author), reason=reason)
    emit_json(done) if as_json else out.print(f"{stream} pinned to {kernel}", soft_wrap=True)


@gate_app.command("unpin")
def unpin_cmd(
    stream: Annotated[str, typer.Argument(help="The stream to release.")],
    author: AuthorOpt = None, config: ConfigOpt = None, db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let a pinned stream move again."""
    with open_gate(config, db) as gate:
        done = gate.unpin(stream, author=author_of(author))
    emit_json(done) if as_json else out.print(f"{stream} unpinned", soft_wrap=True)


@gate_app.command("status")
def status_cmd(config: ConfigOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Each stream's current kernel per line, its pin, and what blocks the candidates."""
    with open_gate(config, db) as gate:
        streams = gate.status()
    if as_json:
        emit_json({"streams": streams})
        return
    table = Table("stream", "line", "current", "pin", "candidates")
    for s in streams:
        for line in s["lines"]:
            cands = "\n".join(
                f"{c['kernel']}: " + ("allowed" if c["allowed"] else
                                      "; ".join(c["blockers"][:2]) or "blocked")
                for c in line["candidates"]
            )
            pin = line["pin"]["kernel"] if line["pin"] else ""
            table.add_row(s["stream"], line["line"], line["current"] or "-", pin, cands)
    out.print(table)


@gate_app.command("waive")
def waive_cmd(
    module: Annotated[str, typer.Option("--module", help="Module name or glob.")],
    reason: Annotated[str, typer.Option("--reason", help="Why the failure is acceptable.")],
    kernel: Annotated[str, typer.Option("--kernel", help="Kernel release glob.")] = "*",
    kind: Annotated[str, typer.Option("--kind", help="Check kind or *.")] = "*",
    expires: Annotated[str | None, typer.Option("--expires", help="Lifetime, e.g. 7d, "
                                                "12h.")] = None,
    author: AuthorOpt = None, config: ConfigOpt = None, db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accept a module's failure on matching kernels, with a reason and an expiry."""
    from kmodgate.gate.waivers import WaiverScope

    duration = None
    if expires is not None:
        duration = parse_duration(expires)
        if duration is None:
            raise UserError(f"--expires: expected a duration like 7d or 12h, got {expires!r}")
    with open_gate(config, db) as gate:
        done = gate.waive(WaiverScope(module, kernel, kind), reason=reason,
                          author=author_of(author), duration=duration)
    emit_json(done) if as_json else out.print(f"waiver {done['id']} added", soft_wrap=True)


@gate_app.command("waivers")
def waivers_cmd(
    all_: Annotated[bool, typer.Option("--all", help="Include expired and revoked.")] = False,
    config: ConfigOpt = None, db: DbOpt = None, as_json: JsonOpt = False,
) -> None:
    """List the waivers in force."""
    with open_gate(config, db) as gate:
        rows = gate.waivers(include_inactive=all_)
    if as_json:
        emit_json({"waivers": rows})
        return
    table = Table("id", "module", "kernel", "kind", "reason", "author", "expires")
    for w in rows:
        table.add_row(str(w["id"]), w["module"], w["kernel_pattern"], w["kind"], w["reason"],
                      w["author"], str(w.get("expires_at") or "never"))
    out.print(table)


@gate_app.command("revoke")
def revoke_cmd(
    waiver_id: Annotated[int, typer.Argument(help="The waiver's id.")],
    config: ConfigOpt = None, db: DbOpt = None,
) -> None:
    """Withdraw a waiver."""
    with open_gate(config, db) as gate:
        gate.revoke_waiver(waiver_id)
    out.print(f"waiver {waiver_id} revoked")


@app.command("history")
def history_cmd(
    module: Annotated[str, typer.Argument(help="A tracked module's name.")],
    config: ConfigOpt = None, db: DbOpt = None, as_json: JsonOpt = False,
) -> None:
    """A module along each kernel line: last good, first bad, what changed, the fix."""
    with open_gate(config, db) as gate:
        data = gate.history(module)
    if as_json:
        emit_json(data)
        return
    table = Table("kind", "line", "last good", "first bad", "what changed", "fixed in")
    for line in data["lines"]:
        for r in line["regressions"]:
            changes = "; ".join(str(c.get("message") or c.get("symbol") or c)
                                for c in (r.get("changes") or [])[:3])
            table.add_row(r["kind"], r["line"], r.get("last_good") or "-", r["first_bad"],
                          changes, r.get("fixed_in") or "open")
    out.print(table)
    open_count = len(data["open"])
    out.print(f"{module}: {open_count} open regression{'s' if open_count != 1 else ''}")


@app.command("sync")
def sync_cmd(
    config: ConfigOpt = None, db: DbOpt = None, as_json: JsonOpt = False,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Parallel compile jobs "
                                             "(default: every core).")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep syncing.")] = False,
    interval: Annotated[str, typer.Option("--interval", help="Pause between passes with "
                                          "--watch, e.g. 30m, 1h.")] = "1h",
) -> None:
    """Find new kernels and module versions, run the missing checks, record them,
    and notify; idempotent, and safe to kill and rerun."""
    from kmodgate.sync import sync

    pause = parse_duration(interval)
    if pause is None or pause.total_seconds() <= 0:
        raise UserError(f"--interval: expected a duration like 30m or 1h, got {interval!r}")
    while True:
        with open_gate(config, db) as gate:
            report = sync(gate, jobs=jobs)
        if as_json:
            emit_json(report.to_json())
        else:
            outcomes = ", ".join(f"{n} {k}" for k, n in sorted(report.outcomes.items()))
            out.print(f"{len(report.kernels)} kernels; results "
                      f"{report.results.get('new', 0)} new, "
                      f"{report.results.get('unchanged', 0)} unchanged ({outcomes or 'none'}); "
                      f"{len(report.events)} events, {report.delivered} notifications sent",
                      soft_wrap=True)
            for e in report.events:
                out.print(f"  {e['kind']}: {e['key']}", soft_wrap=True)
        if not watch:
            return
        time.sleep(pause.total_seconds())
