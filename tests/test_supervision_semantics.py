"""OTP restart semantics of the tree, with real child processes that report readiness."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Iterator

import pytest

from moord.bus.bridge import Bridge
from moord.bus.client import Client
from moord.supervisor.tree import ChildExited, ChildSpec, StartAll, StopAll, SupervisorActor, SupervisorSpec

# A real process that reports ready on fd 3, then lives or exits as told.
READY_THEN = "printf R >&3; exec 3>&-; {}"


def child(name: str, then: str, restart: str = "permanent") -> ChildSpec:
    return ChildSpec(name=name, argv=["/bin/sh", "-c", READY_THEN.format(then)], restart=restart, ready_timeout=5, shutdown_timeout=2)


class Tree:
    """A SupervisorActor behind its real bridge, driven the way the root's main loop drives it."""

    def __init__(self, spec: SupervisorSpec) -> None:
        self.escalations: list[str] = []
        self.ref = SupervisorActor.start(spec, lambda reason, status: self.escalations.append(reason))
        self.ipc = tempfile.mkdtemp(prefix="moord-t-sup-", dir="/tmp")
        self.bridge = Bridge("supervisor", os.path.join(self.ipc, "supervisor.sock"))
        self.bridge.serve(self.ref, SupervisorActor.kinds())
        self.bridge.start()
        self.client = Client(self.ipc)

    def info(self) -> dict[str, dict]:
        self.ref.tell(ChildExited())  # what SIGCHLD would deliver
        reply = self.client.call("supervisor.tree")
        return {c["name"]: c for c in reply["children"]}

    def close(self) -> None:
        self.bridge.stop()
        shutil.rmtree(self.ipc, ignore_errors=True)

    def wait(self, predicate, timeout: float = 10.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if predicate(info):
                return info
            time.sleep(0.05)
        raise AssertionError(f"tree never reached the state: {self.info()}")


@pytest.fixture
def make_tree() -> Iterator:
    trees: list[Tree] = []

    def make(spec: SupervisorSpec) -> Tree:
        tree = Tree(spec)
        trees.append(tree)
        assert tree.ref.ask(StartAll(), timeout=30) is True
        return tree

    yield make
    for tree in trees:
        tree.ref.ask(StopAll("test over"), timeout=30)
        tree.ref.stop()
        tree.close()


def test_transient_child_is_restarted_only_after_an_abnormal_exit(make_tree) -> None:
    tree = make_tree(
        SupervisorSpec(
            children=[child("clean", "sleep 0.3; exit 0", "transient"), child("crashy", "sleep 0.3; exit 3", "transient")],
            backoff_initial=0.01,
        )
    )
    info = tree.wait(lambda i: i["clean"]["state"] == "exited" and i["crashy"]["restarts"] >= 1)
    assert info["clean"]["restarts"] == 0


def test_temporary_child_is_never_restarted(make_tree) -> None:
    tree = make_tree(SupervisorSpec(children=[child("once", "sleep 0.2; exit 9", "temporary")]))
    info = tree.wait(lambda i: i["once"]["state"] == "exited")
    assert info["once"]["restarts"] == 0


def test_permanent_child_is_restarted_after_a_clean_exit(make_tree) -> None:
    tree = make_tree(SupervisorSpec(children=[child("always", "sleep 0.2; exit 0")], backoff_initial=0.01))
    tree.wait(lambda i: i["always"]["restarts"] >= 2)


def test_backoff_doubles_between_quick_crashes(make_tree) -> None:
    tree = make_tree(
        SupervisorSpec(children=[child("hot", "exit 1")], backoff_initial=0.1, backoff_max=10, max_restarts=100, max_seconds=60)
    )
    started = time.monotonic()
    tree.wait(lambda i: i["hot"]["restarts"] >= 4, timeout=20)
    # 0.1 + 0.2 + 0.4 + 0.8 s of backoff at least, not a tight loop
    assert time.monotonic() - started >= 1.4


def test_intensity_escalates_and_stops_everything(make_tree) -> None:
    tree = make_tree(
        SupervisorSpec(
            children=[child("steady", "exec sleep 60"), child("hot", "sleep 0.05; exit 1")],
            backoff_initial=0.01,
            max_restarts=2,
            max_seconds=30,
        )
    )
    deadline = time.monotonic() + 15
    while not tree.escalations and time.monotonic() < deadline:
        tree.info()
        time.sleep(0.05)
    assert tree.escalations and "child hot exceeded the restart intensity (2 restarts in 30s)" in tree.escalations[0]
    info = tree.info()
    assert info["steady"]["state"] == "stopped" and info["steady"]["pid"] == 0


def test_rest_for_one_restarts_later_siblings_only(make_tree) -> None:
    tree = make_tree(
        SupervisorSpec(
            children=[child("a", "exec sleep 60"), child("b", "sleep 0.5; exit 1"), child("c", "exec sleep 60")],
            strategy="rest_for_one",
            backoff_initial=0.01,
            max_restarts=50,
        )
    )
    first = tree.info()
    info = tree.wait(lambda i: i["b"]["restarts"] >= 1 and i["c"]["restarts"] >= 1)
    assert info["a"]["restarts"] == 0 and info["a"]["pid"] == first["a"]["pid"]
    assert info["c"]["pid"] != first["c"]["pid"]
