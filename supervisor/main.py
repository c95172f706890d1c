"""`moord`: the root supervisor (systemd's main PID), and `moord config default|dump`."""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import sys
import time

import click

from moord.config.model import Config, ConfigError, dump_toml, load_config
from moord.config.paths import DEFAULT_CONFIG_PATH, config_path

log = logging.getLogger("moord")


def _load(path: str | None) -> tuple[Config, str]:
    resolved = config_path(path)
    try:
        if resolved == DEFAULT_CONFIG_PATH and not os.path.exists(resolved):
            return Config(), resolved
        return load_config(resolved), resolved
    except ConfigError as exc:
        click.echo(f"moord: invalid configuration:\n{exc}", err=True)
        sys.exit(1)


@click.group(invoke_without_command=True)
@click.option("--config", "-c", "config_file", default=None, help=f"config file (default {DEFAULT_CONFIG_PATH}, or $MOORD_CONFIG)")
@click.option("--log-level", "-l", default=None, help="override [debug] level")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, log_level: str | None) -> None:
    """moord: a container runtime daemon, containerd rebuilt as supervised actors."""
    ctx.ensure_object(dict)
    ctx.obj["config_file"] = config_file
    if ctx.invoked_subcommand is None:
        config, _ = _load(config_file)
        if log_level:
            config.debug.level = log_level  # type: ignore[assignment]
        sys.exit(run_daemon(config))


@main.group("config")
def config_group() -> None:
    """Show configuration."""


@config_group.command("default")
def config_default() -> None:
    """Print the default configuration."""
    click.echo(dump_toml(Config()), nl=False)


@config_group.command("dump")
@click.pass_context
def config_dump(ctx: click.Context) -> None:
    """Print the configuration in force (file merged over defaults)."""
    config, _ = _load(ctx.obj.get("config_file"))
    click.echo(dump_toml(config), nl=False)


def _take_lock(state: str) -> int:
    path = os.path.join(state, "moord.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        raise click.ClickException(f"another moord (pid {holder or '?'}) is running with state dir {state}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def run_daemon(config: Config) -> int:
    """Run the supervision tree until SIGTERM/SIGINT or escalation; returns the exit status."""
    from setproctitle import setproctitle

    from moord.supervisor.child import setup_logging
    from moord.supervisor.systemd import Notifier

    systemd = Notifier()  # first: nothing we start may inherit NOTIFY_SOCKET
    setproctitle("moord")
    setup_logging(config.debug.level, "supervisor")
    for path, mode in ((config.root, 0o711), (config.state, 0o711), (config.ipc_dir, 0o700)):
        os.makedirs(path, mode=mode, exist_ok=True)
    lock_fd = _take_lock(config.state)
    # Children read the validated, effective config, whatever file (or none) it came from.
    effective = os.path.join(config.state, "moord.toml")
    with open(effective + ".tmp", "w") as fh:
        fh.write(dump_toml(config))
    os.replace(effective + ".tmp", effective)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)

    import pykka

    from moord.bus.bridge import Bridge
    from moord.bus.client import endpoint_path
    from moord.supervisor.tree import ChildExited, StartAll, StopAll, SupervisorActor, default_spec

    outcome: list[tuple[str, int]] = []

    def escalate(reason: str, status: int) -> None:
        outcome.append((reason, status))
        os.write(wake_w, b"\0")

    spec = default_spec(config, effective)
    actor = SupervisorActor.start(spec, escalate)
    bridge = Bridge("supervisor", endpoint_path(config.ipc_dir, "supervisor"))
    bridge.serve(actor, SupervisorActor.kinds())
    bridge.start()
    systemd.notify(f"STATUS=starting {len(spec.children)} subsystems")
    began = time.monotonic()
    if not actor.ask(StartAll()):
        reason = outcome[0][0] if outcome else "start failed"
        systemd.notify(f"STATUS=failed: {reason}")
        bridge.stop()
        pykka.ActorRegistry.stop_all()
        return 1
    log.info("moord ready in %.2fs (pid %d)", time.monotonic() - began, os.getpid())
    systemd.notify(f"READY=1\nSTATUS=serving ({len(spec.children)} subsystems)\nMAINPID={os.getpid()}")
    watchdog = systemd.watchdog_interval
    next_ping = time.monotonic()
    status = 0
    while True:
        timeout = None if watchdog is None else max(0.0, next_ping - time.monotonic())
        ready, _, _ = select.select([wake_r], [], [], timeout)
        if watchdog is not None and time.monotonic() >= next_ping:
            systemd.notify("WATCHDOG=1")
            next_ping = time.monotonic() + watchdog
        if not ready:
            continue
        signals = os.read(wake_r, 256)
        if signal.SIGCHLD in signals:
            actor.tell(ChildExited())
        if outcome:
            reason, status = outcome[0]
            if status == 0:
                break  # a requested shutdown: stop below
            log.error("escalated: %s", reason)
            systemd.notify(f"STATUS=escalated: {reason}")
            break
        if signal.SIGTERM in signals or signal.SIGINT in signals:
            log.info("signal received: stopping (running containers keep running)")
            break
    systemd.notify("STOPPING=1\nSTATUS=stopping")
    actor.ask(StopAll("shutdown"), timeout=300)
    bridge.stop()
    pykka.ActorRegistry.stop_all()
    os.close(lock_fd)
    return status


if __name__ == "__main__":
    main()
