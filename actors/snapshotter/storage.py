"""A snapshotter's own metadata store: one SQLite file per snapshotter (SQLAlchemy Core).

Plays the part of containerd's snapshots/storage (the backend's bolt store) and of
metadata/snapshot.go (the per-namespace view) at once: a row is keyed by (namespace,
key), its integer id names its directory on disk and never changes, not even when
Commit renames the key to its committed name. Ids come from AUTOINCREMENT, so an id is
never handed out twice while its row exists, and not after a delete either.

Every change is one SQLite transaction (BEGIN IMMEDIATE): a process killed mid-way
leaves either the old state or the new one, never a half-committed snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from moord.messages.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound

SCHEMA_VERSION = 1
ACTIVE = "active"
VIEW = "view"
COMMITTED = "committed"

_meta = MetaData()

schema_version = Table(
    "schema_version",
    _meta,
    Column("version", Integer, nullable=False),
)

snapshots = Table(
    "snapshots",
    _meta,
    Column("id", Integer, primary_key=True),
    Column("namespace", String(76), nullable=False),
    Column("key", String, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("parent_id", Integer, ForeignKey("snapshots.id", ondelete="RESTRICT"), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("labels", JSON, nullable=False, default=dict),
    # Usage recorded at commit; active snapshots are measured on demand.
    Column("size", Integer, nullable=False, default=0),
    Column("inodes", Integer, nullable=False, default=0),
    UniqueConstraint("namespace", "key", name="uq_snapshot_namespace_key"),
    Index("ix_snapshot_parent", "parent_id"),
    sqlite_autoincrement=True,
)


@dataclass
class SnapshotRecord:
    """One snapshot row, with its parent's key resolved."""

    id: int
    namespace: str
    key: str
    kind: str
    parent_id: int | None
    parent: str
    created_at: float
    updated_at: float
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0


