"""sd_notify without libsystemd: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

The notifier takes NOTIFY_SOCKET and WATCHDOG_* out of the environment when created
(sd_notify's unset_environment): every process the daemon starts inherits its
environment, and runc in particular treats NOTIFY_SOCKET as the container's own and
then waits for the container to notify. Without NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """The systemd notification channel of this process, if it has one."""

    def __init__(self) -> None:
        address = os.environ.pop("NOTIFY_SOCKET", "")
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        if usec.isdigit() and (not pid.isdigit() or int(pid) == os.getpid()):
            # Ping at half the timeout, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = max(0.01, int(usec) / 1_000_000 / 2)

    def notify(self, state: str) -> bool:
        """Send one notification; returns whether a notify socket received it."""
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self.address)
                sock.sendall(state.encode())
            except OSError:
                return False
        return True
