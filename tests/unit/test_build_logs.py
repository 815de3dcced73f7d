# Real logs are quoted verbatim, long lines included: the classifier must read them as gcc wrote them.
# ruff: noqa: E501
"""The kbuild log classifier on real gcc-12 and modpost output.

Every log below is real: the openrazer, v4l2loopback and dm-writeboost
excerpts come from building the Debian -dkms packages against Debian's 6.1 and
6.12 headers; the others from compiling tiny broken kernel-style files against
6.1.0-56 headers with gcc 12.2.0.  Source lines gcc echoes (" 3124 | ...")
are kept where gcc printed them, because the classifier has to skip them.
"""

from __future__ import annotations

import pytest

from kmodgate.build.logs import BuildError, classify_log

OPENRAZER_61050 = """\
make -C /lib/modules/6.1.0-56-amd64/build M=/tmp/kg/b-razer/driver modules
make[1]: Entering directory '/usr/src/linux-headers-6.1.0-56-amd64'
  CC [M]  /tmp/kg/b-razer/driver/razerkbd_driver.o
  CC [M]  /tmp/kg/b-razer/driver/razercommon.o
/tmp/kg/b-razer/driver/razerkbd_driver.c: In function ‘razer_raw_event_bitfield’:
/tmp/kg/b-razer/driver/razerkbd_driver.c:3124:29: error: too few arguments to function ‘hid_report_raw_event’
 3124 |                             hid_report_raw_event(hdev, HID_INPUT_REPORT, xdata, sizeof(xdata), 0);
      |                             ^~~~~~~~~~~~~~~~~~~~
In file included from /tmp/kg/b-razer/driver/razerkbd_driver.c:11:
/usr/src/linux-headers-6.1.0-56-common/include/linux/hid.h:1225:5: note: declared here
 1225 | int hid_report_raw_event(struct hid_device *hid, enum hid_report_type type, u8 *data,
      |     ^~~~~~~~~~~~~~~~~~~~
make[2]: *** [/usr/src/linux-headers-6.1.0-56-common/scripts/Makefile.build:255: /tmp/kg/b-razer/driver/razerkbd_driver.o] Error 1
make[2]: *** Waiting for unfinished jobs....
make[1]: *** [/usr/src/linux-headers-6.1.0-56-common/Makefile:2065: /tmp/kg/b-razer/driver] Error 2
make[1]: Leaving directory '/usr/src/linux-headers-6.1.0-56-amd64'
make: *** [Makefile:41: driver] Error 2
"""

V4L2LOOPBACK_612 = """\
Building v4l2-loopback driver...
make -C /tmp/kg/k612/usr/src/linux-headers-6.12.117+deb12-rt-amd64 M=/tmp/kg/b-v4l modules
  CC [M]  /tmp/kg/b-v4l/v4l2loopback.o
/tmp/kg/b-v4l/v4l2loopback.c: In function ‘vidioc_querycap’:
/tmp/kg/b-v4l/v4l2loopback.c:717:9: error: implicit declaration of function ‘strlcpy’; did you mean ‘strncpy’? [-Werror=implicit-function-declaration]
  717 |         strlcpy(cap->driver, "v4l2 loopback", sizeof(cap->driver));
      |         ^~~~~~~
      |         strncpy
cc1: some warnings being treated as errors
make[3]: *** [/tmp/kg/k612/usr/src/linux-headers-6.12.117+deb12-common-rt/scripts/Makefile.build:234: /tmp/kg/b-v4l/v4l2loopback.o] Error 1
make: *** [Makefile:43: v4l2loopback.ko] Error 2
"""

