"""What the metadata services share: the store base, labels, update masks, events."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from sqlalchemy import Connection
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from moord.actors.metadata.schema import Database, namespaces, pack_map
from moord.bus.events import EventPublisher
from moord.messages.errors import InvalidArgument

log = logging.getLogger(__name__)


class StoreBase:
    """State every metadata service mixin uses: the database and the event publisher."""

    db: Database
    events: EventPublisher | None

    def publish(self, topic: str, namespace: str, event: Mapping[str, Any]) -> None:
        """Publish an event after its change committed; a failure is logged, not raised."""
        if self.events is None:
            return
        try:
            self.events.publish(topic, namespace, dict(event))
        except Exception:  # the change is committed: an event lost must not fail it
            log.exception("publishing %s failed", topic)


def now() -> float:
    """The current time as stored in records (seconds since the epoch)."""
    return time.time()


def without_empty(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels as stored: an empty value means "no such label" (containerd drops them)."""
    return {key: value for key, value in labels.items() if value != ""}


def mask_key(path: str, prefix: str) -> str | None:
    """The key of a `<prefix>.<key>` mask path, or None if `path` is not of that form."""
    head = prefix + "."
    if path.startswith(head):
        key = path[len(head) :]
        if not key:
            raise InvalidArgument(f"update mask {path!r} names no key")
        return key
    return None


def set_map_key(current: dict[str, str], incoming: Mapping[str, str], key: str) -> None:
    """Apply one `labels.<key>` mask entry: take the incoming value, absent or empty deletes."""
    value = incoming.get(key, "")
    if value:
        current[key] = value
    else:
        current.pop(key, None)


def ensure_namespace(conn: Connection, namespace: str, at: float) -> None:
    """Create `namespace` if it does not exist (containerd does so on a first write)."""
    stmt = sqlite_insert(namespaces).values(name=namespace, labels=pack_map({}), created_at=at, updated_at=at)
    conn.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
