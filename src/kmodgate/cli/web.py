"""kmodgate serve: the dashboard and the REST API under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kmodgate.cli import app, err
from kmodgate.cli.gate import ConfigOpt, DbOpt, config_path
from kmodgate.config import load_config
from kmodgate.gate.service import Gate
from kmodgate.web.settings import load_web_settings


@app.command("serve")
def serve_cmd(
    config: ConfigOpt = None, db: DbOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but "
                                      "loopback should sit behind a TLS proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = 8080,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log",
                                             help="Log every request.")] = True,
) -> None:
    """Serve the dashboard and the REST API (/api/v1, OpenAPI at /api/v1/openapi.json)."""
    import uvicorn

    from kmodgate.web.app import create_app

    path: Path = config_path(config)
    settings = load_web_settings(path)
    gate = Gate.open(load_config(path), url=db)
    if not settings.tokens:
        err.print("kmodgate: note: no [[web.tokens]] configured: the dashboard is read-only",
                  markup=False)
    try:
        uvicorn.run(create_app(gate, settings), host=host, port=port,
                    access_log=access_log, log_level="info")
    finally:
        gate.close()