# Built with V=1, so gcc's command line (full of "-Werror=...") precedes the error.
DM_WRITEBOOST_612 = """\
# CC [M]  /tmp/kg/b-wb/dm-writeboost-target.o
   x86_64-linux-gnu-gcc-12 -Wp,-MMD,/tmp/kg/b-wb/.dm-writeboost-target.o.d -nostdinc -Wall -Werror=implicit-function-declaration -Werror=implicit-int -Werror=return-type -DMODULE -c -o /tmp/kg/b-wb/dm-writeboost-target.o /tmp/kg/b-wb/dm-writeboost-target.c
/tmp/kg/b-wb/dm-writeboost-target.c: In function ‘dm_devsize’:
/tmp/kg/b-wb/dm-writeboost-target.c:119:37: error: ‘struct block_device’ has no member named ‘bd_inode’
  119 |         return i_size_read(dev->bdev->bd_inode) >> 9;
      |                                     ^~
/tmp/kg/b-wb/dm-writeboost-target.c: In function ‘writeboost_io_hints’:
/tmp/kg/b-wb/dm-writeboost-target.c:1899:9: error: implicit declaration of function ‘blk_limits_io_opt’ [-Werror=implicit-function-declaration]
 1899 |         blk_limits_io_opt(limits, 4096);
      |         ^~~~~~~~~~~~~~~~~
/tmp/kg/b-wb/dm-writeboost-target.c: In function ‘dm_devsize’:
/tmp/kg/b-wb/dm-writeboost-target.c:120:1: error: control reaches end of non-void function [-Werror=return-type]
cc1: some warnings being treated as errors
make: *** [Makefile:11: all] Error 2
"""

ACPI_CALL_612_PASS = """\
make: Entering directory '/tmp/kg/k612/usr/src/linux-headers-6.12.117+deb12-rt-amd64'
  CC [M]  /tmp/kg/b-acpi/acpi_call.o
/tmp/kg/b-acpi/acpi_call.c:151:4: warning: no previous prototype for ‘decodeHex’ [-Wmissing-prototypes]
  151 | u8 decodeHex(char *hex) {
      |    ^~~~~~~~~
  MODPOST /tmp/kg/b-acpi/Module.symvers
  CC [M]  /tmp/kg/b-acpi/acpi_call.mod.o
  LD [M]  /tmp/kg/b-acpi/acpi_call.ko
  BTF [M] /tmp/kg/b-acpi/acpi_call.ko
make: Leaving directory '/tmp/kg/k612/usr/src/linux-headers-6.12.117+deb12-rt-amd64'
"""

MODPOST = """\
  CC [M]  /tmp/kg/broken/m-modpost/t_modpost.o
  MODPOST /tmp/kg/broken/m-modpost/Module.symvers
ERROR: modpost: "kmodgate_gone_symbol" [/tmp/kg/broken/m-modpost/t_modpost.ko] undefined!
make[1]: *** [/usr/src/linux-headers-6.1.0-56-common/scripts/Makefile.modpost:127: /tmp/kg/broken/m-modpost/Module.symvers] Error 1
make: *** [/usr/src/linux-headers-6.1.0-56-common/Makefile:2017: modpost] Error 2
"""

MISSING_HEADER = """\
  CC [M]  /tmp/kg/broken/m-header/t_header.o
/tmp/kg/broken/m-header/t_header.c:2:10: fatal error: linux/genhd_gone.h: No such file or directory
    2 | #include <linux/genhd_gone.h>
      |          ^~~~~~~~~~~~~~~~~~~~
compilation terminated.
make[1]: *** [/usr/src/linux-headers-6.1.0-56-common/scripts/Makefile.build:255: /tmp/kg/broken/m-header/t_header.o] Error 1
"""

TOO_MANY = """\
/tmp/kg/broken/m-manyargs/t_manyargs.c: In function ‘t_many’:
/tmp/kg/broken/m-manyargs/t_manyargs.c:2:54: error: too many arguments to function ‘generic_file_open’
In file included from /tmp/kg/broken/m-manyargs/common.h:3,
                 from /tmp/kg/broken/m-manyargs/t_manyargs.c:1:
/usr/src/linux-headers-6.1.0-56-common/include/linux/fs.h:3350:12: note: declared here
"""

