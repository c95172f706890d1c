"""What every snapshotter shares: records, directories built aside and renamed into place.

A snapshotter lives in `<root>/io.containerd.snapshotter.v1.<name>/` with its own
`metadata.db` and a `snapshots/<id>/` directory per snapshot. Subclasses say how a new
snapshot's directory is filled and which mounts make its filesystem.
"""

from __future__ import annotations

import logging
import os
import tempfile
from abc import ABC, abstractmethod
from typing import ClassVar

from moord.actors.snapshotter import fsutil
from moord.actors.snapshotter.storage import ACTIVE, VIEW, MetaStore, SnapshotRecord, ensure_dir
from moord.messages.base import validate_labels
from moord.messages.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from moord.messages.types import Mount

log = logging.getLogger(__name__)

PLUGIN_PREFIX = "io.containerd.snapshotter.v1."
# Labels a client may set to make Prepare answer AlreadyExists when the target exists.
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
_TEMP_PREFIX = "new-"


class Snapshotter(ABC):
    """A snapshotter's records and directories; one actor thread calls it at a time."""

    name: ClassVar[str] = ""

    def __init__(self, root: str) -> None:
        self.root = ensure_dir(os.path.join(root, PLUGIN_PREFIX + self.name))
        self.snapshots_dir = ensure_dir(os.path.join(self.root, "snapshots"))
        self.store = MetaStore(os.path.join(self.root, "metadata.db"))
        self._remove_temp_dirs()

    def close(self) -> None:
        """Release the metadata database."""
        self.store.close()

    # -- hooks ------------------------------------------------------------------------

    def snapshot_dir(self, snapshot_id: int) -> str:
        """The directory that holds snapshot `snapshot_id`."""
        return os.path.join(self.snapshots_dir, str(snapshot_id))

    @abstractmethod
    def data_dir(self, snapshot_id: int) -> str:
        """The directory holding the snapshot's own files (what Usage measures)."""

    def needs_dir(self, kind: str, parent_ids: list[int]) -> bool:
        """Whether a new snapshot of this kind and ancestry gets its own directory."""
        return True

    @abstractmethod
    def populate(self, new_dir: str, kind: str, parent_ids: list[int]) -> None:
        """Fill the freshly created directory of a new snapshot (before it is renamed in)."""

    @abstractmethod
    def mounts_for(self, record: SnapshotRecord, parent_ids: list[int]) -> list[Mount]:
        """The mounts that make an active snapshot's or a view's filesystem."""

    # -- operations -------------------------------------------------------------------

    def create(self, namespace: str, kind: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """Prepare (kind active) or View (kind view) `key` on `parent`; returns its mounts.

        The directory is built in a temp dir and renamed into place inside the database
        transaction, before it commits: a crash leaves either no record (the directory is
        an orphan Cleanup removes) or a record with a complete directory.
        """
        target = labels.get(LABEL_SNAPSHOT_REF, "")
        temp = ""
        placed = ""
        try:
            with self.store.write() as conn:
                if target and self.store.find(conn, namespace, target) is not None:
                    raise AlreadyExists(f"target snapshot {target!r} already exists")
                record, parent_ids = self.store.create(conn, namespace, key, kind, parent, labels)
                if self.needs_dir(kind, parent_ids):
                    temp = tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.snapshots_dir)
                    self.populate(temp, kind, parent_ids)
                    final = self.snapshot_dir(record.id)
                    if os.path.lexists(final):
                        # Left by a crash after a rename whose transaction never committed
                        # (its id was rolled back and is ours now): nobody owns it.
                        log.warning("%s: removing orphaned %s", self.name, final)
                        fsutil.remove_tree(final)
                    os.rename(temp, final)
                    temp, placed = "", final
                mounts = self.mounts_for(record, parent_ids)
        except BaseException:
            for leftover in (temp, placed):
                if leftover:
                    try:
                        fsutil.remove_tree(leftover)
                    except OSError as exc:
                        log.error("%s: %s left behind: %s", self.name, leftover, exc)
            raise
        return mounts

    def mounts(self, namespace: str, key: str) -> list[Mount]:
        """Mounts of an active snapshot or view."""
        with self.store.read() as conn:
            record = self.store.get(conn, namespace, key)
            if record.kind not in (ACTIVE, VIEW):
                raise FailedPrecondition(f"snapshot {key} is {record.kind}: only active snapshots and views have mounts")
            return self.mounts_for(record, self.store.parent_ids(conn, record))

    def commit(self, namespace: str, name: str, key: str, labels: dict[str, str]) -> SnapshotRecord:
        """Commit active `key` as `name`: one database update, the directory stays put."""
        with self.store.read() as conn:
            if self.store.find(conn, namespace, name) is not None:
                raise AlreadyExists(f"snapshot {name} already exists")
            record = self.store.get(conn, namespace, key)
            if record.kind != ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active (it is a {record.kind} snapshot)")
        size, inodes = fsutil.disk_usage(self.data_dir(record.id))
        with self.store.write() as conn:
            return self.store.commit(conn, namespace, name, key, labels, size, inodes)

    def remove(self, namespace: str, key: str) -> SnapshotRecord:
        """Remove a snapshot without children, then its directory."""
        with self.store.write() as conn:
            record = self.store.remove(conn, namespace, key)
        # After the commit: a crash here leaves an orphan directory for Cleanup.
        try:
            fsutil.remove_tree(self.snapshot_dir(record.id))
        except OSError as exc:
            log.warning("%s: snapshot %s removed, its directory stays until Cleanup: %s", self.name, key, exc)
        return record

    def stat(self, namespace: str, key: str) -> SnapshotRecord:
        """The record of `key`."""
        with self.store.read() as conn:
            return self.store.get(conn, namespace, key)

    def update(self, namespace: str, key: str, labels: dict[str, str], update_mask: list[str]) -> SnapshotRecord:
        """Update labels: all of them (mask empty or "labels"), or those named "labels.<key>"."""
        if not key:
            raise InvalidArgument("snapshot name is required to update a snapshot")
        with self.store.write() as conn:
            record = self.store.get(conn, namespace, key)
            updated = dict(record.labels)
            if not update_mask:
                updated = dict(labels)
            for path in update_mask:
                if path.startswith("labels."):
                    label = path[len("labels."):]
                    updated[label] = labels.get(label, "")  # an empty value removes it
                elif path == "labels":
                    updated = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
            validate_labels(updated)
            return self.store.set_labels(conn, record, updated)

    def list_snapshots(self, namespace: str) -> list[SnapshotRecord]:
        """All snapshots of `namespace`."""
        with self.store.read() as conn:
            return self.store.list(conn, namespace)

    def usage(self, namespace: str, key: str) -> tuple[int, int]:
        """(bytes, inodes) of the snapshot itself: measured if active, as recorded otherwise."""
        record = self.stat(namespace, key)
        if record.kind == ACTIVE:
            return fsutil.disk_usage(self.data_dir(record.id))
        return record.size, record.inodes

    def cleanup(self) -> list[str]:
        """Remove directories no record owns (all namespaces); returns what was removed."""
        with self.store.write() as conn:
            owned = {str(i) for i in self.store.all_ids(conn)}
            orphans = [
                os.path.join(self.snapshots_dir, entry)
                for entry in sorted(os.listdir(self.snapshots_dir))
                if entry not in owned
            ]
        removed = []
        for path in orphans:
            try:
                fsutil.remove_tree(path)
                removed.append(path)
            except OSError as exc:
                log.warning("%s: cleanup could not remove %s: %s", self.name, path, exc)
        return removed

    def _remove_temp_dirs(self) -> None:
        # Temp dirs of a create interrupted by a crash: never renamed, never handed out.
        for entry in os.listdir(self.snapshots_dir):
            if entry.startswith(_TEMP_PREFIX):
                try:
                    fsutil.remove_tree(os.path.join(self.snapshots_dir, entry))
                except OSError as exc:
                    log.warning("%s: leftover %s stays: %s", self.name, entry, exc)

