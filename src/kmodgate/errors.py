"""The two kinds of error kmodgate raises.

A *user* error means the input is wrong (a corrupt .ko, a malformed
Module.symvers, an unknown kernel): the person can fix it.  An
*infrastructure* error means kmodgate or the machine failed (apt is broken, a
tool is missing): nobody's module is at fault.  A module failing its check is
neither; it is a result.  Only the front ends turn these into exit codes.
"""

from __future__ import annotations

from pathlib import Path

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USER_ERROR = 2
EXIT_INFRA_ERROR = 3


class KmodgateError(Exception):
    """Base class: a one-line message a person can act on."""

    exit_code = EXIT_INFRA_ERROR

    def __init__(self, message: str, *, where: str | Path | None = None) -> None:
        self.message = message
        self.where = str(where) if where is not None else None
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UserError(KmodgateError):
    """The input is wrong; the person who gave it can fix it."""

    exit_code = EXIT_USER_ERROR


class InfraError(KmodgateError):
    """kmodgate, a tool it runs or the machine failed."""

    exit_code = EXIT_INFRA_ERROR
