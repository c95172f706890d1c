"""Interop with Debian's skopeo and umoci, both ways, with real runs.

skopeo copies what moord exports (OCI tar, OCI directory, docker-archive) into other
layouts and archives and back; moord imports skopeo's output and runs it. umoci builds
an image from scratch (init, new, unpack, repack, config) that moord imports and runs.
Only local paths: skopeo runs with --insecure-policy and never touches the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Iterator

import pytest

from tests.daemon import Daemon

IMAGE = "docker.io/library/busybox:latest"

pytestmark = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")), reason="skopeo and umoci needed")


@pytest.fixture
def scratch() -> Iterator[str]:
    """A scratch dir for archives and layouts."""
    base = tempfile.mkdtemp(prefix="md-interop-", dir="/tmp")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def tool(*argv: str) -> str:
    """Run skopeo or umoci; fail the test with its stderr."""
    if argv[0] == "skopeo":
        argv = ("skopeo", "--insecure-policy", *argv[1:])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (argv, result.stderr)
    return result.stdout


def ok(daemon: Daemon, *args: str) -> str:
    result = daemon.moorctl(*args)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def runs(daemon: Daemon, image: str, container: str) -> None:
    result = daemon.moorctl("run", "--rm", image, container, "echo", "hi")
    assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr


def test_skopeo_copies_moord_exports_and_back(imported: Daemon, scratch: str) -> None:
    oci_tar = os.path.join(scratch, "bb-oci.tar")
    ok(imported, "images", "export", oci_tar, IMAGE)
    layout = os.path.join(scratch, "layout")
    tool("skopeo", "copy", f"oci-archive:{oci_tar}", f"oci:{layout}:copy")
    back_tar = os.path.join(scratch, "back-docker.tar")
    tool("skopeo", "copy", f"oci:{layout}:copy", f"docker-archive:{back_tar}:example.com/back:1")
    assert "example.com/back:1" in ok(imported, "images", "import", back_tar)
    runs(imported, "example.com/back:1", "skopeo-back")
    assert "example.com/skopeo:copy" in ok(imported, "images", "import", "--base-name", "example.com/skopeo", layout)
    runs(imported, "example.com/skopeo:copy", "skopeo-layout")


def test_skopeo_reads_moord_directories_and_docker_archives(imported: Daemon, scratch: str) -> None:
    directory = os.path.join(scratch, "exported")
    ok(imported, "images", "export", "--dir", directory, IMAGE)
    docker_tar = os.path.join(scratch, "bb-docker.tar")
    ok(imported, "images", "export", "--format", "docker", docker_tar, IMAGE)
    inspected = tool("skopeo", "inspect", f"docker-archive:{docker_tar}")
    assert '"Layers"' in inspected
    archive = os.path.join(scratch, "from-dir.tar")
    tool("skopeo", "copy", f"oci:{directory}:latest", f"oci-archive:{archive}:fromdir")
    assert "example.com/fromdir:fromdir" in ok(imported, "images", "import", "--base-name", "example.com/fromdir", archive)
    runs(imported, "example.com/fromdir:fromdir", "skopeo-dir")
    converted = os.path.join(scratch, "from-docker")
    tool("skopeo", "copy", f"docker-archive:{docker_tar}", f"oci:{converted}:fromdocker")
    assert "example.com/fd:fromdocker" in ok(imported, "images", "import", "--base-name", "example.com/fd", converted)
    runs(imported, "example.com/fd:fromdocker", "skopeo-docker")


def test_moord_runs_an_image_umoci_built(imported: Daemon, scratch: str) -> None:
    from moord.oci.busybox import build_busybox_rootfs

    layout = os.path.join(scratch, "umoci")
    bundle = os.path.join(scratch, "bundle")
    tool("umoci", "init", "--layout", layout)
    tool("umoci", "new", "--image", f"{layout}:bb")
    tool("umoci", "unpack", "--image", f"{layout}:bb", bundle)
    build_busybox_rootfs(os.path.join(bundle, "rootfs"))
    tool("umoci", "repack", "--image", f"{layout}:bb", bundle)
    tool("umoci", "config", "--image", f"{layout}:bb", "--config.cmd", "sh",
         "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert "example.com/umoci:bb" in ok(imported, "images", "import", "--base-name", "example.com/umoci", layout)
    runs(imported, "example.com/umoci:bb", "umoci-run")
    # And back: umoci unpacks what moord exports.
    exported = os.path.join(scratch, "umoci-back")
    ok(imported, "images", "export", "--dir", exported, "example.com/umoci:bb")
    tool("umoci", "unpack", "--image", f"{exported}:bb", os.path.join(scratch, "bundle2"))
    assert os.path.exists(os.path.join(scratch, "bundle2", "rootfs", "bin", "busybox"))
