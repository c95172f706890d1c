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
    assert res["devices"][0] == {"allow": False, "access": "rwm"}
    # containerd's default Unix devices follow the deny-all rule
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} in res["devices"]
    assert {"allow": True, "type": "c", "major": 136, "access": "rwm"} in res["devices"]
    assert "memory" not in oci.build_spec("ns", "c1", {"config": {"Cmd": ["sh"]}})["linux"]["resources"]
    with pytest.raises(InvalidArgument):
        oci.resources(memory_limit=-1)
    with pytest.raises(InvalidArgument):
        oci.resources(memory_limit=1000)


def _caps_of(spec: dict) -> dict:
    return spec["process"]["capabilities"]


def test_privileged() -> None:
    spec = oci.build_spec("ns", "c", {"Cmd": ["sh"]}, privileged=True)
    caps = _caps_of(spec)
    current = oci.current_capabilities()
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == current
    assert "ambient" not in caps and "CAP_SYS_ADMIN" in current
    assert "maskedPaths" not in spec["linux"] and "readonlyPaths" not in spec["linux"]
    assert "seccomp" not in spec["linux"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    for mount in spec["mounts"]:
        if mount["type"] in ("sysfs", "cgroup"):
            assert "ro" not in mount["options"] and "rw" in mount["options"]
    paths = {d["path"] for d in spec["linux"]["devices"]}
    assert "/dev/null" in paths and "/dev/console" not in paths
    assert not [p for p in paths if p.startswith(("/dev/pts/", "/dev/shm/"))]
    null = next(d for d in spec["linux"]["devices"] if d["path"] == "/dev/null")
    assert (null["type"], null["major"], null["minor"]) == ("c", 1, 3)
    # privileged + --seccomp: the default profile, opened up by the capabilities (as ctr)
    spec = oci.build_spec("ns", "c", {"Cmd": ["sh"]}, privileged=True, seccomp=True)
    allowed = {n for rule in spec["linux"]["seccomp"]["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for n in rule["names"]}
    assert "mount" in allowed


def test_current_capabilities_from_a_status_file(tmp_path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0\nCapEff:\t0000000000200001\n")
    assert oci.current_capabilities(str(status)) == ["CAP_CHOWN", "CAP_SYS_ADMIN"]


def test_host_devices_reads_a_dev_tree(tmp_path) -> None:
    # Directories recurse (pts and the like are skipped); files and symlinks are no devices.
    assert oci.host_devices(str(tmp_path / "missing")) == []
    (tmp_path / "pts").mkdir()
    (tmp_path / "plain").write_text("x")
    os.symlink("/dev/null", tmp_path / "link")
    assert oci.host_devices(str(tmp_path)) == []
    devices = oci.host_devices("/dev")
    assert all(d["type"] in ("b", "c") for d in devices)


def test_net_host() -> None:
    spec = oci.build_spec("ns", "c", {"Cmd": ["sh"]}, net_host=True, env=["HOSTNAME=mine"])
    assert "network" not in [n["type"] for n in spec["linux"]["namespaces"]]
    assert "uts" in [n["type"] for n in spec["linux"]["namespaces"]]
    binds = {m["destination"]: m for m in spec["mounts"] if m["type"] == "bind"}
    assert binds["/etc/hosts"] == {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]}
    assert binds["/etc/resolv.conf"]["options"] == ["rbind", "ro"]
    assert f"HOSTNAME={os.uname().nodename}" in spec["process"]["env"]  # as ctr: after --env
    assert "hostname" not in spec
    spec = oci.build_spec("ns", "c", {"Cmd": ["sh"]}, net_host=True, hostname="box")
    assert spec["hostname"] == "box" and "HOSTNAME=box" in spec["process"]["env"]


def test_mounts_follow_the_defaults() -> None:
    user = {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "ro"]}
    spec = oci.build_spec("ns", "c", {"Cmd": ["sh"]}, mounts=[user], net_host=True)
    destinations = [m["destination"] for m in spec["mounts"]]
    assert destinations[-3:] == ["/data", "/etc/hosts", "/etc/resolv.conf"]
    assert spec["mounts"][-3] == user
    for bad in ({"destination": "rel"}, {"destination": "/a/../b"}, {"destination": "/a", "options": "ro"}, "x"):
        with pytest.raises(InvalidArgument):
            oci.build_spec("ns", "c", {"Cmd": ["sh"]}, mounts=[bad])


def test_seccomp_default_profile() -> None:
    from moord.oci import seccomp

    assert "seccomp" not in oci.build_spec("ns", "c", {"Cmd": ["sh"]})["linux"]  # as ctr: only when asked
    profile = oci.build_spec("ns", "c", {"Cmd": ["sh"]}, seccomp=True)["linux"]["seccomp"]
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    rules = profile["syscalls"]
    allowed = {n for rule in rules if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule for n in rule["names"]}
    for name in ("read", "write", "execve", "openat", "exit_group", "chroot", "ptrace"):
        assert name in allowed
    for name in ("mount", "unshare", "setns", "keyctl", "reboot", "init_module", "bpf", "kexec_load"):
        assert name not in allowed
    clone = next(rule for rule in rules if rule["names"] == ["clone"])
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in rules
    assert len([r for r in rules if r["names"] == ["personality"]]) == 5
    # capability-gated groups and arch/kernel variants
    admin = seccomp.default_profile(["CAP_SYS_ADMIN"], machine="x86_64", kernel_release="6.1.0-9-amd64")
    admin_allowed = {n for rule in admin["syscalls"] for n in rule["names"] if rule["action"] == "SCMP_ACT_ALLOW"}
    assert {"mount", "unshare", "clone", "clone3"} <= admin_allowed
    assert not [r for r in admin["syscalls"] if r["action"] == "SCMP_ACT_ERRNO"]
    old = seccomp.default_profile([], machine="aarch64", kernel_release="4.4.0")
    assert old["architectures"] == ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]
    old_allowed = {n for rule in old["syscalls"] for n in rule["names"]}
    assert "ptrace" not in old_allowed and "set_tls" in old_allowed and "arch_prctl" not in old_allowed
    s390 = seccomp.default_profile([], machine="s390x")
    assert next(r for r in s390["syscalls"] if r["names"] == ["clone"])["args"][0]["index"] == 1
    # a profile of one's own, only with seccomp on
    mine = {"defaultAction": "SCMP_ACT_ALLOW"}
    assert oci.build_spec("ns", "c", {"Cmd": ["sh"]}, seccomp=True, seccomp_profile=mine)["linux"]["seccomp"] == mine
    with pytest.raises(InvalidArgument):
        oci.build_spec("ns", "c", {"Cmd": ["sh"]}, seccomp_profile=mine)
    with pytest.raises(InvalidArgument):
        oci.build_spec("ns", "c", {"Cmd": ["sh"]}, seccomp=True, seccomp_profile={"syscalls": []})


def test_seccomp_allowlist_is_containerds() -> None:
    from moord.oci import seccomp

    # 349 names in containerd 1.6.20's unconditional allowlist, none twice
    assert len(seccomp._ALWAYS_ALLOWED) == len(set(seccomp._ALWAYS_ALLOWED)) == 349
    assert seccomp._ALWAYS_ALLOWED[0] == "accept" and seccomp._ALWAYS_ALLOWED[-1] == "writev"
