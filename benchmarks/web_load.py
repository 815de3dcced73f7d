#!/usr/bin/env python3
"""The dashboard and the decision endpoint on a store of realistic size.

Builds a store of 30 modules × 100 kernels (two lines) × 3 kinds, each cell
with eleven older results (module versions) besides the latest: 108,000 results.
Then, with the application under uvicorn in its own process on loopback:

1. the matrix page (default page: 25 kernels; and one whole line of 60
   kernels), 30 requests each, latency percentiles (target: under 300 ms);
2. POST /api/v1/decision at an open-loop rate of 200 requests per second for
   10 seconds (latency counted from each request's scheduled time, so a
   stalled server cannot hide its queue), percentiles (target: p95 under 50 ms),
   four times: right after start (while the server warms its decision cache),
   warm, just after a waiver is added (every kernel's cached facts stale), and
   while another process records new results as a sync would (ten
   transactions a second on random kernels, each invalidating that kernel's
   cached facts).

Figures are printed, not asserted.

Run: .venv/bin/python benchmarks/web_load.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

MODULES = 30
LINES = {"6.1/amd64": 60, "6.12/amd64": 40}
KINDS = ("abi", "build", "load")
HISTORY = 11  # older results per cell: 30 x 100 x 3 x 12 = 108,000 in all
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def config_text(url: str) -> str:
    parts = [f'[store]\nurl = "{url}"\n']
    for i in range(MODULES):
        tag = ("input", "fs", "net")[i % 3]
        parts.append(f'[modules.mod{i:02d}]\nsource = "debian-source:mod{i:02d}"\n'
                     f'tags = ["{tag}"]\n')
    parts.append('[[streams]]\nname = "next"\nkinds = ["abi", "build"]\n')
    parts.append('[[streams]]\nname = "testing"\nkinds = ["abi", "build", "load"]\n'
                 'min_soak = "3d"\nforbid_older = true\n')
    parts.append('[[streams]]\nname = "stable"\nkinds = ["abi", "build", "load"]\n'
                 'min_soak = "7d"\nforbid_older = true\n')
    return "\n".join(parts)


def releases() -> list[str]:
    out = []
    for line, count in LINES.items():
        series = line.split("/")[0]
        out += [f"{series}.0-{n}-amd64" for n in range(1, count + 1)]
    return out


def build_store(directory: Path) -> Path:
    from sqlalchemy import insert

    from kmodgate.config import parse_config
    from kmodgate.gate.service import Gate
    from kmodgate.store.models import Result

    path = directory / "kmodgate.toml"
    path.write_text(config_text(f"sqlite:///{directory / 'kmodgate.db'}"))
    gate = Gate.open(parse_config(path.read_text(), path))
    rng = random.Random(5)
    kernels = releases()
    for i, k in enumerate(kernels):
        gate.record_kernel(k, now=T0 + timedelta(hours=i))
    rows = []
    modules = [f"mod{i:02d}" for i in range(MODULES)]
    for ki, kernel in enumerate(kernels):
        for module in modules:
            for kind in KINDS:
                for v in range(HISTORY + 1):
                    latest = v == HISTORY
                    fail = rng.random() < (0.04 if latest else 0.2)
                    rows.append({
                        "fingerprint": f"{module}@{v}|{kernel}|{kind}", "kind": kind,
                        "module": module, "module_version": f"1.{v}", "kernel": kernel,
                        "outcome": "fail" if fail else "pass",
                        "reasons": [{"code": "crc_mismatch", "symbol": "sym",
                                     "message": "sym: CRC changed"}] if fail else [],
                        "reproducer": f"kmodgate check --kind {kind} --kernel debian:{kernel} "
                                      f"--module {module}",
                        "toolchain": "gcc-12", "log_path": None, "artifacts": [],
                        "duration_seconds": 1.0, "details": {},
                        "recorded_at": T0 + timedelta(hours=ki, minutes=v)})
    with gate.store.transaction() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(Result), rows[start:start + 5000])
    # Each line's kernels enter next in turn; the older half also testing.
    moment = T0 + timedelta(days=10)
    for line, count in LINES.items():
        series = line.split("/")[0]
        for n in range(1, count + 1, 5):
            gate.promote(f"{series}.0-{n}-amd64", "next", author="bench", force=True,
                         reason="benchmark set-up", now=moment)
            moment += timedelta(minutes=1)
    gate.close()
    print(f"store: {len(rows):,} results, {len(kernels)} kernels, {MODULES} modules")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(config: Path, port: int) -> None:
    """The child process: the application under uvicorn."""
    import uvicorn

    from kmodgate.config import load_config
    from kmodgate.gate.service import Gate
    from kmodgate.web.app import create_app

    app = create_app(Gate.open(load_config(config)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def write_like_a_sync(config: Path, seconds: float) -> None:
    """The child process: new results, as the runner records them, ten
    transactions a second, each for one random kernel (a new module version of
    one module, all three kinds)."""
    from kmodgate.abi.compare import Outcome
    from kmodgate.config import load_config
    from kmodgate.gate.service import Gate
    from kmodgate.results import CheckResult

    gate = Gate.open(load_config(config))
    rng = random.Random(11)
    kernels = releases()
    deadline = time.monotonic() + seconds
    written = 0
    while time.monotonic() < deadline:
        kernel, module = rng.choice(kernels), f"mod{rng.randrange(MODULES):02d}"
        version = f"2.{written}"
        gate.record_results(
            CheckResult(module=module, module_version=version, kernel=kernel, kind=kind,
                        outcome=Outcome.FAIL if rng.random() < 0.05 else Outcome.PASS,
                        fingerprint=f"{module}@{version}|{kernel}|{kind}")
            for kind in KINDS)
        written += 1
        time.sleep(0.1)
    gate.close()
    print(f"  writer: {written} transactions ({written / seconds:.1f}/s)")


def add_waiver(config: Path) -> None:
    from kmodgate.config import load_config
    from kmodgate.gate.service import Gate
    from kmodgate.gate.waivers import WaiverScope

    gate = Gate.open(load_config(config))
    gate.waive(WaiverScope("mod00", "6.1.0-1-amd64", "build"), reason="benchmark",
               author="bench", duration=timedelta(days=1))
    gate.close()


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return (f"p50 {at(0.50):6.1f} ms  p95 {at(0.95):6.1f} ms  p99 {at(0.99):6.1f} ms  "
            f"max {ordered[-1] * 1000:6.1f} ms  (n={len(ordered)})")


def time_pages(base: str) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=30) as client:
        for label, url in (("matrix, 25 kernels x 30 modules x 3 kinds", "/matrix"),
                           ("matrix, one line of 60 kernels", "/matrix?line=6.1/amd64&limit=60"),
                           ("overview (3 streams, decisions of candidates)", "/")):
            client.get(url).raise_for_status()  # warm: templates compiled, caches filled
            samples = []
            for _ in range(30):
                start = time.perf_counter()
                client.get(url).raise_for_status()
                samples.append(time.perf_counter() - start)
            print(f"{label:48s} {percentiles(samples)}")


class RawClient:
    """Keep-alive HTTP/1.1 connections spoken to directly: the load generator
    shares the machine with the server, and httpx would spend more CPU per
    request than the server under test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post_json(self, path: str, body: dict[str, str]) -> int:
        payload = json.dumps(body).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(payload)}"
                   f"\r\n\r\n".encode() + payload)
        while self.idle:
            connection = self.idle.pop()
            try:  # the server may have closed it as idle meanwhile: then try another
                return await self._exchange(connection, request)
            except (OSError, asyncio.IncompleteReadError):
                connection[1].close()
        return await self._exchange(await asyncio.open_connection("127.0.0.1", self.port),
                                    request)

    async def _exchange(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        request: bytes) -> int:
        reader, writer = connection
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        self.idle.append(connection)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def decision_load(port: int, rate: int, seconds: int, label: str) -> None:
    """POST /api/v1/decision at *rate* per second, open loop: each request's
    latency counts from when it was due, so a server that falls behind shows
    its queue instead of hiding it."""
    kernels = releases()
    streams = ("next", "testing", "stable")
    rng = random.Random(7)
    total = rate * seconds
    latencies: list[float] = []
    statuses: Counter[int | str] = Counter()
    client = RawClient(port)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int) -> None:
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        body = {"kernel": rng.choice(kernels), "stream": rng.choice(streams)}
        try:
            statuses[await client.post_json("/api/v1/decision", body)] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            statuses[type(exc).__name__] += 1
        latencies.append(loop.time() - scheduled)

    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = loop.time() - start
    client.close()
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items(), key=str))
    print(f"decision, {label}, {rate}/s for {seconds}s: {percentiles(latencies)}")
    print(f"  achieved {total / elapsed:.0f} requests/s; answers: {answers}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, help="build the store here and keep it")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, metavar=("CONFIG", "SECONDS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]))
        return
    if args.write:
        write_like_a_sync(Path(args.write[0]), float(args.write[1]))
        return
    directory = args.keep or Path(tempfile.mkdtemp(prefix="kmodgate-web-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        config = (directory / "kmodgate.toml" if (directory / "kmodgate.db").exists()
                  else build_store(directory))
        print(f"set-up {time.perf_counter() - started:.1f}s")
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(config),
                                   str(port)], env={**os.environ})
        try:
            import httpx

            base = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    httpx.get(f"{base}/api/v1/health", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            # At once: the server warms its decision cache in the background as it starts.
            asyncio.run(decision_load(port, args.rate, args.seconds, "right after start"))
            time_pages(base)
            asyncio.run(decision_load(port, args.rate, args.seconds, "warm cache"))
            add_waiver(config)  # a write every kernel's decision reads: all facts stale
            asyncio.run(decision_load(port, args.rate, args.seconds, "after a waiver"))
            writer = subprocess.Popen([sys.executable, __file__, "--write", str(config),
                                       str(args.seconds)])
            asyncio.run(decision_load(port, args.rate, args.seconds, "during a sync"))
            writer.wait()
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:  # still busy with the queued requests
                server.kill()
                server.wait()
    finally:
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
