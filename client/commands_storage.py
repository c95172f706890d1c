"""moorctl commands for the storage subsystems: content, snapshots, namespaces.

Columns and behaviour follow ctr 1.6 (cmd/ctr/commands/{content,snapshots,namespaces}):
the same headers, sizes and ages printed the way ctr's Go helpers print them, labels
given as `key=value` arguments (an empty value clears a label). Only click is imported
at module level; pydantic never is.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Sequence

import click

from moord.client.app import Context, call, fail, main, pass_ctx

DEFAULT_SNAPSHOTTER = "overlayfs"
# The namespace label naming its default snapshotter (containerd's client reads it too).
SNAPSHOTTER_LABEL = "containerd.io/defaults/snapshotter"
GC_ROOT_LABEL = "containerd.io/gc.root"
_KIND_NAMES = {"active": "Active", "view": "View", "committed": "Committed"}


# -- formatting as ctr's Go helpers do ----------------------------------------------------


def go_human_size(size: float) -> str:
    """docker/go-units HumanSize: decimal units, 4 significant digits (`1.234kB`)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
    index = 0
    while size >= 1000 and index < len(units) - 1:
        size /= 1000.0
        index += 1
    return f"{size:.4g}{units[index]}"


def go_human_duration(seconds: float) -> str:
    """docker/go-units HumanDuration (`Less than a second`, `3 minutes`, `About an hour`)."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def rfc3339(stamp: float) -> str:
    """A UTC timestamp as Go's time.Time marshals it (nanoseconds trimmed to what we keep)."""
    whole = int(stamp)
    frac = f"{stamp - whole:.9f}"[2:].rstrip("0")
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{text}.{frac}Z" if frac else f"{text}Z"


def joined_labels(labels: dict[str, str], empty: str = "") -> str:
    """`k=v,k2=v2` sorted by key; `empty` when there are none."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or empty


def label_args(pairs: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments as a dict (ctr's ObjectWithLabelArgs: no `=` means empty value)."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not key:
            raise click.BadParameter(f"label {pair!r} has no key")
        labels[key] = value
    return labels


def print_json(value: Any) -> None:
    """Indented JSON as ctr's PrintAsJSON."""
    click.echo(json.dumps(value, indent=4))


def print_mounts(target: str, mounts: list[dict[str, Any]]) -> None:
    """One `mount` command line per mount, as ctr prints them."""
    for m in mounts:
        click.echo(f"mount -t {m['type']} {m['source']} {target} -o {','.join(m.get('options') or [])}")


def _with_errors(ctx: Context, action: Callable[[], Any]) -> Any:
    """Run a client action; typed daemon errors exit 1 with ctr's message format."""
    from moord.messages.errors import MoordError

    try:
        return action()
    except MoordError as exc:
        fail(exc)


# -- content -------------------------------------------------------------------------------


@main.group()
def content() -> None:
    """Manage content (blobs by digest, ingests)."""


@content.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="print only the blob digests")
@click.argument("filters", nargs=-1)
@pass_ctx
def content_ls(ctx: Context, quiet: bool, filters: tuple[str, ...]) -> None:
    """List blobs of the namespace (FILTERS as containerd's, e.g. 'labels."a.b"==c')."""
    from moord.client.table import print_table

    reply = call(ctx, "content.list", {"filters": list(filters)})
    if quiet:
        for info in reply["infos"]:
            click.echo(info["digest"])
        return
    now = time.time()
    print_table(
        ("DIGEST", "SIZE", "AGE", "LABELS"),
        [
            (
                i["digest"],
                go_human_size(i["size"]),
                go_human_duration(now - i["created_at"]),
                joined_labels(i["labels"], "-"),
            )
            for i in reply["infos"]
        ],
    )


@content.command("get")
@click.argument("digests", nargs=-1, required=True)
@pass_ctx
def content_get(ctx: Context, digests: tuple[str, ...]) -> None:
    """Write the bytes of blobs to stdout."""
    out = sys.stdout.buffer
    for digest in digests:
        offset = 0
        while True:
            reply, frames = _with_errors(
                ctx, lambda: ctx.client.call_frames("content.read", {"digest": digest, "offset": offset})
            )
            for frame in frames:
                out.write(frame)
                offset += len(memoryview(frame))
            if offset >= reply["size"] or not frames:
                break
    out.flush()