# The C locale: gcc quotes with plain apostrophes.
MEMBER_C_LOCALE = """\
/tmp/kg/broken/m-member/t_member.c:2:56: error: 'struct block_device' has no member named 'bd_inode_gone'; did you mean 'bd_inode'?
/tmp/kg/broken/m-member/t_member.c:2:79: error: control reaches end of non-void function [-Werror=return-type]
cc1: some warnings being treated as errors
"""

UNDECLARED = """\
/tmp/kg/broken/m-undeclared/t_undeclared.c: In function ‘t_undecl’:
/tmp/kg/broken/m-undeclared/t_undeclared.c:2:29: error: ‘SOME_GONE_CONSTANT’ undeclared (first use in this function)
/tmp/kg/broken/m-undeclared/t_undeclared.c:2:29: note: each undeclared identifier is reported only once for each function it appears in
/tmp/kg/broken/m-undeclared/t_undeclared.c:2:53: error: control reaches end of non-void function [-Werror=return-type]
"""

UNKNOWN_TYPE = """\
/tmp/kg/broken/m-typename/t_typename.c:2:12: error: unknown type name ‘gone_type_t’
"""

INCOMPATIBLE = """\
/tmp/kg/broken/m-incompat/t_incompat.c:4:44: error: initialization of ‘int (*)(struct platform_device *)’ from incompatible pointer type ‘void (*)(struct platform_device *)’ [-Werror=incompatible-pointer-types]
/tmp/kg/broken/m-incompat/t_incompat.c:4:44: note: (near initialization for ‘t_drv.remove’)
"""

CONFLICTING = """\
/tmp/kg/broken/m-conflict/t_conflict.c:2:5: error: conflicting types for ‘generic_file_open’; have ‘int(struct inode *)’
/usr/src/linux-headers-6.1.0-56-common/include/linux/fs.h:3350:12: note: previous declaration of ‘generic_file_open’ with type ‘int(struct inode *, struct file *)’
"""

INCOMPLETE = """\
/tmp/kg/broken/m-incomplete/t_incomplete.c: In function ‘t_inc’:
/tmp/kg/broken/m-incomplete/t_incomplete.c:3:44: error: invalid use of undefined type ‘struct gone_struct’
/tmp/kg/broken/m-incomplete/t_incomplete.c:3:49: error: control reaches end of non-void function [-Werror=return-type]
"""

MACRO = """\
/tmp/kg/broken/m-macroargs/t_macroargs.c: In function ‘t_mac’:
/tmp/kg/broken/m-macroargs/t_macroargs.c:2:37: error: macro "min" passed 3 arguments, but takes just 2
In file included from /usr/src/linux-headers-6.1.0-56-common/include/linux/kernel.h:27,
                 from /tmp/kg/broken/m-macroargs/t_macroargs.c:1:
/usr/src/linux-headers-6.1.0-56-common/include/linux/minmax.h:105: note: macro "min" defined here
"""

MAKE_NO_TOOL = """\
make: Entering directory '/tmp/kg/broken/m-header/sub'
pahole_gone --version
make: pahole_gone: No such file or directory
make: *** [Makefile:2: all] Error 127
"""

MAKE_NO_TREE = """\
make -C /nonexistent/build M=/tmp/kg/broken/m-header
make[1]: *** /nonexistent/build: No such file or directory.  Stop.
make: *** [Makefile:2: all] Error 2
"""

SH_NOT_FOUND = """\
/bin/sh: 1: pahole: not found
make[2]: *** [scripts/Makefile.modfinal:63: foo.ko] Error 127
"""


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (
            OPENRAZER_61050,
            BuildError(
                "too_few_arguments",
                "too few arguments to function 'hid_report_raw_event'",
                "driver/razerkbd_driver.c",
                3124,
                symbol="hid_report_raw_event",
            ),
        ),
        (
            V4L2LOOPBACK_612,
            BuildError(
                "implicit_declaration",
                "implicit declaration of function 'strlcpy'; did you mean 'strncpy'?",
                "v4l2loopback.c",
                717,
                symbol="strlcpy",
            ),
        ),
        (
            DM_WRITEBOOST_612,
            BuildError(
                "missing_member",
                "'struct block_device' has no member named 'bd_inode'",
                "dm-writeboost-target.c",
                119,
                member="bd_inode",
                struct="struct block_device",
            ),
        ),
    ],
    ids=["openrazer-hid_report_raw_event", "v4l2loopback-strlcpy", "dm-writeboost-bd_inode"],
)
def test_real_package_breakages(log: str, expected: BuildError) -> None:
    prefixes = ["/tmp/kg/b-razer", "/tmp/kg/b-v4l", "/tmp/kg/b-wb"]
    assert classify_log(log, strip_prefixes=prefixes) == expected


