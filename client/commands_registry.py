"""moorctl images pull / push: images from and to registries, with progress bars.

The daemon does the transfer (one `transfer.pull` or `transfer.push` request); this
client subscribes to its progress events before sending it and draws one bar per
descriptor with rich, imported only when a terminal will show the bars.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import click

from moord.client.app import Context, fail, images, pass_ctx

PROGRESS_TOPIC = "/images/progress"  # moord.messages.distribution.PROGRESS_TOPIC (no pydantic here)
TRANSFER_TIMEOUT = 6 * 3600.0
RESUMES = 3


class _Transfer(threading.Thread):
    """The transfer request, run beside the progress display."""

    def __init__(self, ctx: Context, kind: str, payload: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.ctx, self.kind, self.payload = ctx, kind, payload
        self.reply: dict[str, Any] | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        from moord.messages.errors import MoordError

        try:
            self.reply = self.ctx.client.call(self.kind, self.payload, timeout=TRANSFER_TIMEOUT)
        except MoordError as exc:
            self.error = exc


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12] if digest else ""


def _label(event: dict[str, Any]) -> str:
    media_type = event.get("media_type", "")
    kind = "index" if "index" in media_type or "list" in media_type else "manifest" if "manifest" in media_type else "config" if "config" in media_type else "layer"
    return f"{kind}-{_short(event['digest'])}"


def _with_bars(transfer: _Transfer, watch: "_Watch", subscriber: Any, operation: str, quiet: bool) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description:<22}"), TextColumn("{task.fields[status]:<11}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=False) as bars:
        tasks: dict[str, Any] = {}
        while not watch.lost.is_set():
            envelope = subscriber.receive(timeout=0.1 if transfer.is_alive() else 0.05)
            if envelope is None:
                if not transfer.is_alive():
                    break  # answered, and the last events are drawn
                continue
            event = envelope.get("event") or {}
            if event.get("operation") != operation or not event.get("digest"):
                continue
            digest = event["digest"]
            if digest not in tasks:
                tasks[digest] = bars.add_task(_label(event), total=event.get("total") or None, status=event["status"])
            done = event.get("total", 0) if event["status"] in ("downloaded", "exists", "unpacking", "unpacked", "pushed") else event.get("offset", 0)
            bars.update(tasks[digest], completed=done, status=event["status"])


def _plain(transfer: _Transfer, watch: "_Watch", subscriber: Any, operation: str, quiet: bool) -> None:
    while transfer.is_alive() and not watch.lost.is_set():
        envelope = subscriber.receive(timeout=0.1)
        if envelope is None or quiet:
            continue
        event = envelope.get("event") or {}
        if event.get("operation") == operation and event.get("digest") and event.get("status") in ("downloaded", "exists", "unpacked", "pushed"):
            click.echo(f"{_label(event)}: {event['status']}")


def _images_pid(ctx: Context) -> int:
    """The pid of the images process (0 when it does not answer)."""
    from moord.bus.client import endpoint_path
    from moord.messages.errors import MoordError

    try:
        reply = ctx.client.call("system.ping", {}, address=endpoint_path(ctx.client.ipc_dir, "images"), timeout=2.0)
    except MoordError:
        return 0
    return int(reply.get("pid", 0))


class _Watch(threading.Thread):
    """Notices the images process being replaced under a running transfer (its reply is
    then lost), so that the transfer is sent again and resumes from what is stored."""

    def __init__(self, ctx: Context, pid: int, transfer: _Transfer) -> None:
        super().__init__(daemon=True)
        self.ctx, self.pid, self.transfer = ctx, pid, transfer
        self.lost = threading.Event()

    def run(self) -> None:
        while self.transfer.is_alive() and not self.lost.is_set():
            time.sleep(1.0)
            if not self.transfer.is_alive():
                return
            pid = _images_pid(self.ctx)
            if pid and pid != self.pid:
                self.lost.set()


def run_transfer(ctx: Context, kind: str, payload: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Send a pull or push and show its progress until it answers; send it again (it
    resumes) when a daemon process restarts under it, at most RESUMES times."""
    import secrets

    from moord.bus.events import EventSubscriber
    from moord.messages.errors import DeadlineExceeded, Unavailable

    subscriber = EventSubscriber(ctx.client.ipc_dir, (PROGRESS_TOPIC,))
    try:
        time.sleep(0.02)  # let the subscription reach the exchange before the first event
        for attempt in range(RESUMES + 1):
            operation = secrets.token_hex(8)
            transfer = _Transfer(ctx, kind, {**payload, "operation": operation})
            watch = _Watch(ctx, _images_pid(ctx), transfer)
            transfer.start()
            watch.start()
            show = _with_bars if not quiet and sys.stdout.isatty() else _plain
            show(transfer, watch, subscriber, operation, quiet)
            if watch.lost.is_set() or isinstance(transfer.error, (Unavailable, DeadlineExceeded)):
                if attempt < RESUMES:
                    why = transfer.error or "the images process restarted"
                    click.echo(f"moorctl: {why}; resuming", err=True)
                    time.sleep(1.0)
                    continue
            break
    except KeyboardInterrupt:
        click.echo("interrupted: the daemon finishes or abandons the transfer; run it again to resume", err=True)
        sys.exit(130)
    finally:
        subscriber.close()
    if watch.lost.is_set():
        fail(Unavailable("the images process restarted during the transfer"))
    if transfer.error is not None:
        fail(transfer.error)
    assert transfer.reply is not None
    return transfer.reply


