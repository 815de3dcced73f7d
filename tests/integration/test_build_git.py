"""The build check on a git source: two commits of a small local module, one
that builds and one that does not, against a real Debian kernel."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.abi.compare import Outcome
from kmodgate.build.matrix import run_build_matrix
from kmodgate.sources import debian

pytestmark = pytest.mark.integration

DKMS_CONF = """\
PACKAGE_NAME="kmodgate-hello"
PACKAGE_VERSION="1.0"
MAKE[0]="make -C ${kernel_source_dir} M=${dkms_tree}/${PACKAGE_NAME}/${PACKAGE_VERSION}/build"
BUILT_MODULE_NAME[0]="kmodgate_hello"
DEST_MODULE_LOCATION[0]="/extra"
"""

GOOD = """\
#include <linux/module.h>
#include <linux/init.h>

static int __init hello_init(void)
{
	pr_info("kmodgate hello\\n");
	return 0;
}

static void __exit hello_exit(void)
{
}

module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""

# The second commit calls a function no kernel has: gcc 12 makes an implicit
# declaration an error under the kernel's -Werror=implicit-function-declaration.
BAD = GOOD.replace('pr_info("kmodgate hello\\n");', "kmodgate_no_such_function();")


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=kmodgate test",
         "-c", "user.email=test@kmodgate.invalid", *args],
        capture_output=True, text=True, check=True,
    )
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    require_tool("git")
    path = tmp_path_factory.mktemp("hello-module")
    _git(path, "init", "-q")
    (path / "dkms.conf").write_text(DKMS_CONF)
    (path / "Kbuild").write_text("obj-m := kmodgate_hello.o\n")
    (path / "kmodgate_hello.c").write_text(GOOD)
    _git(path, "add", ".")
    _git(path, "commit", "-q", "-m", "hello: a module that builds")
    good = _git(path, "rev-parse", "HEAD")
    (path / "kmodgate_hello.c").write_text(BAD)
    _git(path, "commit", "-q", "-am", "hello: call a function the kernel does not have")
    bad = _git(path, "rev-parse", "HEAD")
    return path, good, bad


@pytest.fixture(scope="module")
def kernel() -> str:
    for tool in ("bwrap", "make", "gcc-12"):
        require_tool(tool)
    plain = re.compile(r"^6\.1\.0-\d+-amd64$")
    releases = [r for r in debian.available_kernel_releases("amd64") if plain.match(r)]
    if not releases:
        pytest.skip("the archive offers no 6.1 amd64 kernel headers")
    return f"debian:{releases[-1]}"


def test_each_commit_gets_its_own_verdict(repo: tuple[Path, str, str], kernel: str) -> None:
    path, good, bad = repo
    results = run_build_matrix([kernel], [f"git+{path}@{good}", f"git+{path}@{bad}"])
    assert len(results) == 2
    passed, failed = results

    assert passed.outcome is Outcome.PASS, passed.reasons
    assert passed.details["commit"] == good
    assert passed.module_version == good
    assert len(passed.artifacts) == 1 and passed.artifacts[0].endswith(".ko")

    assert failed.outcome is Outcome.FAIL
    assert failed.details["commit"] == bad
    assert failed.module_version == bad
    reason = failed.reasons[0]
    assert reason["code"] == "implicit_declaration"
    assert reason["symbol"] == "kmodgate_no_such_function"
    assert reason["file"] == "kmodgate_hello.c"
    assert reason["line"] == 6
    assert passed.fingerprint != failed.fingerprint
