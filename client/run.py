"""`moorctl run`: the same calls, in the same order, as `ctr run --rm`.

Images.Get -> manifest/config -> Leases.Create -> Snapshots.Prepare(id, chainID) ->
Containers.Create -> Leases.Delete -> FIFOs -> Tasks.Create -> Tasks.Wait (in a thread,
before Start) -> Tasks.Start -> copy stdio -> Tasks.Delete -> Snapshots.Remove ->
Containers.Delete.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from moord.bus.client import Client
from moord.client.images import resolve
from moord.messages.errors import MoordError, NotFound

# Waiting for a container has no natural deadline; this bounds a lost reply.
WAIT_TIMEOUT = 7 * 24 * 3600.0


@dataclass
class RunOptions:
    """What the user asked `moorctl run` for."""

    image: str
    container_id: str
    args: list[str]
    env: list[str] = field(default_factory=list)
    remove: bool = True
    detach: bool = False
    tty: bool = False
    cwd: str = ""
    user: str = ""
    hostname: str = ""
    read_only: bool = False
    snapshotter: str = "overlayfs"
    runtime: str = "io.containerd.runc.v2"
    fifo_root: str = "/run/moord/fifo"


class Fifos:
    """stdout/stderr FIFOs in a private dir; read ends opened before the shim's write ends."""

    def __init__(self, root: str, container_id: str) -> None:
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.dir = os.path.join(root, secrets.token_hex(8))
        os.mkdir(self.dir, 0o700)
        self.stdout = os.path.join(self.dir, f"{container_id}-stdout")
        self.stderr = os.path.join(self.dir, f"{container_id}-stderr")
        os.mkfifo(self.stdout, 0o600)
        os.mkfifo(self.stderr, 0o600)
        self.fds = {
            os.open(self.stdout, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC): sys.stdout.buffer,
            os.open(self.stderr, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC): sys.stderr.buffer,
        }

    def pump(self) -> None:
        """Copy both FIFOs to our stdout/stderr until every writer has closed them."""
        open_fds = dict(self.fds)
        while open_fds:
            ready, _, _ = select.select(list(open_fds), [], [])
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    del open_fds[fd]
                    continue
                out = open_fds[fd]
                out.write(data)
                out.flush()

    def close(self) -> None:
        """Close our ends and remove the FIFOs."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def build_spec(opts: RunOptions, namespace: str, image_config: dict[str, Any]) -> bytes:
    """The OCI runtime spec (JSON) for the container, from image config and options."""
    from moord.oci import spec

    return spec.dumps(
        spec.build_spec(
            namespace,
            opts.container_id,
            image_config,
            args=opts.args,
            env=opts.env,
            cwd=opts.cwd,
            user=opts.user,
            tty=opts.tty,
            hostname=opts.hostname,
            readonly_rootfs=opts.read_only,
        )
    )


def run(client: Client, opts: RunOptions) -> int:
    """Run a container to completion (or start it detached); returns its exit status."""
    image = resolve(client, opts.image)
    # As ctr: the snapshot is leased until the container record references it.
    with client.temporary_lease() as lease:
        mounts = client.call(
            "snapshots.prepare",
            {"snapshotter": opts.snapshotter, "key": opts.container_id, "parent": image.chain_id},
            lease=lease,
        )["mounts"]
        try:
            spec = build_spec(opts, client.namespace, image.config)
            container = {
                "id": opts.container_id,
                "image": opts.image,
                "runtime": {"name": opts.runtime},
                "spec": spec,
                "snapshotter": opts.snapshotter,
                "snapshot_key": opts.container_id,
            }
            client.call("containers.create", {"container": container}, lease=lease)
        except BaseException:
            _call_quietly(client, "snapshots.remove", {"snapshotter": opts.snapshotter, "key": opts.container_id})
            raise
    return _run_task(client, opts, mounts)


def _call_quietly(client: Client, kind: str, payload: dict[str, Any]) -> None:
    try:
        client.call(kind, payload)
    except NotFound:
        pass


def _run_task(client: Client, opts: RunOptions, mounts: list[dict[str, Any]]) -> int:
    """Create, start and wait for the task of a created container; clean up as asked."""
    # ctr's order on the way out: task, then snapshot, then container record.
    cleanup: list[tuple[str, dict[str, Any]]] = [
        ("snapshots.remove", {"snapshotter": opts.snapshotter, "key": opts.container_id}),
        ("containers.delete", {"id": opts.container_id}),
    ]
    fifos: Fifos | None = None
    finished = False
    try:
        if opts.detach:
            client.call("tasks.create", {"container_id": opts.container_id, "rootfs": mounts})
            client.call("tasks.start", {"container_id": opts.container_id})
            cleanup.clear()
            return 0
        fifos = Fifos(opts.fifo_root, opts.container_id)
        exit_box: dict[str, Any] = {}

        def wait() -> None:
            try:
                exit_box["reply"] = client.call("tasks.wait", {"container_id": opts.container_id}, timeout=WAIT_TIMEOUT)
            except MoordError as exc:
                exit_box["error"] = exc

        client.call(
            "tasks.create",
            {"container_id": opts.container_id, "rootfs": mounts, "stdout": fifos.stdout, "stderr": fifos.stderr},
        )
        cleanup.insert(0, ("tasks.delete", {"container_id": opts.container_id}))
        # As ctr: Wait after Create and before Start, so no exit can be missed.
        waiter = threading.Thread(target=wait, name="wait", daemon=True)
        waiter.start()
        _forward_signals(client, opts.container_id)
        client.call("tasks.start", {"container_id": opts.container_id})
        fifos.pump()
        waiter.join()
        if "error" in exit_box:
            raise exit_box["error"]
        finished = True
        return int(exit_box["reply"]["exit_status"])
    finally:
        if fifos is not None:
            fifos.close()
        # Without --rm a finished run keeps its container and snapshot (as ctr does);
        # a failed one takes back everything it created.
        keep = finished and not opts.remove
        for kind, payload in cleanup:
            if keep and kind != "tasks.delete":
                continue
            _call_quietly(client, kind, payload)


def _forward_signals(client: Client, container_id: str) -> None:
    """Pass SIGINT/SIGTERM/SIGHUP on to the task, as `ctr run` does."""

    def forward(signum: int, _frame: object) -> None:
        try:
            client.call("tasks.kill", {"container_id": container_id, "signal": signum}, timeout=5)
        except MoordError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