@images.command("pull")
@click.option("--platform", "platforms", multiple=True, help="pull content for this platform (os/arch[/variant]); repeatable")
@click.option("--all-platforms", is_flag=True, help="pull content for every platform")
@click.option("--no-unpack", is_flag=True, help="do not unpack into snapshots")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@click.option("--print-chainid", is_flag=True, help="print the top snapshot's chain ID")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
@click.argument("ref")
@pass_ctx
def images_pull(ctx: Context, platforms: tuple[str, ...], all_platforms: bool, no_unpack: bool, snapshotter: str, print_chainid: bool, quiet: bool, ref: str) -> None:
    """Pull an image from a registry and unpack it (as `ctr images pull`)."""
    started = time.monotonic()
    payload = {"ref": ref, "platforms": list(platforms), "all_platforms": all_platforms, "unpack": not no_unpack, "snapshotter": snapshotter}
    reply = run_transfer(ctx, "transfer.pull", payload, quiet)
    elapsed = time.monotonic() - started
    image = reply["image"]
    if not quiet:
        size = reply.get("bytes_fetched", 0)
        click.echo(f"{image['name']}: resolved {image['target']['digest']}")
        click.echo(f"elapsed: {elapsed:.1f} s  fetched: {size / 1e6:.1f} MB ({size / 1e6 / max(elapsed, 1e-6):.1f} MB/s)  layers unpacked: {reply.get('layers_unpacked', 0)}")
    if print_chainid:
        for platform, chain in sorted(reply.get("chain_ids", {}).items()):
            click.echo(f"{platform} {chain}")


@images.command("push")
@click.option("--platform", "platforms", multiple=True, help="push only this platform's manifest; repeatable")
@click.option("--chunk-size", default=0, type=int, help="upload blobs in chunks of this many bytes (0: one request each)")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
@click.argument("remote")
@click.argument("local", required=False)
@pass_ctx
def images_push(ctx: Context, platforms: tuple[str, ...], chunk_size: int, quiet: bool, remote: str, local: str | None) -> None:
    """Push a local image (LOCAL, or the image named REMOTE) to REMOTE (as `ctr images push`)."""
    payload = {"name": local or remote, "ref": remote, "platforms": list(platforms), "all_platforms": not platforms, "chunk_size": chunk_size}
    reply = run_transfer(ctx, "transfer.push", payload, quiet)
    if not quiet:
        click.echo(f"{remote}: pushed {reply['digest']} ({reply.get('blobs_pushed', 0)} blobs, {reply.get('bytes_pushed', 0) / 1e6:.1f} MB)")
