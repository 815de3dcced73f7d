"""Reading the files a reference names, with every failure said as a user error."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kmodgate.errors import UserError


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError("no such file", where=path) from None
    except IsADirectoryError:
        raise UserError("is a directory, expected a file", where=path) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=path) from None


def path_kind(ref: str, expected: str) -> str | None:
    """"dir", "file" or None if *ref* names nothing on disk.

    Path.is_dir() raises on EACCES (Python 3.11) instead of answering, so
    stat once here and turn every other failure into one line naming *ref*.
    """
    try:
        mode = os.stat(ref).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=ref) from None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    raise UserError(f"not a regular file or directory, expected {expected}", where=ref)
