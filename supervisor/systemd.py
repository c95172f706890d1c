"""sd_notify without libsystemd: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Every function is a no-op when NOTIFY_SOCKET is unset, so the daemon runs the same
under systemd, under a test, or by hand.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send one notification; returns whether a notify socket was there to receive it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(0.01, int(usec) / 1_000_000 / 2)
    except ValueError:
        return None
