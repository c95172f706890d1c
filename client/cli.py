"""`moorctl`: the command-line client, over moord's ZeroMQ API.

Start-up time is part of every `moorctl run`, so this module imports only click, and
each command imports what it needs (ZeroMQ, msgpack) when it runs; pydantic is never
imported on the client side (the daemon validates every request).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from moord.config.paths import CONFIG_ENV


class Context:
    """Global options, and the client built from them on first use."""

    def __init__(self, config: str | None, address: str | None, namespace: str, timeout: float) -> None:
        self.config = config
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._client: Any = None
        self._state = ""

    @property
    def state_dir(self) -> str:
        """The daemon's state dir (for FIFOs), from the config file."""
        self.client  # noqa: B018  (resolves paths)
        return self._state

    @property
    def client(self) -> Any:
        """The ZeroMQ client (created lazily)."""
        if self._client is None:
            from moord.bus.client import Client
            from moord.config.paths import client_paths

            try:
                state, ipc_dir = client_paths(self.config)
            except (OSError, ValueError) as exc:
                raise click.ClickException(f"cannot read config: {exc}") from None
            if self.address:
                ipc_dir = self.address
            self._state = state
            self._client = Client(ipc_dir, namespace=self.namespace, timeout=self.timeout)
        return self._client


pass_ctx = click.make_pass_decorator(Context)


def fail(exc: Exception) -> None:
    """Print a daemon error the way ctr does and exit 1."""
    code = getattr(exc, "code", "error")
    click.echo(f"moorctl: {code}: {exc}", err=True)
    sys.exit(1)


def call(ctx: Context, kind: str, payload: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """One request; typed errors become a clean message and exit status 1."""
    from moord.messages.errors import MoordError

    try:
        return ctx.client.call(kind, payload or {}, **kw)
    except MoordError as exc:
        fail(exc)
        raise  # unreachable


@click.group()
@click.option("--config", "-c", default=None, help=f"moord config file (default /etc/moord/config.toml, or ${CONFIG_ENV})")
@click.option("--address", "-a", default=None, envvar="MOORD_ADDRESS", help="directory of moord's ipc endpoints")
@click.option("--namespace", "-n", default="default", envvar="CONTAINERD_NAMESPACE", show_default=True)
@click.option("--timeout", default=10.0, show_default=True, help="seconds to wait for each reply")
@click.pass_context
def main(cctx: click.Context, config: str | None, address: str | None, namespace: str, timeout: float) -> None:
    """moorctl: talk to moord."""
    cctx.obj = Context(config, address, namespace, timeout)


# -- supervision tree ------------------------------------------------------------


@main.command()
@pass_ctx
def tree(ctx: Context) -> None:
    """Show the live supervision tree."""
    from moord.client.table import human_duration, human_size, print_table

    reply = call(ctx, "supervisor.tree")
    click.echo(f"moord pid {reply['pid']} {reply['state']} up {human_duration(reply['uptime'])} strategy {reply['strategy']}")
    rows = [
        (c["name"], c["pid"] or "-", c["state"], c["restarts"], human_duration(c["uptime"]), c["restart"], human_size(c["rss"]))
        for c in reply["children"]
    ]
    print_table(("CHILD", "PID", "STATE", "RESTARTS", "UPTIME", "RESTART", "RSS"), rows)


# -- images ------------------------------------------------------------------------


@main.group()
def images() -> None:
    """Manage images."""


@images.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="print only the image refs")
@click.argument("filters", nargs=-1)
@pass_ctx
def images_ls(ctx: Context, quiet: bool, filters: tuple[str, ...]) -> None:
    """List images."""
    from moord.client.table import human_size, print_table

    reply = call(ctx, "images.list", {"filters": list(filters)})
    if quiet:
        for image in reply["images"]:
            click.echo(image["name"])
        return
    rows = []
    for image in reply["images"]:
        target = image["target"]
        labels = ",".join(f"{k}={v}" for k, v in sorted(image["labels"].items())) or "-"
        kind = target["media_type"].rsplit(".", 2)[-2] if "." in target["media_type"] else target["media_type"]
        rows.append((image["name"], target["media_type"], target["digest"], human_size(target["size"]), labels))
        del kind
    print_table(("REF", "TYPE", "DIGEST", "SIZE", "LABELS"), rows)


@images.command("import")
@click.option("--base-name", default="", help="name images lacking a name: <base-name>:<tag> (OCI), <base-name>@<digest> (docker)")
@click.option("--no-unpack", is_flag=True, help="do not unpack into snapshots")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@click.argument("path", type=click.Path(exists=True))
@pass_ctx
def images_import(ctx: Context, base_name: str, no_unpack: bool, snapshotter: str, path: str) -> None:
    """Import an OCI image layout (directory or tar) or a docker-archive (`docker save` tar)."""
    reply = call(
        ctx,
        "transfer.import",
        {"path": os.path.abspath(path), "base_name": base_name, "unpack": not no_unpack, "snapshotter": snapshotter},
        timeout=max(ctx.timeout, 600),
    )
    for image in reply["images"]:
        click.echo(f"{image['name']} {image['target']['digest']}")


