"""dkms.conf of real Debian DKMS packages, evaluated against real kernel headers.

Expected values were read off each package's dkms.conf by hand (and the
shell logic in them traced by hand: v4l2loopback's ``sort -V`` branch,
lttng's per-option module list, ddcci's self-exclusion).  Packages come
through the host's apt and are cached; the kernel tree is the newest 6.1 and
6.12 ``amd64`` headers the archive offers, mounted where dkms would see it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.abi.kconfig import parse_config
from kmodgate.build.dkms import BuiltModule, DkmsConf, evaluate_dkms_conf
from kmodgate.build.sandbox import Mount
from kmodgate.errors import UserError
from kmodgate.sources import debian
from kmodgate.sources.module_sources import ModuleSource, load_source

pytestmark = pytest.mark.integration


class Kernel:
    def __init__(self, release: str) -> None:
        self.release = release
        self.ksrc = f"/usr/src/linux-headers-{release}"
        self.tree = debian.fetch_headers(release) / self.ksrc.lstrip("/")
        self.config = parse_config((self.tree / ".config").read_text())

    def evaluate(self, source: ModuleSource, workdir: Path, *, mount: bool = True,
                 config: dict[str, str] | None = None, kernelver: str | None = None) -> DkmsConf:
        return evaluate_dkms_conf(
            source.tree, kernelver=kernelver or self.release, arch="x86_64",
            kernel_source_dir=self.ksrc,
            kernel_config=self.config if config is None else config, workdir=workdir,
            mounts=[Mount(self.tree, self.ksrc)] if mount else [],
        )


def _newest(prefix: str) -> str:
    releases = [r for r in debian.available_kernel_releases("amd64")
                if r.startswith(prefix) and r.endswith("-amd64")
                and not r.endswith(("-cloud-amd64", "-rt-amd64"))]
    if not releases:
        pytest.skip(f"the archive offers no {prefix}* amd64 headers")
    return releases[-1]


@pytest.fixture(scope="module")
def k61() -> Kernel:
    require_tool("bwrap")
    require_tool("apt-get")
    return Kernel(_newest("6.1.0-"))


@pytest.fixture(scope="module")
def k612() -> Kernel:
    return Kernel(_newest("6.12."))


def source(name: str) -> ModuleSource:
    return load_source(f"debian:{name}")


def test_acpi_call(k61: Kernel, tmp_path: Path) -> None:
    conf = k61.evaluate(source("acpi-call-dkms"), tmp_path)
    build = "/var/lib/dkms/acpi-call/1.2.2/build"
    assert conf.make_command == f"make -C {k61.ksrc} M={build}"
    assert conf.clean_command == f"make -C {k61.ksrc} M={build} clean"
    assert conf.modules == (BuiltModule("acpi_call", "", "acpi_call"),)
    assert conf.skip_reason is None  # BUILD_EXCLUSIVE_CONFIG="CONFIG_ACPI"
    no_acpi = {k: v for k, v in k61.config.items() if k != "CONFIG_ACPI"}
    skipped = k61.evaluate(source("acpi-call-dkms"), tmp_path, config=no_acpi)
    assert skipped.skip_reason == (
        "the kernel lacks CONFIG_ACPI, which BUILD_EXCLUSIVE_CONFIG requires")


def test_v4l2loopback_reads_the_kernel_config(k61: Kernel, k612: Kernel, tmp_path: Path) -> None:
    src = source("v4l2loopback-dkms")
    for kernel in (k61, k612):
        conf = kernel.evaluate(src, tmp_path)
        assert conf.make_command == f"make KERNEL_DIR={kernel.ksrc} all"
        assert conf.clean_command == "make clean"
        assert conf.modules == (BuiltModule("v4l2loopback", "", "v4l2loopback"),)
        assert conf.skip_reason is None  # Debian enables CONFIG_VIDEO_DEV
    # Past 5.18 the file requires CONFIG_VIDEO_DEV, read from the tree's .config.
    fake = tmp_path / "tree"
    fake.mkdir()
    (fake / ".config").write_text("CONFIG_USB=y\n")
    conf = evaluate_dkms_conf(src.tree, kernelver=k61.release, arch="x86_64",
                              kernel_source_dir=k61.ksrc, kernel_config={"CONFIG_USB": "y"},
                              workdir=tmp_path / "w", mounts=[Mount(fake, k61.ksrc)])
    assert conf.skip_reason == (f"BUILD_EXCLUSIVE_KERNEL 'REQUIRES CONFIG_VIDEO_DEV' "
                                f"does not match kernel {k61.release}")


def test_openrazer(k61: Kernel, tmp_path: Path) -> None:
    conf = k61.evaluate(source("openrazer-driver-dkms"), tmp_path)
    assert conf.make_command == f"KERNELDIR=/lib/modules/{k61.release}/build make driver"
    assert [(m.name, m.location) for m in conf.modules] == [
        ("razerkbd", "driver"), ("razermouse", "driver"),
        ("razerkraken", "driver"), ("razeraccessory", "driver")]
    assert conf.skip_reason is None
    assert source("openrazer-driver-dkms").build_depends == ("udev",)


def test_dm_writeboost_kernel_min(k61: Kernel, tmp_path: Path) -> None:
    src = source("dm-writeboost-dkms")
    conf = k61.evaluate(src, tmp_path)
    assert conf.make_command == f"make all KERNEL_TREE={k61.ksrc} V=1"
    assert conf.clean_command == "make clean"
    assert conf.modules == (BuiltModule("dm-writeboost", "", "dm-writeboost"),)
    assert conf.skip_reason is None
    old = k61.evaluate(src, tmp_path, kernelver="3.2.0-4-amd64")
    assert old.skip_reason == "kernel 3.2.0-4-amd64 is older than BUILD_EXCLUSIVE_KERNEL_MIN 3.9"


def test_xtables_addons(k61: Kernel, tmp_path: Path) -> None:
    conf = k61.evaluate(source("xtables-addons-dkms"), tmp_path)
    bdir = "/var/lib/dkms/xtables-addons/3.23/build"
    args = f"-C {k61.ksrc} M={bdir}/extensions XA_ABSTOPSRCDIR={bdir} XA_TOPSRCDIR={bdir} V=1"
    assert conf.make_command == (
        f"make {args} modules ; find {bdir} -name '*.ko' -exec mv -v {{}} {bdir} \\;")
    assert conf.clean_command == f"make {args} clean"
    assert len(conf.modules) == 23
    assert conf.modules[0] == BuiltModule("xt_ACCOUNT", "", "xt_ACCOUNT")
    assert conf.modules[-1].name == "xt_quota2"
    assert all(m.location == "" for m in conf.modules)


def test_lime(k61: Kernel, tmp_path: Path) -> None:
    conf = k61.evaluate(source("lime-forensics-dkms"), tmp_path)
    assert conf.package_version == "1.9.1-5"
    assert conf.make_command == (
        f"make -C {k61.ksrc} M=/var/lib/dkms/lime-forensics/1.9.1-5/build")
    assert conf.modules == (BuiltModule("lime", "", "lime"),)


def test_lttng_module_list_follows_the_config(k61: Kernel, tmp_path: Path) -> None:
    src = source("lttng-modules-dkms")
    conf = k61.evaluate(src, tmp_path)
    names = [m.name for m in conf.modules]
    assert conf.modules[0] == BuiltModule("lttng-lib-ring-buffer", "src/lib",
                                          "lttng-lib-ring-buffer")
    assert "lttng-counter-client-percpu-64-modular" in names  # CONFIG_64BIT
    assert "lttng-probe-kmem" not in names  # only for kernels before 6
    assert "lttng-kprobes" in names  # CONFIG_KPROBES
    assert names[-2:] == ["lttng-test", "lttng-clock-plugin-test"]
    assert conf.make_command == (
        f"make -C {k61.ksrc} M=/var/lib/dkms/lttng-modules/2.13.9/build modules "
        "CONFIG_LTTNG=m CONFIG_LTTNG_CLOCK_PLUGIN_TEST=m")
    # Without the tree's .config the file cannot see CONFIG_64BIT.
    bare = k61.evaluate(src, tmp_path, mount=False)
    assert "lttng-counter-client-percpu-64-modular" not in [m.name for m in bare.modules]
    assert len(bare.modules) < len(conf.modules)


def test_ddcci_excludes_itself_without_the_config(k61: Kernel, tmp_path: Path) -> None:
    src = source("ddcci-dkms")
    conf = k61.evaluate(src, tmp_path)
    assert conf.skip_reason is None
    assert conf.make_command == (
        f"make KVER={k61.release} -C /var/lib/dkms/ddcci/0.4.2/build")
    assert conf.modules == (BuiltModule("ddcci", "ddcci", "ddcci"),
                            BuiltModule("ddcci-backlight", "ddcci-backlight", "ddcci-backlight"))
    bare = k61.evaluate(src, tmp_path, mount=False)
    assert bare.skip_reason == (
        "BUILD_EXCLUSIVE_ARCH '^do_not_build$' does not match architecture x86_64")


def test_dahdi(k61: Kernel, tmp_path: Path) -> None:
    conf = k61.evaluate(source("dahdi-dkms"), tmp_path)
    assert conf.skip_reason is None  # 6.x matches; PCI and USB enabled
    assert conf.make_command == (
        f"(make modules KVERS={k61.release} MODULES_EXTRA='dahdi_dummy dahdi_echocan_oslec'; "
        f"make KVERS={k61.release})")
    assert conf.clean_command == "/bin/true"
    assert len(conf.modules) == 32
    assert conf.modules[29] == BuiltModule("opvxa1200", "drivers/dahdi/opvxa1200", "opvxa1200")
    old = k61.evaluate(source("dahdi-dkms"), tmp_path, kernelver="5.4.0-1-amd64")
    assert old.skip_reason is not None and "BUILD_EXCLUSIVE_KERNEL" in old.skip_reason


def test_openafs_excludes_preempt_rt(k61: Kernel, tmp_path: Path) -> None:
    src = source("openafs-modules-dkms")
    conf = k61.evaluate(src, tmp_path)
    assert conf.skip_reason is None
    assert "--with-afs-sysname=amd64_linux26" in conf.make_command
    assert f"--with-linux-kernel-headers={k61.ksrc}" in conf.make_command
    assert conf.modules == (BuiltModule("openafs", "", "openafs"),)
    rt = k61.evaluate(src, tmp_path, config={**k61.config, "CONFIG_PREEMPT_RT": "y"})
    assert rt.skip_reason == ("the kernel has CONFIG_PREEMPT_RT enabled and "
                              "BUILD_EXCLUSIVE_CONFIG excludes it (!CONFIG_PREEMPT_RT)")


def test_ipt_netflow_pushd_noise_and_pre_build(k61: Kernel, tmp_path: Path) -> None:
    conf = k61.evaluate(source("iptables-netflow-dkms"), tmp_path)
    assert conf.package_version == "2.6"  # set between pushd and popd, which print
    assert conf.make_command == "make ipt_NETFLOW.ko"
    assert conf.pre_build is not None
    assert conf.pre_build.startswith(f"./configure --from-dkms-conf={k61.ksrc} ")
    assert conf.variables["STRIP[0]"] == "no"


def test_evdi_and_digimend_on_6_12(k612: Kernel, tmp_path: Path) -> None:
    evdi = k612.evaluate(source("evdi-dkms"), tmp_path)
    assert evdi.skip_reason is None  # CONFIG_I2C and CONFIG_DRM
    assert evdi.modules == (BuiltModule("evdi", "", "evdi"),)
    digimend = k612.evaluate(source("digimend-dkms"), tmp_path)
    assert digimend.make_command == f"make KVERSION={k612.release}"
    assert [m.name for m in digimend.modules] == [
        "hid-kye", "hid-uclogic", "hid-polostar", "hid-viewsonic"]
    assert digimend.skip_reason is None


def test_every_dkms_package_in_the_archive_evaluates(k61: Kernel, tmp_path: Path) -> None:
    """No real dkms.conf may crash the evaluator: each gives a result or a
    clean UserError."""
    import subprocess

    names = sorted(
        line.split(" ", 1)[0]
        for line in subprocess.run(["apt-cache", "search", "--names-only", "--", "-dkms$"],
                                   capture_output=True, text=True, check=True).stdout.splitlines()
        if line.split(" ", 1)[0].endswith("-dkms")
    )
    assert len(names) >= 10
    results: dict[str, str] = {}
    for name in names:
        try:
            conf = k61.evaluate(source(name), tmp_path / name)
        except UserError as e:
            results[name] = f"error: {e}"
            continue
        assert conf.modules
        results[name] = conf.skip_reason or "applies"
    assert sum(r == "applies" for r in results.values()) >= len(names) // 2, results


def test_same_source_same_evaluation(k61: Kernel, tmp_path: Path) -> None:
    src = source("acpi-call-dkms")
    a = k61.evaluate(src, tmp_path / "a")
    b = k61.evaluate(src, tmp_path / "b")
    assert replace(a, arrays={}) == replace(b, arrays={})
