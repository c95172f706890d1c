"""Entry point of every subsystem process: `python -m moord.supervisor.child NAME CONFIG`.

It names itself (`moord: NAME`), dies with the root (PR_SET_PDEATHSIG) so no orphan
keeps serving after a root crash, starts its actors, binds its bridge, reports readiness
on the pipe the supervisor passed as READY_FD, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import importlib
import logging
import os
import select
import signal
import sys

READY_FD_ENV = "MOORD_READY_FD"
SUPERVISOR_PID_ENV = "MOORD_SUPERVISOR_PID"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` when our parent exits; exit now if it already has."""
    from moord.linux.process import PR_SET_PDEATHSIG, prctl

    prctl(PR_SET_PDEATHSIG, int(sig))
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        sys.exit(1)


def report_ready() -> None:
    """Tell the supervisor this process serves requests now."""
    fd = os.environ.get(READY_FD_ENV)
    if fd and fd.isdigit():
        try:
            os.write(int(fd), b"R")
            os.close(int(fd))
        except OSError:
            pass


def setup_logging(level: str, name: str) -> None:
    """Log to stderr (the journal under systemd) with the process name."""
    numeric = {"trace": 5, "debug": 10, "info": 20, "warn": 30, "warning": 30}.get(level, 40)
    logging.basicConfig(
        level=numeric, stream=sys.stderr, format=f"%(asctime)s moord[{name}:%(process)d] %(levelname)s %(name)s: %(message)s"
    )


def run(name: str, config_path: str) -> int:
    """Run subsystem `name` until SIGTERM; returns the exit status."""
    from setproctitle import setproctitle

    setproctitle(f"moord: {name}")
    die_with_parent()
    # Handlers, not a blocked mask: a blocked mask would be inherited across exec by
    # everything this process starts (runc, shims, containers).
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)  # no race between checking `stopping` and waiting

    import pykka

    from moord.bus.bridge import Bridge
    from moord.bus.client import Client, endpoint_path
    from moord.bus.events import EventPublisher
    from moord.config.model import load_config
    from moord.supervisor.process import PROCESSES, ProcessContext

    config = load_config(config_path)
    setup_logging(config.debug.level, name)
    log = logging.getLogger("moord.child")
    if name not in PROCESSES:
        log.error("unknown subsystem %r", name)
        return 2
    os.makedirs(config.ipc_dir, mode=0o700, exist_ok=True)
    bridge = Bridge(name, endpoint_path(config.ipc_dir, name))
    proc = ProcessContext(
        name=name, config=config, bridge=bridge, client=Client(config.ipc_dir), events=EventPublisher(config.ipc_dir)
    )
    module = importlib.import_module(PROCESSES[name])
    module.start(proc)
    bridge.start()
    report_ready()
    log.info("serving %s", ", ".join(bridge.services) or "nothing")
    while not stopping:
        select.select([wake_r], [], [])
        os.read(wake_r, 64)
    log.info("stopping")
    bridge.stop()
    stop = getattr(module, "stop", None)
    if stop is not None:
        stop(proc)
    pykka.ActorRegistry.stop_all(timeout=5)
    return 0


def main() -> None:
    """Parse argv and run."""
    if len(sys.argv) != 3:
        sys.stderr.write("usage: python -m moord.supervisor.child NAME CONFIG\n")
        sys.exit(2)
    sys.exit(run(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