@images.command("rm")
@click.option("--sync", is_flag=True, help="return once a garbage collection has removed what the images held")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def images_rm(ctx: Context, sync: bool, names: tuple[str, ...]) -> None:
    """Remove images (ctr images rm: the collection runs after the last one)."""
    for i, name in enumerate(names):
        last = i == len(names) - 1
        call(ctx, "images.delete", {"name": name, "sync": sync and last}, timeout=max(ctx.timeout, 120) if sync and last else None)
        click.echo(name)


@images.command("build-busybox")
@click.option("--ref", default="docker.io/library/busybox:latest", show_default=True)
@click.option("--tar", "as_tar", is_flag=True, help="write a tar of the layout instead of a directory")
@click.argument("path")
def images_build_busybox(ref: str, as_tar: bool, path: str) -> None:
    """Build a busybox OCI image layout from Debian's busybox-static."""
    from moord.oci.busybox import build_busybox_layout

    digest = build_busybox_layout(path, ref=ref, tar=as_tar)
    click.echo(f"{ref} {digest}")


# -- run and tasks -----------------------------------------------------------------


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--rm", "remove", is_flag=True, help="remove the container after it exits (not with --detach)")
@click.option("--detach", "-d", is_flag=True, help="start the task and return")
@click.option("--tty", "-t", is_flag=True, help="allocate a terminal; the local one goes raw")
@click.option("--null-io", is_flag=True, help="send all IO to /dev/null")
@click.option("--log-uri", default="", help="stdout and stderr to file:///path instead of this terminal")
@click.option("--fifo-dir", default="", help="directory for the stdio FIFOs (default <state>/fifo)")
@click.option("--env", multiple=True, help="environment variable NAME=VALUE")
@click.option("--cwd", default="", help="working directory")
@click.option("--user", "-u", default="", help="user[:group] by id or by name (names from the image's /etc/passwd, /etc/group)")
@click.option("--hostname", default="")
@click.option("--read-only", is_flag=True, help="read-only root filesystem")
@click.option("--mount", "mounts", multiple=True, help="type=bind,src=/host,dst=/path,options=rbind:ro")
@click.option("--memory-limit", type=click.IntRange(min=0), default=0, help="memory limit in bytes")
@click.option("--cpus", type=click.FloatRange(min=0), default=0.0, help="CPUs (CFS quota)")
@click.option("--pids-limit", type=click.IntRange(min=0), default=0, help="maximum number of tasks")
@click.option("--privileged", is_flag=True, help="all capabilities, host devices, no masked paths or seccomp")
@click.option("--net-host", is_flag=True, help="use the host's network namespace, /etc/hosts and /etc/resolv.conf")
@click.option("--seccomp", is_flag=True, help="apply containerd's default seccomp profile (off unless given, as ctr)")
@click.option("--seccomp-profile", default="", help="a seccomp profile (OCI JSON file) instead of the default; needs --seccomp")
@click.option("--runtime", default="io.containerd.runc.v2", show_default=True, help="runtime name (io.containerd.crun.v2: crun)")
@click.option("--runc-binary", default="", help="OCI runtime binary for this container: runc or crun")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@click.argument("image")
@click.argument("container_id")
@click.argument("args", nargs=-1)
@pass_ctx
def run(
    ctx: Context,
    remove: bool,
    detach: bool,
    tty: bool,
    null_io: bool,
    log_uri: str,
    fifo_dir: str,
    env: tuple[str, ...],
    cwd: str,
    user: str,
    hostname: str,
    read_only: bool,
    mounts: tuple[str, ...],
    memory_limit: int,
    cpus: float,
    pids_limit: int,
    privileged: bool,
    net_host: bool,
    seccomp: bool,
    seccomp_profile: str,
    runtime: str,
    runc_binary: str,
    snapshotter: str,
    image: str,
    container_id: str,
    args: tuple[str, ...],
) -> None:
    """Run a container: IMAGE ID [-- CMD ARGS...]; the exit code is the container's."""
    from moord.client.run import RunOptions, parse_mount
    from moord.client.run import run as run_container
    from moord.messages.errors import MoordError

    try:
        opts = RunOptions(
            image=image,
            container_id=container_id,
            args=list(args[1:] if args[:1] == ("--",) else args),
            env=list(env),
            remove=remove,
            detach=detach,
            tty=tty,
            cwd=cwd,
            user=user,
            hostname=hostname,
            read_only=read_only,
            mounts=[parse_mount(m) for m in mounts],
            memory_limit=memory_limit,
            cpus=cpus,
            pids_limit=pids_limit,
            privileged=privileged,
            net_host=net_host,
            seccomp=seccomp,
            seccomp_profile=load_seccomp_profile(seccomp_profile, seccomp),
            snapshotter=snapshotter,
            runtime=runtime,
            runtime_binary=runc_binary,
            null_io=null_io,
            log_uri=log_uri,
            fifo_root=fifo_dir or os.path.join(ctx.state_dir, "fifo"),
        )
        status = run_container(ctx.client, opts)
    except MoordError as exc:
        fail(exc)
        return
    sys.exit(status)


