"""prctl(2) for the process relationships moord relies on (Python has no binding)."""

from __future__ import annotations

import ctypes
import os

from moord.linux.libc import libc

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    """Call prctl(option, value); OSError on failure."""
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
