"""moorctl's click application: every command, with help and usage errors.

client/cli.py is the entry point: a plain `run` never gets here. Command groups kept in
their own modules (commands_*.py) attach to `main` and its groups on import; they are
imported only when the command line names one of their commands (each costs start-up).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

import click

from moord.client.cli import ROOT_OPTIONS, RUN_OPTIONS, Context, OptionSpec, call, fail, run_command

pass_ctx = click.make_pass_decorator(Context)

__all__ = ["Context", "call", "fail", "main", "pass_ctx"]


def click_settings(spec: OptionSpec) -> dict[str, Any]:
    """click.option keywords for an option of client/cli.py's tables."""
    settings: dict[str, Any] = {"help": spec.help, "show_default": spec.show_default, "envvar": spec.envvar}
    if spec.kind == "flag":
        settings["is_flag"] = True
    elif spec.kind == "multiple":
        settings["multiple"] = True
    elif spec.kind == "count":
        settings.update(type=click.IntRange(min=0), default=spec.default)
    elif spec.kind == "amount":
        settings.update(type=click.FloatRange(min=0), default=spec.default)
    else:
        settings["default"] = spec.default
    return settings


# Top-level commands defined in other modules: name -> module (imported on first use).
LAZY_COMMANDS = {
    "leases": "commands_gc",
    "gc": "commands_gc",
    "content": "commands_storage",
    "snapshots": "commands_storage",
    "namespaces": "commands_storage",
}


def load_commands(modules: Iterable[str]) -> None:
    """Import command modules (each attaches its commands on import)."""
    import importlib

    for module in modules:
        importlib.import_module(f"moord.client.{module}")


class LazyGroup(click.Group):
    """A group some of whose commands live in other modules, imported only when needed.

    `lazy` maps a command name to its module; `extensions` are modules that add
    subcommands to this group, imported for any name not defined here.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, extensions: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})
        self.extensions = extensions

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command (help lists them all: load them all)."""
        load_commands((*self.extensions, *sorted(set(self.lazy.values()))))
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command, its module imported first when it lives elsewhere."""
        if cmd_name not in self.commands:
            load_commands((*self.extensions, *([self.lazy[cmd_name]] if cmd_name in self.lazy else [])))
        return super().get_command(ctx, cmd_name)


def root_options(command: Any) -> Any:
    """The root's global options, from client/cli.py's table."""
    for spec in reversed(ROOT_OPTIONS):
        command = click.option(*spec.decls, spec.dest, **click_settings(spec))(command)
    return command


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS)
@root_options
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


@main.group(cls=LazyGroup, extensions=("commands_images", "commands_registry"))
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


def run_options(command: Any) -> Any:
    """`run`'s options, from the one table (client/cli.py's fast path parses the same)."""
    for spec in reversed(RUN_OPTIONS):
        command = click.option(*spec.decls, spec.dest, **click_settings(spec))(command)
    return command


@main.command(context_settings={"allow_interspersed_args": False})
@run_options
@click.argument("image")
@click.argument("container_id")
@click.argument("args", nargs=-1)
@pass_ctx
def run(ctx: Context, **params: Any) -> None:
    """Run a container: IMAGE ID [-- CMD ARGS...]; the exit code is the container's."""
    run_command(ctx, params)


@main.group(cls=LazyGroup, extensions=("commands_tasks",))
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