def load_seccomp_profile(path: str, enabled: bool) -> dict[str, Any] | None:
    """`--seccomp-profile PATH` as a dict (None: none given); as ctr, only with --seccomp."""
    if not path:
        return None
    if not enabled:
        raise click.UsageError("--seccomp-profile needs --seccomp")
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            profile = json.load(fh)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"cannot read seccomp profile {path}: {exc}") from None
    if not isinstance(profile, dict):
        raise click.UsageError(f"seccomp profile {path} is not a JSON object")
    return profile


@main.group()
def tasks() -> None:
    """Manage tasks (running containers)."""


@tasks.command("ls")
@pass_ctx
def tasks_ls(ctx: Context) -> None:
    """List tasks."""
    from moord.client.table import print_table

    reply = call(ctx, "tasks.list")
    print_table(("TASK", "PID", "STATUS"), [(t["container_id"], t["pid"], t["status"].upper()) for t in reply["tasks"]])


@tasks.command("kill")
@click.option("--signal", "-s", "sig", default="SIGTERM", show_default=True, help="signal name or number")
@click.option("--all", "-a", "all_", is_flag=True, help="signal all processes of the task")
@click.option("--exec-id", default="", help="signal this exec'd process instead of the init")
@click.argument("container_id")
@pass_ctx
def tasks_kill(ctx: Context, sig: str, all_: bool, exec_id: str, container_id: str) -> None:
    """Signal a task."""
    payload = {"container_id": container_id, "exec_id": exec_id, "signal": parse_signal(sig), "all": all_}
    call(ctx, "tasks.kill", payload)


@tasks.command("rm")
@click.option("--exec-id", default="", help="delete this exec'd process instead of the task")
@click.argument("container_id")
@pass_ctx
def tasks_rm(ctx: Context, exec_id: str, container_id: str) -> None:
    """Delete a stopped task (and the stdio FIFOs moorctl made for it)."""
    from moord.client.run import delete_task
    from moord.messages.errors import MoordError

    try:
        reply = delete_task(ctx.client, container_id, os.path.join(ctx.state_dir, "fifo"), exec_id)
    except MoordError as exc:
        fail(exc)
        return
    click.echo(f"{exec_id or container_id} exit status {reply['exit_status']}")


main.add_command(tasks_kill, "kill")


def parse_signal(text: str) -> int:
    """`SIGKILL`, `KILL` or `9` -> 9."""
    import signal as signals

    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(getattr(signals.Signals, name))
    except AttributeError:
        raise click.BadParameter(f"unknown signal {text!r}") from None


# -- containers, snapshots, content, namespaces, events ------------------------------


@main.group()
def containers() -> None:
    """Manage containers."""


@containers.command("ls")
@click.argument("filters", nargs=-1)
@pass_ctx
def containers_ls(ctx: Context, filters: tuple[str, ...]) -> None:
    """List containers."""
    from moord.client.table import print_table

    reply = call(ctx, "containers.list", {"filters": list(filters)})
    print_table(
        ("CONTAINER", "IMAGE", "RUNTIME"),
        [(c["id"], c["image"] or "-", c["runtime"]["name"]) for c in reply["containers"]],
    )


@containers.command("rm")
@click.argument("ids", nargs=-1, required=True)
@pass_ctx
def containers_rm(ctx: Context, ids: tuple[str, ...]) -> None:
    """Delete containers (and their snapshots)."""
    for container_id in ids:
        record = call(ctx, "containers.get", {"id": container_id})["container"]
        call(ctx, "containers.delete", {"id": container_id})
        if record.get("snapshot_key"):
            from moord.messages.errors import NotFound

            try:
                ctx.client.call("snapshots.remove", {"snapshotter": record["snapshotter"], "key": record["snapshot_key"]})
            except NotFound:
                pass


@main.command()
@click.argument("topics", nargs=-1)
@pass_ctx
def events(ctx: Context, topics: tuple[str, ...]) -> None:
    """Print events as they happen (topics are prefixes, e.g. /tasks)."""
    import json

    from moord.bus.events import EventSubscriber

    subscriber = EventSubscriber(ctx.client.ipc_dir, topics or ("",))
    try:
        while True:
            event = subscriber.receive()
            if event is None:
                continue
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.get("timestamp", 0)))
            click.echo(f"{stamp} {event.get('topic')} {event.get('ns')} {json.dumps(event.get('event'), default=str)}")
    except KeyboardInterrupt:
        pass
    finally:
        subscriber.close()



# Command groups kept in their own modules attach themselves to `main` on import.
from moord.client import commands_gc, commands_images, commands_registry, commands_storage, commands_tasks  # noqa: E402,F401
