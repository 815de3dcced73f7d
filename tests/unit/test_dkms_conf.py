"""dkms.conf semantics on small synthesized files, evaluated in the real sandbox.

Each case states what dkms 3.x (read_conf in /usr/sbin/dkms) does with the
file; hostile files must end as a UserError naming the file, quickly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import require_tool
from kmodgate.build.dkms import (
    BuiltModule,
    DkmsConf,
    build_command,
    config_enabled,
    dkms_ver,
    evaluate_dkms_conf,
)
from kmodgate.build.sandbox import Limits, Mount
from kmodgate.errors import UserError

KVER = "6.1.0-56-amd64"
KSRC = "/usr/src/linux-headers-6.1.0-56-amd64"
CONFIG = {"CONFIG_USB": "y", "CONFIG_ACPI": "y", "CONFIG_HID": "m", "CONFIG_PREEMPT_RT": "n"}


@pytest.fixture(autouse=True)
def _bwrap() -> None:
    require_tool("bwrap")


def evaluate(tmp_path: Path, text: str, *, kernelver: str = KVER, arch: str = "x86_64",
             config: dict[str, str] | None = None, **kwargs: object) -> DkmsConf:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "dkms.conf").write_text(text)
    return evaluate_dkms_conf(
        src, kernelver=kernelver, arch=arch, kernel_source_dir=KSRC,
        kernel_config=CONFIG if config is None else config, workdir=tmp_path / "work",
        **kwargs,  # type: ignore[arg-type]
    )


BASIC = 'PACKAGE_NAME="demo"\nPACKAGE_VERSION="1.0"\nBUILT_MODULE_NAME[0]="demo"\n'


def test_defaults_are_dkms_defaults(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, BASIC)
    assert conf.package_name == "demo" and conf.package_version == "1.0"
    assert conf.make_command == f"make -C {KSRC} M=/var/lib/dkms/demo/1.0/build"
    assert conf.clean_command == f"make -C {KSRC} M=/var/lib/dkms/demo/1.0/build clean"
    assert conf.build_dir == "/var/lib/dkms/demo/1.0/build"
    assert conf.modules == (BuiltModule("demo", "", "demo"),)
    assert conf.patches == ()
    assert conf.skip_reason is None
    assert conf.variables == {"PACKAGE_NAME": "demo", "PACKAGE_VERSION": "1.0",
                              "BUILT_MODULE_NAME[0]": "demo"}


def test_dkms_variables_are_visible_and_stdout_noise_is_harmless(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, BASIC + (
        'echo "PACKAGE_NAME=evil"; printf "\\0\\0end\\0"\n'
        'pushd /tmp; popd\n'
        'MAKE[0]="make K=$kernelver A=$arch S=$kernel_source_dir T=$dkms_tree '
        'U=$source_tree C=$kernel_config M=$module V=$module_version"\n'
    ))
    assert conf.make_command == (
        f"make K={KVER} A=x86_64 S={KSRC} T=/var/lib/dkms U=/usr/src "
        f"C={KSRC}/.config M=demo V=1.0"
    )
    assert conf.package_name == "demo"


def test_module_defaults_to_package_name_on_the_second_read(tmp_path: Path) -> None:
    # dkms learns $module from PACKAGE_NAME, then sources the file again.
    conf = evaluate(tmp_path, BASIC + 'MAKE[0]="make MOD=${module:-unset}"\n')
    assert conf.make_command == "make MOD=demo"
    given = evaluate(tmp_path, BASIC + 'MAKE[0]="make MOD=${module:-unset}"\n',
                     module="other", module_version="2")
    assert given.make_command == "make MOD=other"
    assert given.build_dir == "/var/lib/dkms/other/2/build"


def test_make_match_last_match_wins(tmp_path: Path) -> None:
    text = BASIC + (
        'MAKE[0]="make old"\nMAKE_MATCH[0]="^5\\."\n'
        'MAKE[1]="make six"\nMAKE_MATCH[1]="^6\\."\n'
        'MAKE[2]="make six-one"\nMAKE_MATCH[2]="^6\\.1\\."\n'
    )
    assert evaluate(tmp_path, text).make_command == "make six-one"
    assert evaluate(tmp_path, text, kernelver="6.12.117+deb12-amd64").make_command == "make six"
    # No match and MAKE_MATCH[0] set: dkms falls back to its default command.
    assert evaluate(tmp_path, text, kernelver="4.19.0-1-amd64").make_command.startswith(
        f"make -C {KSRC} M=")


def test_make_without_match_is_the_default(tmp_path: Path) -> None:
    text = BASIC + 'MAKE[0]="make zero"\nMAKE[1]="make one"\nMAKE_MATCH[1]="^6"\n'
    assert evaluate(tmp_path, text).make_command == "make one"
    assert evaluate(tmp_path, text, kernelver="5.10.0-1-amd64").make_command == "make zero"


def test_scalar_make_is_make_zero(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, BASIC + 'MAKE="make all KERNEL_TREE=$kernel_source_dir"\n')
    assert conf.make_command == f"make all KERNEL_TREE={KSRC}"
    assert conf.variables["MAKE"] == f"make all KERNEL_TREE={KSRC}"


def test_clang_kernel_gets_cc_and_ld(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, BASIC + 'MAKE[0]="make"\n',
                    config={"CONFIG_CC_IS_CLANG": "y", "CONFIG_LD_IS_LLD": "y"})
    assert conf.make_command == "make CC=clang LD=ld.lld"


def test_patches_follow_patch_match(tmp_path: Path) -> None:
    text = BASIC + (
        'PATCH[0]="always.patch"\n'
        'PATCH[1]="old.patch"\nPATCH_MATCH[1]="^5\\."\n'
        'PATCH[2]="six.patch"\nPATCH_MATCH[2]="^6\\.1"\n'
    )
    assert evaluate(tmp_path, text).patches == ("always.patch", "six.patch")
    assert evaluate(tmp_path, text, kernelver="5.10.0-9-amd64").patches == (
        "always.patch", "old.patch")


def test_module_records(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, (
        'PACKAGE_NAME=pkg\nPACKAGE_VERSION=3\n'
        'BUILT_MODULE_NAME[0]=a\nBUILT_MODULE_LOCATION[0]=drivers/a/\n'
        'BUILT_MODULE_NAME[1]=b\nDEST_MODULE_NAME[1]=b_renamed\nBUILT_MODULE_LOCATION[1]=b\n'
    ))
    assert conf.modules == (BuiltModule("a", "drivers/a", "a"),
                            BuiltModule("b", "b", "b_renamed"))


def test_unnamed_single_record_borrows_package_name(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, 'PACKAGE_NAME=solo\nPACKAGE_VERSION=1\n'
                              'DEST_MODULE_LOCATION[0]="/extra"\n')
    assert conf.modules == (BuiltModule("solo", "", "solo"),)


@pytest.mark.parametrize(("text", "message"), [
    ('PACKAGE_VERSION=1\nBUILT_MODULE_NAME[0]=x\n', "no PACKAGE_NAME"),
    ('PACKAGE_NAME=x\nBUILT_MODULE_NAME[0]=x\n', "no PACKAGE_VERSION"),
    ('PACKAGE_NAME=x\nPACKAGE_VERSION=1\n', "names no module"),
    ('PACKAGE_NAME=x\nPACKAGE_VERSION=1\nBUILT_MODULE_NAME[0]=x.ko\n', "ends in .o or .ko"),
    ('PACKAGE_NAME=x\nPACKAGE_VERSION=1\nBUILT_MODULE_LOCATION[0]=a\n'
     'BUILT_MODULE_LOCATION[1]=b\n', "no BUILT_MODULE_NAME for record #0"),
])
def test_what_dkms_refuses_is_a_user_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        evaluate(tmp_path, text)
    assert "dkms.conf" in str(info.value)


def test_build_exclusive_kernel_regex(tmp_path: Path) -> None:
    text = BASIC + 'BUILD_EXCLUSIVE_KERNEL="^(5\\.[6-9]\\.|[6-9]\\.)"\n'
    assert evaluate(tmp_path, text).skip_reason is None
    conf = evaluate(tmp_path, text, kernelver="4.19.0-20-amd64")
    assert conf.skip_reason is not None
    assert "BUILD_EXCLUSIVE_KERNEL" in conf.skip_reason and "4.19.0-20-amd64" in conf.skip_reason


def test_build_exclusive_kernel_min_max(tmp_path: Path) -> None:
    text = BASIC + 'BUILD_EXCLUSIVE_KERNEL_MIN="6.2"\nBUILD_EXCLUSIVE_KERNEL_MAX="6.12.200"\n'
    old = evaluate(tmp_path, text)
    assert old.skip_reason == f"kernel {KVER} is older than BUILD_EXCLUSIVE_KERNEL_MIN 6.2"
    assert evaluate(tmp_path, text, kernelver="6.12.117+deb12-amd64").skip_reason is None
    new = evaluate(tmp_path, text, kernelver="6.13.1-amd64")
    assert new.skip_reason is not None
    assert "newer than BUILD_EXCLUSIVE_KERNEL_MAX" in new.skip_reason


def test_build_exclusive_arch(tmp_path: Path) -> None:
    text = BASIC + 'BUILD_EXCLUSIVE_ARCH="^(x86_64|i.86)$"\n'
    assert evaluate(tmp_path, text).skip_reason is None
    conf = evaluate(tmp_path, text, arch="aarch64")
    assert conf.skip_reason == ("BUILD_EXCLUSIVE_ARCH '^(x86_64|i.86)$' does not match "
                                "architecture aarch64")


def test_build_exclusive_config(tmp_path: Path) -> None:
    need = evaluate(tmp_path, BASIC + 'BUILD_EXCLUSIVE_CONFIG="CONFIG_USB CONFIG_HID"\n')
    assert need.skip_reason is None  # y and m both count
    lacking = evaluate(tmp_path, BASIC + 'BUILD_EXCLUSIVE_CONFIG="CONFIG_USB CONFIG_PCI"\n')
    assert lacking.skip_reason == (
        "the kernel lacks CONFIG_PCI, which BUILD_EXCLUSIVE_CONFIG requires")
    negated = evaluate(tmp_path,
                       BASIC + 'BUILD_EXCLUSIVE_CONFIG="!CONFIG_ACPI !CONFIG_PREEMPT_RT"\n')
    assert negated.skip_reason is not None
    assert "CONFIG_ACPI enabled" in negated.skip_reason
    assert "PREEMPT_RT" not in negated.skip_reason  # "n" is not enabled
    # dkms checks BUILD_EXCLUSIVE_CONFIG only when the tree has a .config.
    unknown = evaluate(tmp_path, BASIC + 'BUILD_EXCLUSIVE_CONFIG="CONFIG_PCI"\n', config={})
    assert unknown.skip_reason is None


def test_several_exclusions_are_all_reported(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, BASIC + 'BUILD_EXCLUSIVE_KERNEL="^7"\nBUILD_EXCLUSIVE_ARCH="arm"\n')
    assert conf.skip_reason is not None
    assert conf.skip_reason.count(";") == 1


def test_conf_reads_the_kernel_tree_through_mounts(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / ".config").write_text("CONFIG_VIDEO_DEV=m\n")
    text = BASIC + (
        'if [ -f $kernel_source_dir/.config ]; then\n'
        '    . $kernel_source_dir/.config\n'
        '    [ "${CONFIG_VIDEO_DEV:-n}" = "n" ] &&\n'
        '        BUILD_EXCLUSIVE_KERNEL="REQUIRES CONFIG_VIDEO_DEV"\n'
        'else\n    BUILD_EXCLUSIVE_KERNEL="no .config"\nfi\n'
    )
    with_tree = evaluate(tmp_path, text, mounts=[Mount(tree, KSRC)])
    assert with_tree.skip_reason is None
    (tree / ".config").write_text("CONFIG_USB=y\n")
    without = evaluate(tmp_path, text, mounts=[Mount(tree, KSRC)])
    assert without.skip_reason == (
        f"BUILD_EXCLUSIVE_KERNEL 'REQUIRES CONFIG_VIDEO_DEV' does not match kernel {KVER}")
    # The host's own kernel trees are never visible to the file.
    assert evaluate(tmp_path, text).skip_reason is not None


def test_syntax_error_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"dkms.conf: not valid bash: .*syntax error"):
        evaluate(tmp_path, BASIC + "if then fi (\n")


def test_infinite_loop_is_a_user_error_not_a_hang(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(UserError, match="wall time limit") as info:
        evaluate(tmp_path, BASIC + "while :; do :; done\n",
                 limits=Limits(wall_seconds=2, cpu_seconds=30))
    assert time.monotonic() - start < 15
    assert str(tmp_path / "src" / "dkms.conf") in str(info.value)


def test_huge_output_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="output limit"):
        evaluate(tmp_path, BASIC + "yes 'spam spam spam'\n")


def test_exit_while_sourced_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ended the shell"):
        evaluate(tmp_path, BASIC + "echo bye >&2; exit 3\n")


def test_conf_cannot_write_outside_the_workdir(tmp_path: Path) -> None:
    src_marker = tmp_path / "src" / "written"
    conf = evaluate(tmp_path, BASIC + f'touch {src_marker} 2>/dev/null\n'
                    'touch /var/lib/dkms-evil 2>/dev/null\n')
    assert conf.package_name == "demo"
    assert not src_marker.exists()
    assert not Path("/var/lib/dkms-evil").exists()


def test_build_command_mirrors_actual_build(tmp_path: Path) -> None:
    conf = evaluate(tmp_path, BASIC)
    assert build_command(conf, kernelver=KVER, jobs=2) == (
        f"make -j2 KERNELRELEASE={KVER} -C {KSRC} M=/var/lib/dkms/demo/1.0/build")
    env_first = evaluate(tmp_path, BASIC + 'MAKE="KERNELDIR=/x make driver"\n')
    assert build_command(env_first, kernelver=KVER, jobs=2) == "KERNELDIR=/x make driver"


def test_dkms_ver_pads_like_dkms() -> None:
    # Values from dkms's own VER() (sed pipeline in /usr/sbin/dkms).
    assert dkms_ver("2.6.9-1cvs200409091247") == "002.006.009-001cvs200409091247"
    assert dkms_ver("6.1.0-56-amd64") == "006.001.000-056-amd064"
    assert dkms_ver("6.12.117+deb12-amd64") == "006.012.117+deb012-amd064"
    assert dkms_ver("6.1.0-56-amd64") < dkms_ver("6.2")
    assert dkms_ver("6.12.117+deb12-amd64") > dkms_ver("6.2")


def test_config_enabled() -> None:
    assert config_enabled({"CONFIG_A": "y"}, "CONFIG_A")
    assert config_enabled({"CONFIG_A": "m"}, "CONFIG_A")
    assert not config_enabled({"CONFIG_A": "n"}, "CONFIG_A")
    assert not config_enabled({"CONFIG_AB": "y"}, "CONFIG_A")
    assert config_enabled({"CONFIG_AB": "y"}, "CONFIG_A.")
