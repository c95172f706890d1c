"""moorctl commands for leases and garbage collection: `leases ls/create/rm`, `gc run/why`.

`leases` follows ctr 1.6 (cmd/ctr/commands/leases): the same columns, `--expires`
as a Go-style duration written into `containerd.io/gc.expire`, `--sync` on delete.
`gc run` and `gc why` are moord's own (containerd has no such commands). Only click is
imported at module level; pydantic never is.
"""

from __future__ import annotations

import re
import time

import click

from moord.client.app import Context, call, main, pass_ctx

LABEL_GC_EXPIRE = "containerd.io/gc.expire"
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """A Go duration (`24h`, `1h30m`, `500ms`, `0`) in seconds."""
    value = text.strip()
    if value in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if value.startswith("-") else 1.0
    value = value.lstrip("+-")
    pos, total = 0, 0.0
    while pos < len(value):
        match = _DURATION_PART.match(value, pos)
        if not match:
            raise click.BadParameter(f"invalid duration {text!r}")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if not value:
        raise click.BadParameter(f"invalid duration {text!r}")
    return sign * total


def rfc3339_seconds(stamp: float) -> str:
    """A UTC time as Go's time.RFC3339 formats it (whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


# -- leases --------------------------------------------------------------------------------


@main.group()
def leases() -> None:
    """Manage leases (what holds resources against garbage collection)."""


@leases.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="print only the lease ids")
@click.argument("filters", nargs=-1)
@pass_ctx
def leases_ls(ctx: Context, quiet: bool, filters: tuple[str, ...]) -> None:
    """List leases (FILTERS as containerd's, e.g. 'labels."a"==b' or id~=^tmp)."""
    from moord.client.table import print_table

    reply = call(ctx, "leases.list", {"filters": list(filters)})
    if quiet:
        for lease in reply["leases"]:
            click.echo(lease["id"])
        return
    print_table(
        ("ID", "CREATED AT", "LABELS"),
        [
            (
                lease["id"],
                rfc3339_seconds(lease["created_at"]),
                ",".join(f"{k}={v}" for k, v in sorted(lease["labels"].items())) or "-",
            )
            for lease in reply["leases"]
        ],
    )


@leases.command("create")
@click.option("--id", "lease_id", default="", help="the lease id (default: generated)")
@click.option("--expires", "-x", default="24h", show_default=True, help="expire after this Go duration (0: never)")
@click.argument("labels", nargs=-1)
@pass_ctx
def leases_create(ctx: Context, lease_id: str, expires: str, labels: tuple[str, ...]) -> None:
    """Create a lease with labels KEY=VALUE; prints its id."""
    wanted: dict[str, str] = {}
    for pair in labels:
        key, _, value = pair.partition("=")
        if not key:
            raise click.BadParameter(f"label {pair!r} has no key")
        wanted[key] = value
    seconds = parse_go_duration(expires)
    if seconds > 0:
        wanted[LABEL_GC_EXPIRE] = rfc3339_seconds(time.time() + seconds)
    payload: dict[str, object] = {"labels": wanted}
    if lease_id:
        payload["id"] = lease_id
    click.echo(call(ctx, "leases.create", payload)["lease"]["id"])


@leases.command("rm")
@click.option("--sync", is_flag=True, help="return only after a garbage collection has run")
@click.argument("ids", nargs=-1, required=True)
@pass_ctx
def leases_rm(ctx: Context, sync: bool, ids: tuple[str, ...]) -> None:
    """Delete leases; prints each id deleted."""
    for lease_id in ids:
        call(ctx, "leases.delete", {"id": lease_id, "sync": sync}, timeout=max(ctx.timeout, 120.0) if sync else None)
        click.echo(lease_id)


@leases.command("resources")
@click.argument("lease_id")
@pass_ctx
def leases_resources(ctx: Context, lease_id: str) -> None:
    """List what a lease holds."""
    from moord.client.table import print_table

    reply = call(ctx, "leases.list_resources", {"id": lease_id})
    print_table(("TYPE", "ID"), [(r["type"], r["id"]) for r in reply["resources"]])


# -- gc ------------------------------------------------------------------------------------


@main.group()
def gc() -> None:
    """Garbage collection."""


@gc.command("run")
@pass_ctx
def gc_run(ctx: Context) -> None:
    """Collect garbage now; prints what went and how long metadata writes paused."""
    from moord.client.table import print_table

    report = call(ctx, "gc.run", {}, timeout=max(ctx.timeout, 300.0))
    rows: list[tuple[str, str, str]] = []
    rows += [("content", r["namespace"], r["digest"]) for r in report["content"]]
    rows += [("snapshot", r["namespace"], f"{r['snapshotter']}/{r['key']}") for r in report["snapshots"]]
    rows += [("lease", r["namespace"], r["id"]) for r in report["leases"]]
    rows += [("ingest", r["namespace"], r["ref"]) for r in report["ingests"]]
    if rows:
        print_table(("REMOVED", "NAMESPACE", "ID"), rows)
    for kept in report["kept"]:
        click.echo(f"kept snapshot {kept['namespace']}/{kept['snapshotter']}/{kept['key']}: {kept['reason']}")
    click.echo(
        f"removed {len(report['content'])} content records ({len(report['blobs_removed'])} blobs on disk), "
        f"{len(report['snapshots'])} snapshots, {len(report['leases'])} leases, {len(report['ingests'])} ingests; "
        f"{report['marked']} resources alive"
    )
    click.echo(f"writes paused {report['pause_seconds'] * 1000:.1f} ms, collection took {report['duration_seconds'] * 1000:.1f} ms")


@gc.command("why")
@click.argument("target")
@pass_ctx
def gc_why(ctx: Context, target: str) -> None:
    """Why TARGET (a digest, or SNAPSHOTTER/KEY) is kept: the chain of references from a root."""
    reply = call(ctx, "gc.why", {"target": target}, timeout=max(ctx.timeout, 60.0))
    if not reply["alive"]:
        click.echo(f"{target} is not referenced: the next collection removes it")
        return
    for depth, link in enumerate(reply["chain"]):
        via = link["via"]
        if depth == 0:
            click.echo(f"{link['kind']} {link['key']} ({via})")
        else:
            click.echo(f"{'  ' * depth}-> {link['kind']} {link['key']} ({via})")