def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver must not open transactions by itself: we issue BEGIN [IMMEDIATE].
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit that returned is on disk even after a power cut, not only a crash.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _begin(conn: Connection) -> None:
    mode = "IMMEDIATE" if conn.get_execution_options().get("moord_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


class MetaStore:
    """Snapshot records of one snapshotter, in `<root>/metadata.db`."""

    def __init__(self, path: str) -> None:
        self.path = path
        # One connection, used by the actor's thread only; StaticPool keeps it open.
        self._engine: Engine = create_engine(
            f"sqlite:///{path}",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
        event.listen(self._engine, "connect", _set_pragmas)
        event.listen(self._engine, "begin", _begin)
        self._migrate()

    def close(self) -> None:
        """Release the database file."""
        self._engine.dispose()

    def _migrate(self) -> None:
        with self.write() as conn:
            _meta.create_all(conn)
            found = conn.execute(select(schema_version.c.version)).scalar()
            if found is None:
                conn.execute(insert(schema_version).values(version=SCHEMA_VERSION))
            elif found > SCHEMA_VERSION:
                raise Internal(
                    f"{self.path}: schema version {found} is newer than this moord understands ({SCHEMA_VERSION})"
                )

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot of the database)."""
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._engine.connect().execution_options(moord_write=True) as conn, conn.begin():
            yield conn

    # -- queries (inside a transaction) -------------------------------------------

    @staticmethod
    def _record(conn: Connection, row: Any) -> SnapshotRecord:
        parent = ""
        if row.parent_id is not None:
            parent = conn.execute(select(snapshots.c.key).where(snapshots.c.id == row.parent_id)).scalar() or ""
        labels = row.labels if isinstance(row.labels, dict) else json.loads(row.labels or "{}")
        return SnapshotRecord(
            id=row.id,
            namespace=row.namespace,
            key=row.key,
            kind=row.kind,
            parent_id=row.parent_id,
            parent=parent,
            created_at=row.created_at,
            updated_at=row.updated_at,
            labels=dict(labels),
            size=row.size,
            inodes=row.inodes,
        )

    def find(self, conn: Connection, namespace: str, key: str) -> SnapshotRecord | None:
        """The snapshot `key` of `namespace`, or None."""
        row = conn.execute(
            select(snapshots).where(snapshots.c.namespace == namespace, snapshots.c.key == key)
        ).first()
        return None if row is None else self._record(conn, row)

    def get(self, conn: Connection, namespace: str, key: str) -> SnapshotRecord:
        """The snapshot `key` of `namespace`; NotFound if there is none."""
        record = self.find(conn, namespace, key)
        if record is None:
            raise NotFound(f"snapshot {key} does not exist")
        return record

    def parent_ids(self, conn: Connection, record: SnapshotRecord) -> list[int]:
        """Ids of the record's ancestors, nearest parent first."""
        chain: list[int] = []
        current = record.parent_id
        while current is not None:
            if current in chain:
                raise Internal(f"snapshot {record.key}: parent chain loops at id {current}")
            chain.append(current)
            current = conn.execute(select(snapshots.c.parent_id).where(snapshots.c.id == current)).scalar()
        return chain

    def list(self, conn: Connection, namespace: str) -> list[SnapshotRecord]:
        """Every snapshot of `namespace`, ordered by key."""
        rows = conn.execute(
            select(snapshots).where(snapshots.c.namespace == namespace).order_by(snapshots.c.key)
        ).all()
        return [self._record(conn, row) for row in rows]

    def all_ids(self, conn: Connection) -> set[int]:
        """Ids of all snapshots of all namespaces."""
        return set(conn.execute(select(snapshots.c.id)).scalars())

    def create(
        self, conn: Connection, namespace: str, key: str, kind: str, parent: str, labels: dict[str, str]
    ) -> tuple[SnapshotRecord, list[int]]:
        """Insert an active snapshot or view; returns it and its ancestors' ids."""
        if kind not in (ACTIVE, VIEW):
            raise InvalidArgument(f"snapshot kind {kind} invalid: only active snapshots and views are created")
        if self.find(conn, namespace, key) is not None:
            raise AlreadyExists(f"snapshot {key} already exists")
        parent_record = None
        if parent:
            parent_record = self.find(conn, namespace, parent)
            if parent_record is None:
                raise NotFound(f"parent snapshot {parent} does not exist")
            if parent_record.kind != COMMITTED:
                raise InvalidArgument(f"parent {parent} is not a committed snapshot")
        now = time.time()
        new_id = conn.execute(
            insert(snapshots).values(
                namespace=namespace,
                key=key,
                kind=kind,
                parent_id=parent_record.id if parent_record else None,
                created_at=now,
                updated_at=now,
                labels=_stored_labels(labels),
                size=0,
                inodes=0,
            )
        ).inserted_primary_key[0]
        record = self.get(conn, namespace, key)
        assert record.id == new_id
        return record, self.parent_ids(conn, record)

    def commit(
        self, conn: Connection, namespace: str, name: str, key: str, labels: dict[str, str], size: int, inodes: int
    ) -> SnapshotRecord:
        """Turn active `key` into committed `name` in one statement (same id, same directory).

        containerd replaces the labels by the commit's own; they are not inherited.
        """
        if self.find(conn, namespace, name) is not None:
            raise AlreadyExists(f"snapshot {name} already exists")
        record = self.get(conn, namespace, key)
        if record.kind != ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is not active (it is a {record.kind} snapshot)")
        now = time.time()
        conn.execute(
            update(snapshots)
            .where(snapshots.c.id == record.id)
            .values(
                key=name,
                kind=COMMITTED,
                labels=_stored_labels(labels),
                created_at=now,
                updated_at=now,
                size=size,
                inodes=inodes,
            )
        )
        return self.get(conn, namespace, name)

    def has_children(self, conn: Connection, snapshot_id: int) -> bool:
        """Whether any snapshot names `snapshot_id` as parent."""
        found = conn.execute(select(func.count()).where(snapshots.c.parent_id == snapshot_id)).scalar()
        return bool(found)

    def remove(self, conn: Connection, namespace: str, key: str) -> SnapshotRecord:
        """Delete a snapshot without children; returns what was removed."""
        record = self.get(conn, namespace, key)
        if self.has_children(conn, record.id):
            raise FailedPrecondition(f"cannot remove snapshot {key} with child")
        conn.execute(delete(snapshots).where(snapshots.c.id == record.id))
        return record

    def set_labels(self, conn: Connection, record: SnapshotRecord, labels: dict[str, str]) -> SnapshotRecord:
        """Replace the record's labels and bump its update time."""
        conn.execute(
            update(snapshots)
            .where(snapshots.c.id == record.id)
            .values(labels=_stored_labels(labels), updated_at=time.time())
        )
        return self.get(conn, record.namespace, record.key)


def _stored_labels(labels: dict[str, str]) -> dict[str, str]:
    # As containerd's bolt store: a label with an empty value is not kept.
    return {k: v for k, v in labels.items() if v != ""}


def ensure_dir(path: str, mode: int = 0o700) -> str:
    """Create `path` (and parents) if missing; returns it."""
    os.makedirs(path, mode=mode, exist_ok=True)
    return path
