"""moorctl content / snapshots / namespaces against a real moord, read as ctr's tables."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from typing import Iterator

import pytest

from moord.bus.client import Client
from tests.daemon import Daemon, moorctl_argv, unmount_under

CHUNK = 1024 * 1024


def put_blob(client: Client, data: bytes, labels: dict[str, str] | None = None, ref: str = "") -> str:
    """Write `data` through content.write in 1 MiB chunks under one writer token; returns its digest.

    The blob is written under a lease of its own (never released) so that the garbage
    collector, which any deletion in the shared daemon may set off, leaves it alone.
    """
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ref = ref or f"test-{uuid.uuid4().hex}"
    writer = uuid.uuid4().hex
    lease = client.call("leases.create", {})["lease"]["id"]
    client.call(
        "content.write",
        {"action": "stat", "ref": ref, "total": len(data), "expected": digest, "writer": writer},
        lease=lease,
    )
    offset = 0
    while offset + CHUNK < len(data):
        client.call(
            "content.write",
            {"action": "write", "ref": ref, "offset": offset, "writer": writer},
            frames=[data[offset : offset + CHUNK]],
            lease=lease,
        )
        offset += CHUNK
    client.call(
        "content.write",
        {"action": "commit", "ref": ref, "offset": offset, "total": len(data), "expected": digest,
         "labels": labels or {}, "writer": writer},
        frames=[data[offset:]],
        lease=lease,
    )
    return digest


def table(stdout: str) -> list[list[str]]:
    """A ctr-style table as rows of cells (cells never contain spaces in these tests)."""
    return [line.split() for line in stdout.splitlines() if line.strip()]


def ok(daemon: Daemon, *args: str, ns: str = "default") -> subprocess.CompletedProcess[str]:
    """Run moorctl in namespace `ns` and insist on success."""
    result = daemon.moorctl("--namespace", ns, *args)
    assert result.returncode == 0, f"moorctl {' '.join(args)}: {result.stderr}"
    return result


def failing(daemon: Daemon, *args: str, ns: str = "default") -> subprocess.CompletedProcess[str]:
    """Run moorctl and insist on exit status 1."""
    result = daemon.moorctl("--namespace", ns, *args)
    assert result.returncode == 1, f"moorctl {' '.join(args)} should fail: {result.stdout} {result.stderr}"
    return result


@pytest.fixture
def ns(daemon: Daemon) -> str:
    """A namespace of its own for one test (tests share the module's daemon)."""
    return "t" + uuid.uuid4().hex[:10]


# -- content -------------------------------------------------------------------------------


def test_content_ls_shows_ctr_columns_and_filters(daemon: Daemon, ns: str) -> None:
    client = daemon.client(ns)
    small = put_blob(client, b"small blob\n", {"kind": "small", "a.b": "c"})
    big = put_blob(client, os.urandom(3 * CHUNK + 123), {"kind": "big"})

    rows = table(ok(daemon, "content", "ls", ns=ns).stdout)
    assert rows[0] == ["DIGEST", "SIZE", "AGE", "LABELS"]
    by_digest = {row[0]: row for row in rows[1:]}
    assert set(by_digest) == {small, big}
    assert by_digest[small][1] == "11B"
    assert by_digest[big][1] == "3.146MB"  # go-units HumanSize: 3145851 bytes
    assert by_digest[small][-1] == "a.b=c,kind=small"
    assert " ".join(by_digest[big][2:-1]) in ("Less than a second", "1 second", "2 seconds", "3 seconds")

    only_small = table(ok(daemon, "content", "ls", 'labels."a.b"==c', ns=ns).stdout)
    assert [row[0] for row in only_small[1:]] == [small]
    either = ok(daemon, "content", "ls", "-q", "labels.kind==big", "labels.kind==small", ns=ns).stdout.split()
    assert sorted(either) == sorted([small, big])
    assert ok(daemon, "content", "ls", "-q", "labels.kind~=^sm", ns=ns).stdout.split() == [small]
    bad = failing(daemon, "content", "ls", "labels.kind==", ns=ns)
    assert "invalid_argument" in bad.stderr


def test_content_get_streams_exact_bytes(daemon: Daemon, ns: str) -> None:
    data = os.urandom(9 * CHUNK + 7)  # more than two of the daemon's 4 MiB read chunks
    digest = put_blob(daemon.client(ns), data)
    result = subprocess.run(
        moorctl_argv(daemon.config_path, "-n", ns, "content", "get", digest), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == data

    missing = "sha256:" + "0" * 64
    assert "not_found" in failing(daemon, "content", "get", missing, ns=ns).stderr
    assert "invalid_argument" in failing(daemon, "content", "get", "sha256:../../etc/passwd", ns=ns).stderr


def test_content_label_sets_and_clears(daemon: Daemon, ns: str) -> None:
    digest = put_blob(daemon.client(ns), b"labelled", {"keep": "1", "drop": "x"})
    assert ok(daemon, "content", "label", digest, "new=v", "drop=", ns=ns).stdout.strip() == "keep=1,new=v"
    assert ok(daemon, "content", "label", digest, ns=ns).stdout.strip() == "keep=1,new=v"  # no labels: just show
    info = daemon.client(ns).call("content.info", {"digest": digest})["info"]
    assert info["labels"] == {"keep": "1", "new": "v"}
    assert "not_found" in failing(daemon, "content", "label", "sha256:" + "1" * 64, "a=b", ns=ns).stderr


def test_content_active_lists_ingests(daemon: Daemon, ns: str) -> None:
    client = daemon.client(ns)
    client.call("content.write", {"action": "write", "ref": "layer-one", "total": 5000, "writer": "w1"}, frames=[b"x" * 2000])
    client.call("content.write", {"action": "write", "ref": "config-two", "total": 100, "writer": "w2"}, frames=[b"y" * 10])
    try:
        rows = table(ok(daemon, "content", "active", ns=ns).stdout)
        assert rows[0] == ["REF", "SIZE", "AGE"]
        by_ref = {row[0]: row for row in rows[1:]}
        assert set(by_ref) == {"layer-one", "config-two"}
        assert by_ref["layer-one"][1] == "2kB" and by_ref["config-two"][1] == "10B"
        assert [r[0] for r in table(ok(daemon, "content", "active", "^layer", ns=ns).stdout)[1:]] == ["layer-one"]
        assert [r[0] for r in table(ok(daemon, "content", "active", "ref==config-two", ns=ns).stdout)[1:]] == ["config-two"]
        # other namespaces do not see them
        assert table(ok(daemon, "content", "active", ns=ns + "x").stdout)[1:] == []
    finally:
        client.call("content.abort", {"ref": "layer-one"})
        client.call("content.abort", {"ref": "config-two"})
    assert table(ok(daemon, "content", "active", ns=ns).stdout)[1:] == []


def test_content_rm(daemon: Daemon, ns: str) -> None:
    first = put_blob(daemon.client(ns), b"first")
    second = put_blob(daemon.client(ns), b"second")
    unknown = "sha256:" + "2" * 64
    result = ok(daemon, "content", "rm", first, unknown, second, ns=ns)
    assert result.stdout.split() == [first, second]  # unknown blobs are skipped, as ctr does
    assert "not found" in result.stderr
    assert ok(daemon, "content", "ls", "-q", ns=ns).stdout.split() == []
    bad = failing(daemon, "content", "rm", "sha256:NOTHEX", ns=ns)
    assert "invalid_argument" in bad.stderr


# -- snapshots -----------------------------------------------------------------------------


def test_snapshots_lifecycle(daemon: Daemon, ns: str) -> None:
    ok(daemon, "snapshots", "prepare", "base-active", ns=ns)
    ok(daemon, "snapshots", "commit", "base", "base-active", ns=ns)
    prepared = ok(daemon, "snapshots", "prepare", "--mounts", "work", "base", ns=ns).stdout
    mounts = json.loads(prepared)
    assert mounts[0]["type"] == "overlay" and any(o.startswith("upperdir=") for o in mounts[0]["options"])
    # views carry no gc.root label (as ctr's): pin this one against a collection meanwhile
    view = ok(daemon, "snapshots", "view", "--label", "containerd.io/gc.root=test", "-t", "/mnt/x", "look", "base", ns=ns).stdout
    assert view.startswith("mount -t bind ") and " /mnt/x -o ro" in view

    rows = table(ok(daemon, "snapshots", "ls", ns=ns).stdout)
    assert rows[0] == ["KEY", "PARENT", "KIND"]
    assert sorted(rows[1:]) == [["base", "Committed"], ["look", "base", "View"], ["work", "base", "Active"]]
    committed = table(ok(daemon, "snapshots", "ls", "kind==committed", ns=ns).stdout)[1:]
    assert committed == [["base", "Committed"]]

    info = json.loads(ok(daemon, "snapshots", "info", "work", ns=ns).stdout)
    assert info["Kind"] == "Active" and info["Name"] == "work" and info["Parent"] == "base"
    assert "containerd.io/gc.root" in info["Labels"]  # ctr labels what it prepares
    assert info["Created"].endswith("Z")

    labels = ok(daemon, "snapshots", "label", "work", "team=storage", "containerd.io/gc.root=", ns=ns).stdout.strip()
    assert labels == "team=storage"
    assert json.loads(ok(daemon, "snapshots", "info", "work", ns=ns).stdout)["Labels"] == {"team": "storage"}

    tree = ok(daemon, "snapshots", "tree", ns=ns).stdout.splitlines()
    assert tree[0] == " base" and sorted(tree[1:]) == ["  \\_ look", "  \\_ work"]

    refused = failing(daemon, "snapshots", "rm", "base", ns=ns)
    assert "failed_precondition" in refused.stderr
    assert "already_exists" in failing(daemon, "snapshots", "prepare", "work", "base", ns=ns).stderr
    assert "not_found" in failing(daemon, "snapshots", "prepare", "orphan", "no-such-parent", ns=ns).stderr
    assert "failed_precondition" in failing(daemon, "snapshots", "commit", "again", "look", ns=ns).stderr
    ok(daemon, "snapshots", "rm", "look", "work", "base", ns=ns)
    assert table(ok(daemon, "snapshots", "ls", ns=ns).stdout)[1:] == []


def test_snapshots_usage_and_mounts_are_real(daemon: Daemon, ns: str) -> None:
    ok(daemon, "snapshots", "prepare", "filled", ns=ns)
    mountpoint = tempfile.mkdtemp(prefix="moord-t-mnt-", dir="/tmp")
    try:
        line = ok(daemon, "snapshots", "mounts", mountpoint, "filled", ns=ns).stdout.strip()
        assert line.startswith("mount -t bind ") and f" {mountpoint} -o " in line
        # the printed command mounts for real: what is written there lands in the snapshot
        subprocess.run(line.split(), check=True, capture_output=True)
        try:
            with open(os.path.join(mountpoint, "payload"), "wb") as fh:
                fh.write(b"z" * 100_000)
            os.mkdir(os.path.join(mountpoint, "dir"))
        finally:
            subprocess.run(["umount", mountpoint], check=True)
    finally:
        unmount_under(mountpoint)
        os.rmdir(mountpoint)

    rows = table(ok(daemon, "snapshots", "usage", "-b", "filled", ns=ns).stdout)
    assert rows[0] == ["KEY", "SIZE", "INODES"]
    key, size, inodes = rows[1]
    assert key == "filled" and int(size) >= 100_000 and int(inodes) >= 3
    human = table(ok(daemon, "snapshots", "usage", ns=ns).stdout)
    assert human[1][0] == "filled" and human[1][2] == "KiB"
    ok(daemon, "snapshots", "commit", "filled-c", "filled", ns=ns)
    assert table(ok(daemon, "snapshots", "usage", "-b", "filled-c", ns=ns).stdout)[1] == ["filled-c", size, inodes]
    ok(daemon, "snapshots", "rm", "filled-c", ns=ns)


def test_snapshotter_choice(daemon: Daemon, ns: str) -> None:
    # --snapshotter before or after the subcommand, as ctr's group flag and its env var
    ok(daemon, "snapshots", "--snapshotter", "native", "prepare", "n1", ns=ns)
    assert table(ok(daemon, "snapshots", "ls", "--snapshotter", "native", ns=ns).stdout)[1:] == [["n1", "Active"]]
    assert table(ok(daemon, "snapshots", "ls", ns=ns).stdout)[1:] == []  # overlayfs by default
    mounts = json.loads(
        ok(daemon, "snapshots", "--snapshotter", "native", "view", "--label", "pin=1", "--label",
           "containerd.io/gc.root=test", "--mounts", "nv", ns=ns).stdout
    )
    assert json.loads(ok(daemon, "snapshots", "--snapshotter", "native", "info", "nv", ns=ns).stdout)["Labels"] == {
        "pin": "1", "containerd.io/gc.root": "test"}
    assert mounts[0]["type"] == "bind"
    # the namespace's default-snapshotter label, as containerd's client reads it
    ok(daemon, "namespaces", "label", ns, "containerd.io/defaults/snapshotter=native")
    assert sorted(r[0] for r in table(ok(daemon, "snapshots", "ls", ns=ns).stdout)[1:]) == ["n1", "nv"]
    assert "invalid_argument" in failing(daemon, "snapshots", "--snapshotter", "zfs", "ls", ns=ns).stderr
    ok(daemon, "snapshots", "rm", "n1", "nv", ns=ns)
    ok(daemon, "namespaces", "label", ns, "containerd.io/defaults/snapshotter=")


# -- namespaces ----------------------------------------------------------------------------


def test_namespaces_commands(daemon: Daemon, ns: str) -> None:
    ok(daemon, "namespaces", "create", ns, "team=storage", "tier=1")
    assert "already_exists" in failing(daemon, "namespaces", "create", ns).stderr
    assert "invalid_argument" in failing(daemon, "namespaces", "create", "bad/name").stderr
    rows = table(ok(daemon, "namespaces", "ls").stdout)
    assert rows[0] == ["NAME", "LABELS"]
    assert [ns, "team=storage,tier=1"] in rows
    ok(daemon, "namespaces", "label", ns, "tier=", "owner=me")
    assert [ns, "owner=me,team=storage"] in table(ok(daemon, "namespaces", "ls").stdout)
    assert ns in ok(daemon, "namespaces", "ls", "-q").stdout.split()

    # a namespace holding a blob cannot go
    digest = put_blob(daemon.client(ns), b"holds the namespace")
    refused = failing(daemon, "namespaces", "rm", ns)
    assert "failed_precondition" in refused.stderr and "blobs" in refused.stderr
    ok(daemon, "content", "rm", digest, ns=ns)
    assert ok(daemon, "namespaces", "rm", ns, "never-existed").stdout.split() == [ns, "never-existed"]
    assert ns not in ok(daemon, "namespaces", "ls", "-q").stdout.split()


# -- the client path stays light ------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("content", "ls"),
        ("content", "get", "sha256:" + "0" * 64),
        ("content", "active"),
        ("snapshots", "ls"),
        ("snapshots", "info", "missing"),
        ("namespaces", "ls"),
    ],
)
def test_no_pydantic_on_the_client_path(daemon: Daemon, args: tuple[str, ...]) -> None:
    probe = (
        "import sys, atexit\n"
        "atexit.register(lambda: sys.stderr.write('PYDANTIC-LOADED' if 'pydantic' in sys.modules else 'CLEAN'))\n"
        f"sys.argv = ['moorctl', '--config', {daemon.config_path!r}, *{list(args)!r}]\n"
        "from moord.client.cli import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stderr.endswith("CLEAN"), result.stderr


@pytest.fixture(autouse=True)
def _no_mount_leftovers() -> Iterator[None]:
    yield
    with open("/proc/self/mountinfo") as fh:
        assert not [line for line in fh if "/moord-t-mnt-" in line]
