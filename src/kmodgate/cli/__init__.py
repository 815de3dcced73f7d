"""The kmodgate command: parse, call the library, render, choose the exit code.

One module per command group (abi, advise, gate); this one holds what they share.

Exit codes: 0 every check passed, 1 something failed its check, 2 user error
(bad input), 3 infrastructure error.  Nothing below this module prints or exits.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from kmodgate import __version__
from kmodgate.errors import EXIT_INFRA_ERROR, EXIT_PASS, KmodgateError

app = typer.Typer(
    help="Gate kernel updates on the out-of-tree modules people depend on.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
inspect_app = typer.Typer(help="Show what kmodgate reads from kernels and modules.",
                          no_args_is_help=True)
app.add_typer(inspect_app, name="inspect")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
JobsOpt = Annotated[
    int | None, typer.Option("--jobs", "-j", help="Parallel workers (default: every core).")
]


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        out.print(f"kmodgate {__version__}")
        raise typer.Exit(EXIT_PASS)


def main() -> None:
    """Entry point: turn kmodgate's errors into one line and an exit code."""
    # The command groups register themselves on `app` when imported.
    from kmodgate.cli import abi, advise, gate, web  # noqa: F401

    try:
        app()
    except KmodgateError as exc:
        err.print(f"kmodgate: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("kmodgate: interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("KMODGATE_DEBUG"):
            raise
        err.print(f"kmodgate: internal error: {type(exc).__name__}: {exc} "
                  "(set KMODGATE_DEBUG=1 for the traceback)", markup=False, soft_wrap=True)
        sys.exit(EXIT_INFRA_ERROR)


if __name__ == "__main__":
    main()