@content.command("rm")
@click.argument("digests", nargs=-1, required=True)
@pass_ctx
def content_rm(ctx: Context, digests: tuple[str, ...]) -> None:
    """Delete blobs from the namespace; prints each one deleted (unknown ones are skipped, as ctr)."""
    from moord.messages.errors import MoordError, NotFound

    failed = False
    for digest in digests:
        try:
            ctx.client.call("content.delete", {"digest": digest})
        except NotFound:
            click.echo(f"moorctl: {digest}: not found", err=True)
            continue
        except MoordError as exc:
            click.echo(f"moorctl: could not delete {digest}: {getattr(exc, 'code', 'error')}: {exc}", err=True)
            failed = True
            continue
        click.echo(digest)
    if failed:
        sys.exit(1)


@content.command("label")
@click.argument("digest")
@click.argument("labels", nargs=-1)
@pass_ctx
def content_label(ctx: Context, digest: str, labels: tuple[str, ...]) -> None:
    """Set labels of a blob (KEY=VALUE; KEY= clears); prints the resulting labels."""
    wanted = label_args(labels)
    if not wanted:
        info = call(ctx, "content.info", {"digest": digest})["info"]
    else:
        info = call(
            ctx,
            "content.update",
            {
                "info": {"digest": digest, "size": 0, "labels": {k: v for k, v in wanted.items() if v}},
                "update_mask": [f"labels.{k}" for k in wanted],
            },
        )["info"]
    click.echo(joined_labels(info["labels"]))


@content.command("active")
@click.argument("match", required=False, default="")
@pass_ctx
def content_active(ctx: Context, match: str) -> None:
    """List ingests in progress (MATCH: a regexp on the ref, or a filter such as ref~=layer)."""
    from moord.client.table import print_table

    filters = []
    if match:
        if any(op in match for op in ("==", "!=", "~=")):
            filters.append(match)
        else:
            filters.append('ref~="' + match.replace("\\", "\\\\").replace('"', '\\"') + '"')
    reply = call(ctx, "content.list_statuses", {"filters": filters})
    now = time.time()
    print_table(
        ("REF", "SIZE", "AGE"),
        [(s["ref"], go_human_size(s["offset"]), go_human_duration(now - s["started_at"])) for s in reply["statuses"]],
    )


# -- snapshots -----------------------------------------------------------------------------


