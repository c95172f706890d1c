"""`moorctl run` spec options against real runc: --privileged, --net-host, --user by name,
--mount, --seccomp."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from moord.client.run import needs_image_users, readonly_mounts
from tests.daemon import Daemon

IMAGE = "docker.io/library/busybox:latest"


def _run(daemon: Daemon, name: str, *argv: str) -> tuple[int, str, str]:
    """`moorctl run --rm` with options and command in argv (options first, then '--' and the command)."""
    split = argv.index("--")
    result = daemon.moorctl("run", "--rm", *argv[:split], IMAGE, name, *argv[split + 1:])
    return result.returncode, result.stdout, result.stderr


def _interfaces(proc_net_dev: str) -> set[str]:
    return {line.split(":", 1)[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line}


def test_privileged_can_mount_and_sees_host_devices(imported: Daemon) -> None:
    script = "mount -t tmpfs none /tmp && grep -q ' /tmp tmpfs ' /proc/mounts && echo mounted; ls /dev"
    status, out, err = _run(imported, "priv", "--privileged", "--", "sh", "-c", script)
    assert status == 0, err
    lines = out.split()
    assert lines[0] == "mounted"
    if os.path.exists("/dev/loop0"):
        assert "loop0" in lines
    # /sys is writable; nothing masked (a masked path is a mount over it) or read-only
    script = "grep ' /sys ' /proc/mounts; grep -c -e ' /proc/timer_list ' -e ' /proc/sys ' /proc/mounts; true"
    status, out, err = _run(imported, "priv2", "--privileged", "--", "sh", "-c", script)
    assert status == 0, err
    assert " rw," in out.splitlines()[0]
    assert out.splitlines()[1] == "0"


def test_unprivileged_cannot_mount(imported: Daemon) -> None:
    script = "mount -t tmpfs none /tmp; echo rc=$?; ls /dev; grep -c -e ' /proc/timer_list ' -e ' /proc/sys ' /proc/mounts; true"
    status, out, err = _run(imported, "unpriv", "--", "sh", "-c", script)
    assert status == 0, err
    assert "rc=0" not in out
    assert "loop0" not in out.split()
    assert out.split()[-1] == "2"


def test_net_host_shares_the_hosts_interfaces(imported: Daemon) -> None:
    with open("/proc/net/dev") as fh:
        host = _interfaces(fh.read())
    status, out, err = _run(imported, "nethost", "--net-host", "--", "sh", "-c", "cat /proc/net/dev; echo ===; cat /etc/hosts; echo ===; hostname; echo $HOSTNAME")
    assert status == 0, err
    net_dev, hosts, names = out.split("===\n")
    assert _interfaces(net_dev) == host
    with open("/etc/hosts") as fh:
        assert hosts == fh.read()
    assert names.split() == [os.uname().nodename] * 2
    # without --net-host only a loopback of its own
    status, out, err = _run(imported, "netns", "--", "cat", "/proc/net/dev")
    assert status == 0, err
    assert _interfaces(out) == {"lo"}


def test_net_host_keeps_a_given_hostname(imported: Daemon) -> None:
    status, out, err = _run(imported, "nethostname", "--net-host", "--hostname", "box", "--", "sh", "-c", "hostname; echo $HOSTNAME")
    assert status == 0, err
    assert out.split() == ["box", "box"]


def test_user_by_name_from_the_image(imported: Daemon) -> None:
    status, out, err = _run(imported, "nobody", "--user", "nobody", "--", "id")
    assert status == 0, err
    assert out.startswith("uid=65534(nobody) gid=65534(nogroup)")
    status, out, err = _run(imported, "nobodyroot", "--user", "nobody:root", "--", "id", "-g")
    assert (status, out.strip()) == (0, "0"), err
    # a bare uid takes its gid from /etc/passwd
    status, out, err = _run(imported, "uid", "--user", "65534", "--", "id", "-g")
    assert (status, out.strip()) == (0, "65534"), err
    # the client's temporary mount is gone (it never was visible here)
    with open("/proc/self/mountinfo") as fh:
        assert "moorctl-rootfs-" not in fh.read()
    assert not [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("moorctl-rootfs-")]


def test_unknown_user_is_a_clear_error_and_leaves_nothing(imported: Daemon) -> None:
    status, out, err = _run(imported, "ghost", "--user", "ghost", "--", "id")
    assert status == 1
    assert "not_found" in err and "ghost" in err
    assert "ghost" not in imported.moorctl("containers", "ls").stdout
    assert "ghost" not in imported.moorctl("snapshots", "ls").stdout


def test_bind_mount_option(imported: Daemon) -> None:
    host_dir = tempfile.mkdtemp(prefix="md-bind-", dir="/tmp")
    try:
        with open(os.path.join(host_dir, "greeting"), "w") as fh:
            fh.write("hi from the host\n")
        status, out, err = _run(
            imported, "bind", "--mount", f"type=bind,src={host_dir},dst=/data,options=rbind:ro", "--", "sh", "-c", "cat /data/greeting; touch /data/x; echo rc=$?"
        )
        assert status == 0, err
        assert out.splitlines()[0] == "hi from the host"
        assert "rc=0" not in out
        assert os.listdir(host_dir) == ["greeting"]
    finally:
        os.unlink(os.path.join(host_dir, "greeting"))
        os.rmdir(host_dir)


def test_seccomp_default_profile_refuses_blocked_syscalls(imported: Daemon) -> None:
    # unshare(CLONE_NEWUSER) needs no capability, so only the filter stops it.
    status, out, err = _run(imported, "noseccomp", "--", "sh", "-c", "unshare -U true; echo rc=$?")
    assert (status, out) == (0, "rc=0\n"), err
    status, out, err = _run(imported, "seccomp", "--seccomp", "--", "sh", "-c", "unshare -U true; echo rc=$?; echo fine")
    assert status == 0, err
    assert "rc=0" not in out and out.endswith("fine\n")
    assert "Operation not permitted" in err


def test_seccomp_profile_from_a_file(imported: Daemon) -> None:
    from moord.oci.seccomp import default_profile
    from moord.oci.spec import DEFAULT_CAPABILITIES

    profile = default_profile(DEFAULT_CAPABILITIES)
    # also refuse mkdir(2): `mkdir` must now fail
    profile["syscalls"][0]["names"] = [n for n in profile["syscalls"][0]["names"] if n not in ("mkdir", "mkdirat")]
    fd, path = tempfile.mkstemp(prefix="md-seccomp-", suffix=".json", dir="/tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(profile, fh)
        status, out, err = _run(imported, "custom", "--seccomp", "--seccomp-profile", path, "--", "sh", "-c", "mkdir /tmp/d; echo rc=$?")
        assert status == 0, err
        assert out == "rc=1\n" and "Operation not permitted" in err
        result = imported.moorctl("run", "--rm", "--seccomp-profile", path, IMAGE, "custom2", "true")
        assert result.returncode == 2 and "--seccomp" in result.stderr
    finally:
        os.unlink(path)


@pytest.mark.parametrize("flag", ["--privileged", "--net-host"])
def test_options_leave_nothing_behind(imported: Daemon, flag: str) -> None:
    name = "tidy" + flag.strip("-").replace("-", "")
    status, _, err = _run(imported, name, flag, "--", "true")
    assert status == 0, err
    assert name not in imported.moorctl("containers", "ls").stdout
    assert name not in imported.moorctl("tasks", "ls").stdout


def test_which_users_need_the_image() -> None:
    assert not needs_image_users("")
    assert not needs_image_users("1000:1000")
    for user in ("nobody", "1000", "nobody:0", "0:wheel"):
        assert needs_image_users(user)


def test_snapshot_mounts_made_read_only() -> None:
    overlay = {"type": "overlay", "source": "overlay", "options": ["index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs"]}
    bind = {"type": "bind", "source": "/s/1/fs", "options": ["rbind", "rw"]}
    assert readonly_mounts([overlay, bind]) == [
        {"type": "overlay", "source": "overlay", "options": ["index=off", "lowerdir=/s/2/fs:/s/1/fs"]},
        {"type": "bind", "source": "/s/1/fs", "options": ["rbind", "ro"]},
    ]
    assert overlay["options"][1] == "workdir=/s/2/work"  # the caller's list is left alone


# -- moorctl's click-free `run` parser (client/cli.py) agrees with click (client/app.py) -----

FAST_RUN_LINES = [
    ["run", IMAGE, "c1"],
    ["run", "--rm", IMAGE, "c1", "true"],
    ["-c", "/x.toml", "--namespace", "ns1", "--timeout", "2.5", "run", "--rm", "-t", IMAGE, "c1", "sh", "-c", "exit 3"],
    ["--config=/x.toml", "-n", "ns2", "run", "-d", "--env", "A=1", "--env=B=2", "--mount", "type=bind,src=/a,dst=/b", IMAGE, "c1"],
    ["run", "--memory-limit", "1048576", "--cpus", "0.5", "--pids-limit=7", "--user", "1:2", "--cwd", "/tmp", IMAGE, "c1", "--", "ls", "-l"],
    ["run", "--", IMAGE, "c1", "--rm", "--help"],
    ["run", "--null-io", "--log-uri", "file:///tmp/l", "--fifo-dir", "/tmp/f", "--hostname", "h", "--read-only", IMAGE, "c1"],
    ["run", "--privileged", "--net-host", "--seccomp", "--runtime", "io.containerd.crun.v2", "--runc-binary", "crun", "--snapshotter", "native", IMAGE, "c1"],
    ["-a", "/ipc", "run", "--cwd", "/a", "--cwd", "/b", IMAGE, "c1", "x"],
]
# Lines the fast parser leaves to click (help, errors, rare spellings), never misreads.
CLICK_RUN_LINES = [
    ["run", "--help"],
    ["--help", "run", IMAGE, "c1"],
    ["run", IMAGE],
    ["run", "--bogus", IMAGE, "c1"],
    ["run", "-dt", IMAGE, "c1"],
    ["run", "--memory-limit", "-1", IMAGE, "c1"],
    ["run", "--cpus", "1e3", IMAGE, "c1"],
    ["run", "--rm=yes", IMAGE, "c1"],
    ["run", "--seccomp", "--seccomp-profile", "/p.json", IMAGE, "c1"],
    ["--timeout", "x", "run", IMAGE, "c1"],
    ["tasks", "ls"],
    ["run", "--cwd"],
]


def _click_parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, object], dict[str, object]]:
    from moord.client import app

    seen: dict[str, object] = {}

    def capture(ctx: object, params: dict[str, object]) -> None:
        seen.update(ctx=ctx, params=params)

    monkeypatch.setattr(app, "run_command", capture)
    app.main.main(argv, prog_name="moorctl", standalone_mode=False)
    ctx = seen["ctx"]
    root = {name: getattr(ctx, name) for name in ("config", "address", "namespace", "timeout")}
    return root, dict(seen["params"])  # type: ignore[call-overload]


@pytest.mark.parametrize("argv", FAST_RUN_LINES, ids=lambda argv: " ".join(argv))
def test_fast_run_parser_agrees_with_click(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from moord.client.cli import parse_fast_run

    monkeypatch.delenv("MOORD_ADDRESS", raising=False)
    monkeypatch.setenv("CONTAINERD_NAMESPACE", "from-env")
    fast = parse_fast_run(argv)
    assert fast is not None
    assert fast == _click_parse(argv, monkeypatch)


@pytest.mark.parametrize("argv", CLICK_RUN_LINES, ids=lambda argv: " ".join(argv))
def test_fast_run_parser_leaves_the_rest_to_click(argv: list[str]) -> None:
    from moord.client.cli import parse_fast_run

    assert parse_fast_run(argv) is None


def test_plain_run_imports_neither_click_nor_dataclasses() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "sys.argv = ['moorctl', '--address', '/nonexistent-moord', 'run', '--rm', 'img', 'c1', 'true']\n"
        "from moord.client.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('click', 'dataclasses', 'pydantic') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    assert "unavailable" in result.stderr
