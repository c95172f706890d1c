"""The Images API through moorctl against a real moord: tag, label, list filters, check,
usage, unpack into another snapshotter, export and import, delete with --sync."""

from __future__ import annotations

import os
import tarfile
import tempfile
from typing import Iterator

import pytest

from tests.daemon import Daemon

IMAGE = "docker.io/library/busybox:latest"


@pytest.fixture
def scratch() -> Iterator[str]:
    """A scratch dir for exports (outside the daemon's root)."""
    base = tempfile.mkdtemp(prefix="md-api-", dir="/tmp")
    try:
        yield base
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def ok(daemon: Daemon, *args: str) -> str:
    result = daemon.moorctl(*args)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def test_tag_label_and_filters(imported: Daemon) -> None:
    assert ok(imported, "images", "tag", IMAGE, "example.com/tagged:1", "example.com/tagged:2").split() == [
        "example.com/tagged:1", "example.com/tagged:2"]
    again = imported.moorctl("images", "tag", IMAGE, "example.com/tagged:1")
    assert again.returncode == 1 and "already_exists" in again.stderr
    assert ok(imported, "images", "tag", "--force", IMAGE, "example.com/tagged:1").strip() == "example.com/tagged:1"
    assert ok(imported, "images", "label", "example.com/tagged:1", "team=web", "tier=2").strip() == "team=web,tier=2"
    assert ok(imported, "images", "label", "example.com/tagged:1", "tier=").strip() == "team=web"
    assert ok(imported, "images", "ls", "-q", "labels.team==web").split() == ["example.com/tagged:1"]
    assert ok(imported, "images", "ls", "-q", "name~=tagged").split() == ["example.com/tagged:1", "example.com/tagged:2"]
    digest = imported.client().call("images.get", {"name": IMAGE})["image"]["target"]["digest"]
    assert IMAGE in ok(imported, "images", "ls", "-q", f"target.digest=={digest}").split()
    run = imported.moorctl("run", "--rm", "example.com/tagged:2", "tagged", "echo", "hi")
    assert (run.returncode, run.stdout) == (0, "hi\n"), run.stderr
    ok(imported, "images", "rm", "example.com/tagged:1", "example.com/tagged:2")


def test_check_usage_and_unpack_into_native(imported: Daemon) -> None:
    lines = ok(imported, "images", "check").splitlines()
    assert lines[0].split() == ["REF", "TYPE", "DIGEST", "STATUS", "SIZE", "UNPACKED"]
    row = next(line for line in lines if line.startswith(IMAGE))
    assert "complete (2/2)" in row and row.rstrip().endswith("true")
    assert ok(imported, "images", "check", "-q").split() == [IMAGE]
    native = ok(imported, "images", "check", "--snapshotter", "native")
    assert next(line for line in native.splitlines() if line.startswith(IMAGE)).rstrip().endswith("false")
    out = ok(imported, "images", "unpack", "--snapshotter", "native", IMAGE)
    assert "unpacked into native" in out and "(1 layers applied)" in out
    native = ok(imported, "images", "check", "--snapshotter", "native")
    assert next(line for line in native.splitlines() if line.startswith(IMAGE)).rstrip().endswith("true")
    usage = ok(imported, "images", "usage", IMAGE).splitlines()
    assert usage[0].split() == ["REF", "CONTENT", "BLOBS", "MISSING", "SNAPSHOTS", "LAYERS"]
    cells = usage[1].split()
    assert cells[0] == IMAGE and cells[3] == "3" and cells[4] == "0"  # 3 blobs, none missing
    assert cells[-1] == "2"  # the overlayfs and the native snapshot
    run = imported.moorctl("run", "--rm", "--snapshotter", "native", IMAGE, "native-run", "echo", "hi")
    assert (run.returncode, run.stdout) == (0, "hi\n"), run.stderr


def test_export_import_and_delete_with_sync(imported: Daemon, scratch: str) -> None:
    out = os.path.join(scratch, "bb.tar")
    assert ok(imported, "images", "export", out, IMAGE).startswith(out)
    with tarfile.open(out) as tar:
        assert {"oci-layout", "index.json", "manifest.json"} <= set(tar.getnames())
    refused = imported.moorctl("images", "export", out, IMAGE)
    assert refused.returncode == 1 and "already_exists" in refused.stderr
    docker_tar = os.path.join(scratch, "bb-docker.tar")
    ok(imported, "images", "export", "--format", "docker", docker_tar, IMAGE)

    ns = ["--namespace", "api-sync"]
    assert IMAGE in ok(imported, *ns, "images", "import", docker_tar)
    client = imported.client("api-sync")
    target = client.call("images.get", {"name": IMAGE})["image"]["target"]
    blobs = {i["digest"] for i in client.call("content.list", {})["infos"]}
    assert target["digest"] in blobs and len(blobs) == 3
    assert ok(imported, *ns, "images", "rm", "--sync", IMAGE).strip() == IMAGE
    assert client.call("content.list", {})["infos"] == []  # collected before rm returned
    assert client.call("snapshots.list", {"snapshotter": "overlayfs"})["info"] == []
    missing = imported.moorctl(*ns, "images", "rm", IMAGE)
    assert missing.returncode == 1 and "not_found" in missing.stderr


def test_a_hostile_archive_is_refused_and_the_daemon_keeps_serving(imported: Daemon, scratch: str) -> None:
    import io

    path = os.path.join(scratch, "hostile.tar")
    with tarfile.open(path, "w") as tar:
        for name, data in (("../../escape", b"x"), ("manifest.json", b"[]")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = imported.moorctl("images", "import", path)
    assert result.returncode == 1 and "invalid_argument" in result.stderr and "leaves" in result.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(scratch), "escape"))
    assert IMAGE in ok(imported, "images", "ls", "-q").split()
