"""The metadata database: SQLite (WAL) through SQLAlchemy Core, with versioned migrations.

Every record is keyed by (namespace, name); maps (labels, annotations, runtime options,
extensions) are stored as msgpack blobs, the project's one codec, decoded only when a
reply or a filter needs them. A `schema_version` table holds the version; `MIGRATIONS[i]`
brings a database from version i to i+1, so a future version appends a step and never
edits an old one.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import msgpack
from sqlalchemy import (
    ClauseElement,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.pool import StaticPool

from moord.messages.errors import FailedPrecondition

DB_DIR = "io.containerd.metadata.v1.sqlite"
DB_FILE = "meta.db"
# How long a write waits for another connection's write lock (the GC actor's, later).
BUSY_TIMEOUT_MS = 5000

metadata = MetaData()

namespaces = Table(
    "namespaces",
    metadata,
    Column("name", Text, primary_key=True),
    Column("labels", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("namespace", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("media_type", Text, nullable=False),
    Column("digest", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("annotations", LargeBinary, nullable=False),
    Column("labels", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("namespace", "name"),
    sqlite_with_rowid=False,
)

containers = Table(
    "containers",
    metadata,
    Column("namespace", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("labels", LargeBinary, nullable=False),
    Column("image", Text, nullable=False),
    Column("runtime_name", Text, nullable=False),
    Column("runtime_options", LargeBinary, nullable=False),
    Column("spec", LargeBinary, nullable=False),
    Column("snapshotter", Text, nullable=False),
    Column("snapshot_key", Text, nullable=False),
    Column("extensions", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("namespace", "id"),
)

# Labels of containers again, one row each, so that label filters run in SQL on an
# index instead of decoding every record (the labels blob stays the record's copy).
container_labels = Table(
    "container_labels",
    metadata,
    Column("namespace", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("value", Text, nullable=False),
    PrimaryKeyConstraint("namespace", "key", "value", "id"),
    sqlite_with_rowid=False,
)
Index("ix_container_labels_owner", container_labels.c.namespace, container_labels.c.id)

content = Table(
    "content",
    metadata,
    Column("namespace", Text, nullable=False),
    Column("digest", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("labels", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("namespace", "digest"),
    sqlite_with_rowid=False,
)
# "does any namespace still own this blob?" on every content delete
Index("ix_content_digest", content.c.digest)

leases = Table(
    "leases",
    metadata,
    Column("namespace", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("labels", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("namespace", "id"),
    sqlite_with_rowid=False,
)

lease_resources = Table(
    "lease_resources",
    metadata,
    Column("namespace", Text, nullable=False),
    Column("lease_id", Text, nullable=False),
    Column("type", Text, nullable=False),  # "content", "ingest", "snapshots/<snapshotter>"
    Column("resource_id", Text, nullable=False),
    PrimaryKeyConstraint("namespace", "lease_id", "type", "resource_id"),
    sqlite_with_rowid=False,
)
# GC asks "which leases hold this resource?"
Index("ix_lease_resources_resource", lease_resources.c.namespace, lease_resources.c.type, lease_resources.c.resource_id)

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

V1_TABLES = [namespaces, images, containers, container_labels, content, leases, lease_resources]


def _migrate_to_v1(conn: Connection) -> None:
    # Later versions must not change these Table objects' meaning for v1: when a table
    # changes shape, freeze its v1 DDL here and add a migration step.
    metadata.create_all(conn, tables=V1_TABLES)


MIGRATIONS: list[Callable[[Connection], None]] = [_migrate_to_v1]
SCHEMA_VERSION = len(MIGRATIONS)


def pack_map(value: Any) -> bytes:
    """Encode a map (or None) for a blob column."""
    return msgpack.packb(value, use_bin_type=True)


def unpack_map(blob: bytes) -> Any:
    """Decode a blob column written by pack_map."""
    return msgpack.unpackb(blob, raw=False)


EMPTY_MAP = pack_map({})


class Prepared:
    """A Core statement compiled once to SQLite text, for hot single-statement reads.

    Run on the raw DBAPI connection it skips SQLAlchemy's per-call work (a tenth of a
    millisecond, a good share of a containers.get); the SQL still comes from Core.
    """

    def __init__(self, stmt: ClauseElement) -> None:
        compiled = stmt.compile(dialect=sqlite_dialect.dialect())
        self.sql = str(compiled)
        self.names = tuple(compiled.positiontup or ())

    def params(self, **values: Any) -> tuple[Any, ...]:
        """The positional parameters in the statement's order."""
        return tuple(values[name] for name in self.names)


def db_path_for(root: str) -> str:
    """Where the metadata database lives under the daemon's root."""
    return os.path.join(root, DB_DIR, DB_FILE)


class Database:
    """One SQLite connection (owned by one actor thread) and explicit transactions."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.path = path
        # isolation_level=None: sqlite3 leaves transactions to us, so that writes can
        # take the write lock up front (BEGIN IMMEDIATE) instead of upgrading mid-way.
        self.engine = create_engine(
            f"sqlite+pysqlite:///{path}",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False, "isolation_level": None},
        )
        event.listen(self.engine, "connect", _configure_connection)
        self.conn = self.engine.connect()
        self.migrate()

    @property
    def raw(self) -> sqlite3.Connection:
        """The DBAPI connection (autocommit mode: one statement is one read snapshot)."""
        return self.conn.connection.driver_connection  # type: ignore[return-value]

    def fetch_one(self, prepared: Prepared, **values: Any) -> tuple[Any, ...] | None:
        """Run a prepared single-row read outside any explicit transaction."""
        return self.raw.execute(prepared.sql, prepared.params(**values)).fetchone()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: the write lock is taken at its start."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot of the database."""
        with self._transaction("BEGIN") as conn:
            yield conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Connection]:
        conn = self.conn
        try:
            conn.exec_driver_sql(begin)
        except BaseException:
            conn.rollback()
            raise
        try:
            yield conn
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            conn.commit()  # clear SQLAlchemy's own transaction marker
            raise
        conn.exec_driver_sql("COMMIT")
        conn.commit()

    def version(self) -> int:
        """The schema version of the open database (0: empty)."""
        with self.read() as conn:
            has_table = conn.execute(
                text("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'")
            ).first()
            if not has_table:
                return 0
            row = conn.execute(schema_version.select()).first()
            return int(row.version) if row else 0

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one migration per transaction."""
        current = self.version()
        if current > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"{self.path}: schema version {current} is newer than this moord understands ({SCHEMA_VERSION})"
            )
        for version in range(current, SCHEMA_VERSION):
            with self.write() as conn:
                MIGRATIONS[version](conn)
                schema_version.create(conn, checkfirst=True)
                conn.execute(schema_version.delete())
                conn.execute(schema_version.insert().values(version=version + 1))


def _configure_connection(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # Durable commits, like containerd's bolt which fsyncs every transaction.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.close()
