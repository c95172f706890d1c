"""Requests every process answers, and the supervisor's own service."""

from __future__ import annotations

from pydantic import Field

from moord.messages.base import Empty, Message, request


class PingReply(Message):
    """Who answered."""

    process: str
    pid: int
    version: str
    services: list[str] = Field(default_factory=list)


@request("system.ping", PingReply)
class Ping(Message):
    """Answered by the bridge of whichever process receives it."""


class ChildInfo(Message):
    """One child of the supervision tree as `moorctl tree` shows it."""

    name: str
    pid: int
    state: str
    restarts: int
    uptime: float
    restart: str
    strategy: str
    rss: int = 0


class TreeReply(Message):
    """The live supervision tree."""

    pid: int
    uptime: float
    strategy: str
    state: str
    children: list[ChildInfo]


@request("supervisor.tree", TreeReply)
class Tree(Message):
    """The supervision tree: children with pid, state, restarts, uptime."""


@request("supervisor.shutdown", Empty)
class Shutdown(Message):
    """Stop the daemon in order (running containers keep running)."""