class SnapshotsContext:
    """The snapshotter chosen for a `snapshots` command (flag, env, namespace label, default)."""

    def __init__(self, ctx: Context, snapshotter: str | None) -> None:
        self.ctx = ctx
        self._snapshotter = snapshotter

    @property
    def snapshotter(self) -> str:
        """The flag's value, else the namespace's default label, else overlayfs."""
        if not self._snapshotter:
            labels = call(self.ctx, "namespaces.get", {"name": self.ctx.namespace})["namespace"]["labels"]
            self._snapshotter = labels.get(SNAPSHOTTER_LABEL) or DEFAULT_SNAPSHOTTER
        return self._snapshotter

    def call(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A snapshots.* request to the chosen snapshotter."""
        return call(self.ctx, kind, {"snapshotter": self.snapshotter, **payload})


pass_snapshots = click.make_pass_decorator(SnapshotsContext)


@main.group()
@click.option("--snapshotter", default=None, envvar="CONTAINERD_SNAPSHOTTER", help="snapshotter name (default: the namespace's, else overlayfs)")
@click.pass_context
def snapshots(cctx: click.Context, snapshotter: str | None) -> None:
    """Manage snapshots."""
    cctx.obj = SnapshotsContext(cctx.find_object(Context), snapshotter)


def snapshotter_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--snapshotter` also after the subcommand (`snapshots ls --snapshotter native`)."""

    def remember(cctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            cctx.find_object(SnapshotsContext)._snapshotter = value

    return click.option(
        "--snapshotter", default=None, expose_value=False, callback=remember, help="snapshotter name"
    )(func)


def _info_json(info: dict[str, Any]) -> dict[str, Any]:
    # The field names and order of containerd's snapshots.Info as ctr prints it.
    out: dict[str, Any] = {"Kind": _KIND_NAMES.get(info["kind"], info["kind"]), "Name": info["name"]}
    if info.get("parent"):
        out["Parent"] = info["parent"]
    if info.get("labels"):
        out["Labels"] = dict(sorted(info["labels"].items()))
    out["Created"] = rfc3339(info.get("created_at", 0.0))
    out["Updated"] = rfc3339(info.get("updated_at", 0.0))
    return out


@snapshots.command("ls")
@snapshotter_option
@click.argument("filters", nargs=-1)
@pass_snapshots
def snapshots_ls(sn: SnapshotsContext, filters: tuple[str, ...]) -> None:
    """List snapshots (FILTERS as containerd's, e.g. kind==committed)."""
    from moord.client.table import print_table

    reply = sn.call("snapshots.list", {"filters": list(filters)})
    print_table(
        ("KEY", "PARENT", "KIND"),
        [(i["name"], i["parent"], _KIND_NAMES.get(i["kind"], i["kind"])) for i in reply["info"]],
    )


@snapshots.command("info")
@snapshotter_option
@click.argument("key")
@pass_snapshots
def snapshots_info(sn: SnapshotsContext, key: str) -> None:
    """Print a snapshot's info as JSON."""
    print_json(_info_json(sn.call("snapshots.stat", {"key": key})["info"]))


@snapshots.command("usage")
@snapshotter_option
@click.option("-b", "in_bytes", is_flag=True, help="display size in bytes")
@click.argument("keys", nargs=-1)
@pass_snapshots
def snapshots_usage(sn: SnapshotsContext, in_bytes: bool, keys: tuple[str, ...]) -> None:
    """Disk usage of snapshots (all of them when no KEY is given); parents not included."""
    from moord.client.table import human_size, print_table

    names = list(keys) or [i["name"] for i in sn.call("snapshots.list", {})["info"]]
    rows = []
    for name in names:
        usage = sn.call("snapshots.usage", {"key": name})
        rows.append((name, str(usage["size"]) if in_bytes else human_size(usage["size"]), usage["inodes"]))
    print_table(("KEY", "SIZE", "INODES"), rows)


@snapshots.command("rm")
@snapshotter_option
@click.argument("keys", nargs=-1, required=True)
@pass_snapshots
def snapshots_rm(sn: SnapshotsContext, keys: tuple[str, ...]) -> None:
    """Remove snapshots (one with children is refused)."""
    for key in keys:
        sn.call("snapshots.remove", {"key": key})


def label_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--label KEY=VALUE` (repeatable): labels for the new snapshot, over ctr's defaults."""
    return click.option("--label", "labels", multiple=True, help="label KEY=VALUE for the snapshot (repeatable)")(func)


def _create(sn: SnapshotsContext, kind: str, key: str, parent: str, labels: dict[str, str], target: str, as_json: bool) -> None:
    reply = sn.call(kind, {"key": key, "parent": parent, "labels": labels})
    if target:
        print_mounts(target, reply["mounts"])
    if as_json:
        print_json(reply["mounts"])


@snapshots.command("prepare")
@snapshotter_option
@click.option("--target", "-t", default="", help="print mount commands for this target path")
@click.option("--mounts", "as_json", is_flag=True, help="print the snapshot's mounts as JSON")
@label_option
@click.argument("key")
@click.argument("parent", required=False, default="")
@pass_snapshots
def snapshots_prepare(sn: SnapshotsContext, target: str, as_json: bool, labels: tuple[str, ...], key: str, parent: str) -> None:
    """Prepare active snapshot KEY on committed PARENT (labelled gc.root, as ctr does)."""
    wanted = {GC_ROOT_LABEL: rfc3339(time.time()), **label_args(labels)}
    _create(sn, "snapshots.prepare", key, parent, wanted, target, as_json)


@snapshots.command("view")
@snapshotter_option
@click.option("--target", "-t", default="", help="print mount commands for this target path")
@click.option("--mounts", "as_json", is_flag=True, help="print the snapshot's mounts as JSON")
@label_option
@click.argument("key")
@click.argument("parent", required=False, default="")
@pass_snapshots
def snapshots_view(sn: SnapshotsContext, target: str, as_json: bool, labels: tuple[str, ...], key: str, parent: str) -> None:
    """Create read-only view KEY of committed PARENT (unlabelled, as ctr: the GC may take it)."""
    _create(sn, "snapshots.view", key, parent, label_args(labels), target, as_json)


@snapshots.command("commit")
@snapshotter_option
@label_option
@click.argument("name")
@click.argument("active")
@pass_snapshots
def snapshots_commit(sn: SnapshotsContext, labels: tuple[str, ...], name: str, active: str) -> None:
    """Commit active snapshot ACTIVE as NAME (labelled gc.root, as ctr does)."""
    wanted = {GC_ROOT_LABEL: rfc3339(time.time()), **label_args(labels)}
    sn.call("snapshots.commit", {"name": name, "key": active, "labels": wanted})


@snapshots.command("mounts")
@snapshotter_option
@click.argument("target")
@click.argument("key")
@pass_snapshots
def snapshots_mounts(sn: SnapshotsContext, target: str, key: str) -> None:
    """Print the mount commands that make snapshot KEY's filesystem at TARGET."""
    print_mounts(target, sn.call("snapshots.mounts", {"key": key})["mounts"])


@snapshots.command("label")
@snapshotter_option
@click.argument("key")
@click.argument("labels", nargs=-1)
@pass_snapshots
def snapshots_label(sn: SnapshotsContext, key: str, labels: tuple[str, ...]) -> None:
    """Set labels of a snapshot (KEY=VALUE; KEY= clears); prints the resulting labels."""
    wanted = label_args(labels)
    if not wanted:
        info = sn.call("snapshots.stat", {"key": key})["info"]
    else:
        info = sn.call(
            "snapshots.update",
            {
                "info": {"name": key, "kind": "active", "labels": {k: v for k, v in wanted.items() if v}},
                "update_mask": [f"labels.{k}" for k in wanted],
            },
        )["info"]
    click.echo(joined_labels(info["labels"]))


@snapshots.command("tree")
@snapshotter_option
@pass_snapshots
def snapshots_tree(sn: SnapshotsContext) -> None:
    """Show snapshots as a tree of parents and children."""
    infos = sn.call("snapshots.list", {})["info"]
    children: dict[str, list[str]] = {}
    for info in infos:
        children.setdefault(info["parent"], []).append(info["name"])

    def show(name: str, level: int) -> None:
        prefix = "  " * level + ("\\_" if level else "")
        click.echo(f"{prefix} {name}")
        for child in children.get(name, []):
            show(child, level + 1)

    for root in children.get("", []):
        show(root, 0)


# -- namespaces ----------------------------------------------------------------------------


@main.group()
def namespaces() -> None:
    """Manage namespaces."""


@namespaces.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="print only the namespace names")
@pass_ctx
def namespaces_ls(ctx: Context, quiet: bool) -> None:
    """List namespaces."""
    from moord.client.table import print_table

    reply = call(ctx, "namespaces.list")
    if quiet:
        for ns in reply["namespaces"]:
            click.echo(ns["name"])
        return
    print_table(("NAME", "LABELS"), [(n["name"], joined_labels(n["labels"])) for n in reply["namespaces"]])


@namespaces.command("create")
@click.argument("name")
@click.argument("labels", nargs=-1)
@pass_ctx
def namespaces_create(ctx: Context, name: str, labels: tuple[str, ...]) -> None:
    """Create a namespace with labels KEY=VALUE."""
    call(ctx, "namespaces.create", {"namespace": {"name": name, "labels": label_args(labels)}})


@namespaces.command("rm")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def namespaces_rm(ctx: Context, names: tuple[str, ...]) -> None:
    """Remove empty namespaces; prints each name removed (or already gone, as ctr)."""
    from moord.messages.errors import MoordError, NotFound

    failed = False
    for name in names:
        try:
            ctx.client.call("namespaces.delete", {"name": name})
        except NotFound:
            pass
        except MoordError as exc:
            click.echo(f"moorctl: unable to delete {name}: {getattr(exc, 'code', 'error')}: {exc}", err=True)
            failed = True
            continue
        click.echo(name)
    if failed:
        sys.exit(1)


@namespaces.command("label")
@click.argument("name")
@click.argument("labels", nargs=-1)
@pass_ctx
def namespaces_label(ctx: Context, name: str, labels: tuple[str, ...]) -> None:
    """Set labels of a namespace (KEY=VALUE; KEY= clears)."""
    wanted = label_args(labels)
    if not wanted:
        return
    call(
        ctx,
        "namespaces.update",
        {
            "namespace": {"name": name, "labels": {k: v for k, v in wanted.items() if v}},
            "update_mask": [f"labels.{k}" for k in wanted],
        },
    )
