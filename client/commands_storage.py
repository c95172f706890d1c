"""moorctl commands for the storage subsystems: content, snapshots, namespaces."""

from __future__ import annotations

import time

import click

from moord.client.cli import Context, call, main, pass_ctx


@main.group()
def snapshots() -> None:
    """Manage snapshots."""


@snapshots.command("ls")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@pass_ctx
def snapshots_ls(ctx: Context, snapshotter: str) -> None:
    """List snapshots."""
    from moord.client.table import print_table

    reply = call(ctx, "snapshots.list", {"snapshotter": snapshotter})
    print_table(("KEY", "PARENT", "KIND"), [(i["name"], i["parent"], i["kind"].capitalize()) for i in reply["info"]])


@main.group()
def content() -> None:
    """Manage content."""


@content.command("ls")
@click.argument("filters", nargs=-1)
@pass_ctx
def content_ls(ctx: Context, filters: tuple[str, ...]) -> None:
    """List blobs."""
    from moord.client.table import human_size, print_table

    reply = call(ctx, "content.list", {"filters": list(filters)})
    now = time.time()
    print_table(
        ("DIGEST", "SIZE", "AGE", "LABELS"),
        [
            (
                i["digest"],
                human_size(i["size"]),
                f"{int(now - i['created_at'])}s",
                ",".join(f"{k}={v}" for k, v in sorted(i["labels"].items())) or "-",
            )
            for i in reply["infos"]
        ],
    )


@main.group()
def namespaces() -> None:
    """Manage namespaces."""


@namespaces.command("ls")
@pass_ctx
def namespaces_ls(ctx: Context) -> None:
    """List namespaces."""
    from moord.client.table import print_table

    reply = call(ctx, "namespaces.list")
    print_table(
        ("NAME", "LABELS"),
        [(n["name"], ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))) for n in reply["namespaces"]],
    )
