"""The wire: every defect in a request gets an error reply and the process stays up."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Iterator

import msgpack
import pytest
import zmq

from moord.actors.events import EventsActor, EventsExchange
from moord.bus.bridge import Bridge
from moord.bus.client import Client
from moord.bus.events import EventPublisher, EventSubscriber
from moord.messages import envelope as codec
from moord.messages.errors import DeadlineExceeded, InvalidArgument, Unavailable, Unimplemented


@pytest.fixture
def events_process() -> Iterator[tuple[str, Bridge]]:
    """The events subsystem hosted in this process behind its real bridge."""
    ipc = tempfile.mkdtemp(prefix="moord-t-bus-", dir="/tmp")
    exchange = EventsExchange(ipc)
    publisher = EventPublisher(ipc)
    ref = EventsActor.start(publisher)
    bridge = Bridge("events", os.path.join(ipc, "events.sock"))
    bridge.serve(ref, EventsActor.kinds())
    bridge.start()
    try:
        yield ipc, bridge
    finally:
        bridge.stop()
        ref.stop()
        publisher.close()
        del exchange
        shutil.rmtree(ipc, ignore_errors=True)


def raw_call(path: str, frames: list[bytes], timeout: float = 5.0) -> dict:
    """Send raw frames with a bare DEALER and decode the one reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{path}")
    try:
        sock.send_multipart(frames)
        assert sock.poll(int(timeout * 1000)), "no reply"
        return msgpack.unpackb(sock.recv_multipart()[0])
    finally:
        sock.close()


def assert_alive(path: str) -> None:
    reply = Client(os.path.dirname(path)).call("system.ping", address=path)
    assert reply["pid"] == os.getpid()


@pytest.mark.parametrize(
    "frames, code, words",
    [
        ([b"\xc1\xff garbage"], "invalid_argument", "malformed msgpack"),
        ([msgpack.packb([1, 2, 3])], "invalid_argument", "map"),
        ([codec.pack({"v": 99, "id": "a", "kind": "system.ping", "payload": {}})], "invalid_argument", "version"),
        ([codec.request_frame("a", "nosuch.kind", {})], "unimplemented", "unknown request kind"),
        ([codec.request_frame("a", "tasks.get", {"container_id": "x"})], "unimplemented", "served by process 'runtime'"),
        ([codec.request_frame("a", "events.publish", {"topic": 5})], "invalid_argument", "topic"),
        ([codec.request_frame("a", "events.publish", {"topic": "/a", "extra": 1})], "invalid_argument", "extra"),
        ([codec.request_frame("a", "events.publish", {"topic": "/a"}, namespace="../etc")], "invalid_argument", "identifier"),
        ([codec.request_frame("a", "events.publish", {"topic": "/a"}, deadline=1.0)], "deadline_exceeded", "deadline"),
        ([codec.pack({"v": 1, "kind": "system.ping"})], "invalid_argument", "id"),
    ],
)
def test_defective_requests_get_error_replies(events_process, frames, code, words) -> None:
    ipc, bridge = events_process
    reply = raw_call(bridge.path, frames)
    assert reply["kind"] == "error"
    assert reply["payload"]["code"] == code
    assert words in reply["payload"]["message"]
    assert_alive(bridge.path)


def test_oversized_request_gets_an_error_reply(events_process) -> None:
    ipc, bridge = events_process
    big = b"x" * (codec.MAX_MESSAGE_BYTES + 1)
    reply = raw_call(bridge.path, [codec.request_frame("big", "events.publish", {"topic": "/a"}), big])
    assert reply["payload"]["code"] == "invalid_argument"
    assert "exceeds the limit" in reply["payload"]["message"]
    assert_alive(bridge.path)


def test_empty_message_gets_an_error_reply(events_process) -> None:
    ipc, bridge = events_process
    reply = raw_call(bridge.path, [b""])
    assert reply["kind"] == "error"
    assert_alive(bridge.path)


def test_endpoint_is_private(events_process) -> None:
    ipc, bridge = events_process
    assert os.stat(bridge.path).st_mode & 0o777 == 0o600


def test_typed_errors_cross_the_wire(events_process) -> None:
    ipc, bridge = events_process
    client = Client(ipc)
    with pytest.raises(InvalidArgument):
        client.call("events.publish", {"topic": "no-slash"}, address=bridge.path)
    with pytest.raises(Unimplemented):
        client.call("nosuch.kind", {})


def test_missing_endpoint_is_unavailable_at_once() -> None:
    client = Client("/tmp/moord-t-nowhere", timeout=5)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        client.call("images.list")
    assert time.monotonic() - started < 0.5


def test_dead_endpoint_answers_within_the_deadline() -> None:
    ipc = tempfile.mkdtemp(prefix="moord-t-dead-", dir="/tmp")
    try:
        # A socket file nobody listens on: what a kill -9'd process leaves behind.
        import socket

        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(f"{ipc}/metadata.sock")
        stale.close()
        assert os.path.exists(f"{ipc}/metadata.sock")
        client = Client(ipc, timeout=0.5)
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            client.call("images.list")
        assert time.monotonic() - started < 1.5
    finally:
        shutil.rmtree(ipc, ignore_errors=True)


def test_client_is_thread_safe(events_process) -> None:
    ipc, bridge = events_process
    client = Client(ipc)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(200):
                assert client.call("system.ping", address=bridge.path)["process"] == "events"
                client.call("events.publish", {"topic": "/load"})
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_events_reach_subscribers_by_topic(events_process) -> None:
    ipc, bridge = events_process
    tasks = EventSubscriber(ipc, ["/tasks/"])
    everything = EventSubscriber(ipc)
    client = Client(ipc)
    time.sleep(0.2)  # let the subscriptions propagate through the exchange
    client.call("events.publish", {"topic": "/containers/create", "event": {"id": "c1"}}, namespace="ns1")
    client.call("events.publish", {"topic": "/tasks/exit", "event": {"container_id": "c1", "exit_status": 7}})
    first = tasks.receive(2)
    assert first is not None and first["topic"] == "/tasks/exit" and first["event"]["exit_status"] == 7
    seen = [everything.receive(2), everything.receive(2)]
    assert [e["topic"] for e in seen if e] == ["/containers/create", "/tasks/exit"]
    assert seen[0]["ns"] == "ns1"
    tasks.close()
    everything.close()
