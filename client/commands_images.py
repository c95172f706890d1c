"""moorctl images: export, check, usage, tag, label and unpack (the rest of the Images API).

Follows ctr 1.6 (cmd/ctr/commands/images) where ctr has the command: the same arguments
and columns. Only click is imported at module level; pydantic never is.
"""

from __future__ import annotations

import os
import sys

import click

from moord.client.app import Context, call, fail, images, pass_ctx

# Exports and unpacks of large images take a while: wait this long for the reply.
LONG_TIMEOUT = 3600.0


@images.command("export")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci", show_default=True,
              help="oci: OCI image layout (with Docker's manifest.json, as ctr); docker: a `docker save` tar")
@click.option("--dir", "directory", is_flag=True, help="write an OCI layout directory instead of a tar")
@click.option("--force", is_flag=True, help="replace an existing file (add to an existing layout directory)")
@click.option("--platform", "platforms", multiple=True, help="os/arch[/variant] to export (default: this host's)")
@click.option("--all-platforms", is_flag=True, help="export every platform of an index (all must be present)")
@click.option("--skip-manifest-json", is_flag=True, help="do not add Docker's manifest.json to an OCI tar")
@click.argument("out")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def images_export(
    ctx: Context, fmt: str, directory: bool, force: bool, platforms: tuple[str, ...], all_platforms: bool,
    skip_manifest_json: bool, out: str, names: tuple[str, ...],
) -> None:
    """Export images to OUT (a path the daemon writes): OUT NAME..."""
    from moord.client.table import human_size

    reply = call(
        ctx,
        "transfer.export",
        {
            "names": list(names), "path": os.path.abspath(out), "format": fmt, "directory": directory,
            "overwrite": force, "platforms": list(platforms), "all_platforms": all_platforms,
            "skip_manifest_json": skip_manifest_json,
        },
        timeout=max(ctx.timeout, LONG_TIMEOUT),
    )
    click.echo(f"{reply['path']}: {len(reply['images'])} image(s), {reply['blobs']} blobs, {human_size(reply['size'])}")


@images.command("check")
@click.option("--quiet", "-q", is_flag=True, help="print only the ready image refs (complete and unpacked)")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@click.option("--platform", default="", help="os/arch[/variant] (default: this host's)")
@click.argument("filters", nargs=-1)
@pass_ctx
def images_check(ctx: Context, quiet: bool, snapshotter: str, platform: str, filters: tuple[str, ...]) -> None:
    """Check that images' content is all here (ctr images check)."""
    from moord.client.table import human_size, print_table

    reply = call(
        ctx, "transfer.check", {"filters": list(filters), "snapshotter": snapshotter, "platform": platform},
        timeout=max(ctx.timeout, 120),
    )
    rows, failed = [], False
    for checked in reply["images"]:
        image = checked["image"]
        present = sum(d["size"] for d in checked["present"])
        required = sum(d["size"] for d in checked["required"])
        complete = checked["available"] and not checked["missing"] and not checked["error"]
        if checked["error"]:
            status, size, failed = "error", "-", True
            click.echo(f"moorctl: unable to check {image['name']}: {checked['error']}", err=True)
        elif not checked["available"]:
            status, size = f"unavailable ({len(checked['present'])}/?)", f"{human_size(present)}/?"
        else:
            status = ("incomplete" if checked["missing"] else "complete") + f" ({len(checked['present'])}/{len(checked['required'])})"
            size = f"{human_size(present)}/{human_size(required)}"
        if quiet:
            if complete:
                click.echo(image["name"])
            continue
        target = image["target"]
        rows.append((image["name"], target["media_type"], target["digest"], status, size, str(checked["unpacked"]).lower()))
    if not quiet:
        print_table(("REF", "TYPE", "DIGEST", "STATUS", "SIZE", "UNPACKED"), rows)
    if failed:
        sys.exit(1)


@images.command("usage")
@click.option("--platform", default="", help="count only this platform's manifest (default: every platform present)")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def images_usage(ctx: Context, platform: str, names: tuple[str, ...]) -> None:
    """Bytes images hold: their content, and their unpacked snapshots."""
    from moord.client.table import human_size, print_table

    rows = []
    for name in names:
        reply = call(ctx, "transfer.usage", {"name": name, "platform": platform}, timeout=max(ctx.timeout, 120))
        rows.append((
            name, human_size(reply["content_size"]), reply["blobs"], reply["missing"],
            human_size(reply["snapshot_size"]), reply["snapshots"],
        ))
    print_table(("REF", "CONTENT", "BLOBS", "MISSING", "SNAPSHOTS", "LAYERS"), rows)


@images.command("tag")
@click.option("--force", is_flag=True, help="replace target refs that exist")
@click.argument("source")
@click.argument("targets", nargs=-1, required=True)
@pass_ctx
def images_tag(ctx: Context, force: bool, source: str, targets: tuple[str, ...]) -> None:
    """Give an image more names: SOURCE TARGET... (ctr images tag)."""
    from moord.messages.errors import AlreadyExists, MoordError

    image = call(ctx, "images.get", {"name": source})["image"]
    for target in targets:
        record = {"name": target, "target": image["target"], "labels": image["labels"]}
        try:
            try:
                ctx.client.call("images.create", {"image": record})
            except AlreadyExists:
                if not force:
                    raise
                ctx.client.call("images.delete", {"name": target})
                ctx.client.call("images.create", {"image": record})
        except MoordError as exc:
            fail(exc)
        click.echo(target)


@images.command("label")
@click.option("--replace-all", "-r", is_flag=True, help="replace all labels")
@click.argument("name")
@click.argument("labels", nargs=-1)
@pass_ctx
def images_label(ctx: Context, replace_all: bool, name: str, labels: tuple[str, ...]) -> None:
    """Set labels (KEY=VALUE) or clear them (KEY= or KEY) on an image (ctr images label)."""
    values: dict[str, str] = {}
    for item in labels:
        key, _, value = item.partition("=")
        if not key:
            raise click.BadParameter(f"invalid label {item!r}: want KEY=VALUE")
        values[key] = value
    mask = ["labels"] if replace_all else [f"labels.{k}" for k in values]
    current = call(ctx, "images.get", {"name": name})["image"]
    updated = call(
        ctx, "images.update",
        {"image": {"name": name, "target": current["target"], "labels": values}, "update_mask": mask},
    )["image"]
    click.echo(",".join(f"{k}={v}" for k, v in sorted(updated["labels"].items())))


@images.command("unpack")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@click.option("--platform", default="", help="os/arch[/variant] (default: this host's)")
@click.argument("name")
@pass_ctx
def images_unpack(ctx: Context, snapshotter: str, platform: str, name: str) -> None:
    """Unpack an image into a snapshotter (another than the one it was imported with)."""
    reply = call(
        ctx, "transfer.unpack", {"name": name, "snapshotter": snapshotter, "platform": platform},
        timeout=max(ctx.timeout, LONG_TIMEOUT),
    )
    click.echo(f"{name} unpacked into {snapshotter}: {reply['chain_id']} ({reply['layers_applied']} layers applied)")
