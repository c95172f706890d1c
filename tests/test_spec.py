"""oci/spec.py: containerd's defaults, image config merging, user resolution inside a rootfs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator

import pytest

from moord.messages.errors import InvalidArgument, NotFound
from moord.oci import spec as oci


@pytest.fixture
def rootfs() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="md-spec-", dir="/tmp")
    os.makedirs(os.path.join(base, "etc"))
    with open(os.path.join(base, "etc", "passwd"), "w") as fh:
        fh.write("root:x:0:0:root:/root:/bin/sh\n# comment\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1001::/home/app:/bin/sh\n")
    with open(os.path.join(base, "etc", "group"), "w") as fh:
        fh.write("root:x:0:\napp:x:1001:\nwheel:x:10:app,other\naudio:x:29:app\nnogroup:x:65534:\n")
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_defaults_match_containerd() -> None:
    spec = oci.default_spec("default", "web")
    assert spec["root"] == {"path": "rootfs"}
    assert [n["type"] for n in spec["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    destinations = [m["destination"] for m in spec["mounts"]]
    for d in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"):
        assert d in destinations
    assert spec["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert "CAP_NET_BIND_SERVICE" in spec["process"]["capabilities"]["bounding"]
    assert "CAP_SYS_ADMIN" not in spec["process"]["capabilities"]["effective"]
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert "/proc/sys" in spec["linux"]["readonlyPaths"]
    assert spec["linux"]["cgroupsPath"] == "/moord/default/web"
    assert "oomScoreAdj" not in spec["process"]
    assert spec["process"]["noNewPrivileges"] is True


def test_image_config_and_options() -> None:
    image = {
        "architecture": "amd64",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "LANG=C"],
            "Entrypoint": ["/entry"],
            "Cmd": ["serve", "--port", "80"],
            "WorkingDir": "/srv",
            "User": "1000:1001",
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    spec = oci.build_spec("ns", "c1", image, env=["LANG=en_US.UTF-8", "EXTRA=1"], hostname="box", readonly_rootfs=True)
    process = spec["process"]
    assert process["args"] == ["/entry", "serve", "--port", "80"]
    assert process["env"] == ["PATH=/usr/bin:/bin", "LANG=en_US.UTF-8", "EXTRA=1"]
    assert process["cwd"] == "/srv"
    assert process["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [1001]}
    assert spec["hostname"] == "box"
    assert spec["root"]["readonly"] is True
    # args replace Cmd, the Entrypoint stays (ctr run IMAGE ID args...)
    spec = oci.build_spec("ns", "c1", image, args=["sh"])
    assert spec["process"]["args"] == ["/entry", "sh"]
    # no image Env: containerd's default PATH
    spec = oci.build_spec("ns", "c1", {"Cmd": ["true"]}, tty=True)
    assert spec["process"]["env"][0].startswith("PATH=/usr/local/sbin")
    assert "TERM=xterm" in spec["process"]["env"]
    assert spec["process"]["terminal"] is True
    # the JSON round trip the container record uses
    assert oci.loads(oci.dumps(spec)) == spec


def test_users_resolved_from_the_rootfs(rootfs: str) -> None:
    assert oci.resolve_user("", rootfs) == (0, 0, [0])
    assert oci.resolve_user("app", rootfs) == (1000, 1001, [1001, 10, 29])
    assert oci.resolve_user("1000", rootfs) == (1000, 1001, [1001, 10, 29])
    assert oci.resolve_user("app:wheel", rootfs) == (1000, 10, [10, 29])
    assert oci.resolve_user("4242", rootfs) == (4242, 0, [0])
    assert oci.resolve_user("4242:7") == (4242, 7, [7])
    with pytest.raises(NotFound):
        oci.resolve_user("ghost", rootfs)
    with pytest.raises(NotFound):
        oci.resolve_user("app:nogroupnamed", rootfs)
    with pytest.raises(InvalidArgument):
        oci.resolve_user("app")  # a name needs the rootfs
    with pytest.raises(InvalidArgument):
        oci.resolve_user("a:b:c", rootfs)
    spec = oci.build_spec("ns", "c", {"Cmd": ["x"], "User": "app"}, rootfs=rootfs)
    assert spec["process"]["user"]["uid"] == 1000


def test_passwd_symlinks_never_leave_the_rootfs(rootfs: str) -> None:
    outside = tempfile.mkdtemp(prefix="md-out-", dir="/tmp")
    try:
        with open(os.path.join(outside, "passwd"), "w") as fh:
            fh.write("evil:x:0:0::/:/bin/sh\n")
        os.unlink(os.path.join(rootfs, "etc", "passwd"))
        # absolute and ../ escapes both resolve inside the rootfs, where nothing is found
        os.symlink(os.path.join(outside, "passwd"), os.path.join(rootfs, "etc", "passwd"))
        with pytest.raises(NotFound):
            oci.resolve_user("evil", rootfs)
        os.unlink(os.path.join(rootfs, "etc", "passwd"))
        os.symlink("../../../../../../.." + outside + "/passwd", os.path.join(rootfs, "etc", "passwd"))
        with pytest.raises(NotFound):
            oci.resolve_user("evil", rootfs)
        # a link that stays inside works
        os.makedirs(os.path.join(rootfs, "data"))
        with open(os.path.join(rootfs, "data", "pw"), "w") as fh:
            fh.write("inside:x:7:7::/:/bin/sh\n")
        os.unlink(os.path.join(rootfs, "etc", "passwd"))
        os.symlink("/data/pw", os.path.join(rootfs, "etc", "passwd"))
        assert oci.resolve_user("inside", rootfs)[:2] == (7, 7)
        # loops are refused
        os.unlink(os.path.join(rootfs, "etc", "passwd"))
        os.symlink("passwd", os.path.join(rootfs, "etc", "passwd"))
        with pytest.raises(InvalidArgument):
            oci.resolve_user("inside", rootfs)
    finally:
        shutil.rmtree(outside)


def test_hostile_image_configs() -> None:
    with pytest.raises(InvalidArgument):
        oci.build_spec("ns", "c", {"Cmd": "sh -c x"})
    with pytest.raises(InvalidArgument):
        oci.build_spec("ns", "c", {"Cmd": ["x"], "WorkingDir": "relative"})
    with pytest.raises(InvalidArgument):
        oci.build_spec("ns", "c", {})  # nothing to run
    with pytest.raises(InvalidArgument):
        oci.build_spec("ns", "c", {"Cmd": ["x"]}, env=["=novalue"])
    with pytest.raises(InvalidArgument):
        oci.cgroups_path("ns", "../escape")
    with pytest.raises(InvalidArgument):
        oci.loads(b"[1, 2]")
    with pytest.raises(InvalidArgument):
        oci.loads(b"{not json")


def test_imports_only_the_standard_library() -> None:
    code = (
        "import sys; import moord.oci.spec; "
        "bad = [m for m in ('pydantic', 'zmq', 'msgpack', 'sqlalchemy') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resource_limits() -> None:
    spec = oci.build_spec("ns", "c1", {"config": {"Cmd": ["sh"]}}, memory_limit=32 << 20, cpus=0.5, pids_limit=64)
    res = spec["linux"]["resources"]
    assert res["memory"] == {"limit": 32 << 20, "swap": 32 << 20}
    assert res["cpu"] == {"quota": 50000, "period": 100000}
    assert res["pids"] == {"limit": 64}
    assert res["devices"] == [{"allow": False, "access": "rwm"}]
    assert "memory" not in oci.build_spec("ns", "c1", {"config": {"Cmd": ["sh"]}})["linux"]["resources"]
    with pytest.raises(InvalidArgument):
        oci.resources(memory_limit=-1)
    with pytest.raises(InvalidArgument):
        oci.resources(memory_limit=1000)
