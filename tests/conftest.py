"""Shared fixtures: a real moord per module, the busybox image, and a leak check."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Iterator

import pytest

from moord.linux.process import PR_SET_CHILD_SUBREAPER, prctl
from tests.daemon import SESSION_BASES, Daemon, cleanup_base, new_daemon, reap_orphans


@pytest.fixture(scope="session")
def busybox_layout() -> Iterator[str]:
    """An OCI layout of busybox, built by moord's own code from Debian's busybox-static."""
    from moord.oci.busybox import build_busybox_layout

    base = tempfile.mkdtemp(prefix="moord-img-", dir="/tmp")
    path = os.path.join(base, "busybox")
    build_busybox_layout(path, ref="docker.io/library/busybox:latest")
    yield path
    subprocess.run(["rm", "-rf", base], check=False)


@pytest.fixture(scope="module")
def rootfs() -> Iterator[str]:
    """A busybox root filesystem (moord's own builder) usable read-only: mount points made."""
    from moord.linux.mount import is_mountpoint
    from moord.oci.busybox import build_busybox_rootfs

    base = tempfile.mkdtemp(prefix="md-rfs-", dir="/tmp")
    build_busybox_rootfs(base)
    for mount_point in ("proc", "dev", "sys", "run"):
        os.makedirs(os.path.join(base, mount_point), exist_ok=True)
    yield base
    assert not is_mountpoint(base)
    subprocess.run(["rm", "-rf", base], check=False)


def _start(extra: str = "") -> Daemon:
    daemon = new_daemon(extra)
    try:
        daemon.start()
    except BaseException:
        daemon.stop()
        cleanup_base(daemon.base)
        raise
    return daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """A moord shared by one test module."""
    d = _start()
    try:
        yield d
    finally:
        d.stop()
        cleanup_base(d.base)


@pytest.fixture
def fresh_daemon() -> Iterator[Daemon]:
    """A moord of its own, for tests that kill or break things."""
    d = _start()
    try:
        yield d
    finally:
        d.stop()
        cleanup_base(d.base)


@pytest.fixture(scope="module")
def imported(daemon: Daemon, busybox_layout: str) -> Daemon:
    """The module's daemon with busybox imported and unpacked."""
    result = daemon.moorctl("images", "import", busybox_layout)
    assert result.returncode == 0, result.stderr
    return daemon


@pytest.fixture(scope="session", autouse=True)
def no_leftovers() -> Iterator[None]:
    """Adopt orphans as a subreaper (this sandbox's pid 1 never reaps), and check at the end
    that nothing of ours is mounted or running."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    yield
    reap_orphans()
    import psutil

    # As subreaper we adopted every shim our daemons started: any still alive leaked.
    alive = [p.pid for p in psutil.Process().children(recursive=True) if "moord-shim" in " ".join(p.cmdline())]
    assert not alive, f"tests left shims running: {alive}"
    # Apply workers and their forkserver must end with their images process.
    time.sleep(0.5)
    workers = [p.pid for p in psutil.Process().children(recursive=True) if any(w in " ".join(p.cmdline()) for w in ("apply worker", "multiprocessing.forkserver"))]
    assert not workers, f"tests left layer apply workers running: {workers}"
    with open("/proc/self/mountinfo") as fh:
        mounts = [line.split()[4] for line in fh if line.split()[4].startswith(tuple(base + "/" for base in SESSION_BASES))]
    assert not mounts, f"tests left mounts behind: {mounts[:5]}"
