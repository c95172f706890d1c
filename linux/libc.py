"""The C library already loaded in this process, for syscalls Python does not wrap.

`ctypes.CDLL(None)` is the process's own libc: no library search (find_library would
spawn ldconfig, costing tens of milliseconds on every import).
"""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)
