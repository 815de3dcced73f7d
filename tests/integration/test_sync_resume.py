"""sync killed with SIGKILL at any point, then run again, ends with the same
store as a sync never interrupted: no lost and no duplicated rows.

Two real Debian kernels (6.1.0-47 and 6.1.0-50) and two small module sources
of this test's own, one of which stops building after 6.1.170, so the store
gets results of both outcomes, a regression event and queued notifications
(to an SMTP port nobody listens on, so they stay in the outbox).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gate_fixtures import free_port
from kmodgate.sources import debian

pytestmark = pytest.mark.integration

KMODGATE = str(Path(sys.executable).with_name("kmodgate"))
KERNELS = ("6.1.0-47-amd64", "6.1.0-50-amd64")
SOURCE = """\
#include <linux/module.h>
#include <linux/version.h>
#if {broken} && LINUX_VERSION_CODE > KERNEL_VERSION(6, 1, 170)
#error "this module does not support kernels after 6.1.170"
#endif
static int __init hello_init(void) {{ return 0; }}
static void __exit hello_exit(void) {{ }}
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
/* {salt} */
"""


def module_source(root: Path, name: str, broken: bool, salt: str) -> Path:
    tree = root / name
    tree.mkdir(parents=True)
    (tree / f"{name}.c").write_text(SOURCE.format(broken=int(broken), salt=salt))
    (tree / "Makefile").write_text(f"obj-m += {name}.o\n")
    (tree / "dkms.conf").write_text(
        f'PACKAGE_NAME="{name}"\nPACKAGE_VERSION="1.0"\nBUILT_MODULE_NAME[0]="{name}"\n'
        'DEST_MODULE_LOCATION[0]="/updates"\nAUTOINSTALL="yes"\n')
    for p in (root, tree, *tree.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return tree


def write_config(root: Path, sources: dict[str, Path], port: int) -> Path:
    modules = "".join(f'[modules.{n}]\nsource = "{p}"\nmaintainers = ["{n}@example.org"]\n\n'
                      for n, p in sources.items())
    path = root / "kmodgate.toml"
    path.write_text(f"""\
[[sources]]
name = "debian"
type = "debian"
flavour = "amd64"
pattern = "6.1.0-[45][07]-amd64"

{modules}
[[streams]]
name = "next"
kinds = ["abi", "build"]

[notify.email]
host = "127.0.0.1"
port = {port}
from = "kmodgate@example.org"
""")
    return path


def count_results(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
    except sqlite3.Error:
        return -1  # not created (or migrated) yet


def sync_killed_after(config: Path, db: Path, results: int) -> None:
    """Start a sync and SIGKILL its whole process group once *results* rows exist."""
    proc = subprocess.Popen([KMODGATE, "sync", "--config", str(config), "--db",
                             f"sqlite:///{db}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while count_results(db) < results and proc.poll() is None:
        assert time.monotonic() < deadline, "sync made no progress"
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def sync(config: Path, db: Path) -> None:
    subprocess.run([KMODGATE, "sync", "--config", str(config), "--db", f"sqlite:///{db}"],
                   check=True, capture_output=True, timeout=1200)


def store_rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What a store holds, without ids and times (those differ between runs)."""
    with sqlite3.connect(db) as conn:
        return {
            "kernels": sorted(conn.execute(
                "SELECT release, line, package_version, source FROM kernels")),
            "results": sorted(conn.execute(
                "SELECT fingerprint, kind, module, module_version, kernel, outcome "
                "FROM results")),
            "events": sorted(conn.execute("SELECT key, kind, module FROM events")),
            "deliveries": sorted(conn.execute(
                "SELECT e.key, d.channel, d.recipient, d.delivered_at IS NULL "
                "FROM deliveries d JOIN events e ON e.id = d.event_id")),
        }


def test_killed_syncs_end_with_the_store_of_an_uninterrupted_one(tmp_path: Path) -> None:
    available = set(debian.available_kernel_releases("amd64"))
    if not set(KERNELS) <= available:
        pytest.skip(f"the archive no longer offers {set(KERNELS) - available}")
    salt = uuid.uuid4().hex  # fresh sources: the killed run really builds
    sources = {"hello": module_source(tmp_path / "src", "hello", False, salt),
               "fragile": module_source(tmp_path / "src", "fragile", True, salt)}
    config = write_config(tmp_path, sources, free_port())

    reference = tmp_path / "reference.db"
    # Killed while kernels are being recorded, after the first result, and
    # halfway; each store then completed by a plain second run.
    killed = []
    for results in (0, 1, 4):
        db = tmp_path / f"killed-{results}.db"
        sync_killed_after(config, db, results)
        sync(config, db)
        killed.append(db)
    sync(config, reference)

    expected = store_rows(reference)
    # 2 modules x 2 kernels x (build, abi), less the abi check of fragile on
    # 6.1.0-50: it did not build there, so there is no binary to check.
    assert len(expected["results"]) == 7
    outcomes = {(r[2], r[4], r[1]): r[5] for r in expected["results"]}
    assert outcomes[("fragile", KERNELS[1], "build")] == "fail"
    assert outcomes[("fragile", KERNELS[0], "build")] == "pass"
    [regression] = [e for e in expected["events"] if e[1] == "regression"]
    assert regression[2] == "fragile"
    assert (regression[0], "email", "fragile@example.org", 1) in expected["deliveries"]
    for db in killed:
        got = store_rows(db)
        assert got == expected, db.name
        for rows in got.values():
            assert len(rows) == len(set(rows)), f"duplicated rows in {db.name}"