def test_a_clean_build_has_no_error() -> None:
    assert classify_log(ACPI_CALL_612_PASS) is None
    assert classify_log("") is None


@pytest.mark.parametrize(
    ("log", "code", "symbol", "line"),
    [
        (MODPOST, "modpost_undefined", "kmodgate_gone_symbol", None),
        (TOO_MANY, "too_many_arguments", "generic_file_open", 2),
        (UNDECLARED, "undeclared_identifier", "SOME_GONE_CONSTANT", 2),
        (UNKNOWN_TYPE, "unknown_type", "gone_type_t", 2),
        (INCOMPATIBLE, "incompatible_pointer_type", None, 4),
        (CONFLICTING, "conflicting_types", "generic_file_open", 2),
        (INCOMPLETE, "incomplete_type", None, 3),
        (MACRO, "macro_arguments", "min", 2),
        (MAKE_NO_TOOL, "command_not_found", "pahole_gone", None),
        (SH_NOT_FOUND, "command_not_found", "pahole", None),
    ],
)
def test_error_kinds(log: str, code: str, symbol: str | None, line: int | None) -> None:
    error = classify_log(log)
    assert error is not None
    assert (error.code, error.symbol, error.line) == (code, symbol, line)


def test_missing_header_names_the_header_and_place() -> None:
    error = classify_log(MISSING_HEADER, strip_prefixes=["/tmp/kg/broken/m-header/"])
    assert error == BuildError(
        "missing_header",
        "missing header linux/genhd_gone.h",
        "t_header.c",
        2,
        header="linux/genhd_gone.h",
    )


def test_c_locale_quotes_are_understood() -> None:
    error = classify_log(MEMBER_C_LOCALE)
    assert error is not None
    assert (error.code, error.struct, error.member) == (
        "missing_member",
        "struct block_device",
        "bd_inode_gone",
    )


def test_incomplete_type_names_the_struct() -> None:
    error = classify_log(INCOMPLETE)
    assert error is not None and error.struct == "struct gone_struct"


def test_a_consequence_is_never_chosen_over_its_cause() -> None:
    # "control reaches end of non-void function" follows the real error in the
    # log of a function whose return statement no longer compiles; if it comes
    # first it is still not the cause.
    reordered = "\n".join(reversed(UNDECLARED.splitlines()))
    error = classify_log(reordered)
    assert error is not None and error.code == "undeclared_identifier"


def test_only_consequences_still_say_something() -> None:
    log = "foo.c:3:1: error: control reaches end of non-void function [-Werror=return-type]\n"
    error = classify_log(log)
    assert error is not None
    assert error.code == "compile_error"
    assert error.message == "control reaches end of non-void function"


def test_make_stop_is_a_make_error() -> None:
    error = classify_log(MAKE_NO_TREE)
    assert error is not None
    assert error.code == "make_error"
    assert "/nonexistent/build: No such file or directory" in error.message


def test_reason_has_the_result_fields() -> None:
    error = classify_log(DM_WRITEBOOST_612, strip_prefixes=["/tmp/kg/b-wb"])
    assert error is not None
    reason = error.to_reason()
    assert reason["code"] == "missing_member"
    assert reason["file"] == "dm-writeboost-target.c"
    assert reason["line"] == 119
    assert reason["member"] == "bd_inode"
    assert set(reason) >= {"code", "message", "symbol", "file", "line"}
