"""The lean shim: no pydantic in the zygote or a shim, a request table that matches the
contract (messages/shim.py), and the cgroup v2 OOM watch (inotify on a keyed events file).

No timings here (CPU is shared): bench/shims.py measures memory and latency.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import pytest

from moord.messages import envelope as codec
from moord.messages.errors import DeadlineExceeded, InvalidArgument, Unimplemented
from moord.shims import cgroups, wire

UNIFIED = os.path.join(cgroups.CGROUP_ROOT, "unified")


# -- what the shim loads ---------------------------------------------------------------------


def test_zygote_and_shim_modules_never_import_pydantic() -> None:
    """Everything the zygote preloads (and so every shim) stays free of pydantic."""
    code = (
        "import importlib, sys\n"
        "import moord.shims.main as m\n"
        "import moord.shims.zygote, moord.shims.shim, moord.shims.wire, moord.shims.cgroups\n"
        "for name in m.PRELOAD: importlib.import_module(name)\n"
        "heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('pydantic', 'pydantic_core', 'sqlalchemy', 'pykka', 'click'))\n"
        "print(' '.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_spawned_shim_maps_no_pydantic_and_answers_state() -> None:
    """Real shims forked from a real zygote (the pre-forked one, then a fresh one): they
    answer, and pydantic_core is not even mapped into them."""
    from moord.actors.runtime import ShimConnection
    from moord.shims.shim import ShimConfig
    from moord.shims.zygote import Zygote

    base = tempfile.mkdtemp(prefix="md-sm-", dir="/tmp")
    zygote = Zygote()
    pids: list[int] = []
    try:
        zygote.start()
        for i in range(3):
            config = ShimConfig("default", f"lean{i}", base, "runc", os.path.join(base, "ipc"))
            os.makedirs(config.bundle)
            pids.append(zygote.spawn(config).pid)
            connection = ShimConnection(config.socket_path, "default")
            try:
                state = connection.call("shim.state", {}, 5.0)
            finally:
                connection.close()
            assert state["process"]["status"] == "unknown" and state["execs"] == []
            with open(f"/proc/{pids[-1]}/maps") as fh:
                assert "pydantic" not in fh.read()
            with open(f"/proc/{pids[-1]}/cmdline", "rb") as fh:
                assert fh.read().startswith(config.title.encode())
        with pytest.raises(InvalidArgument):
            zygote.spawn(ShimConfig("default", "nobundle", base, "runc", os.path.join(base, "ipc")))
    finally:
        zygote.stop()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)


# -- the request table against the contract ---------------------------------------------------


def test_wire_table_matches_the_shim_models() -> None:
    import moord.messages.shim  # noqa: F401  (registers the shim.* kinds)
    from moord.messages.base import _IDENTIFIER_RE, IDENTIFIER_MAX_LENGTH, KINDS

    kinds = {kind for kind in KINDS if kind.startswith("shim.")}
    assert kinds == set(wire.REQUESTS)
    for kind, fields in wire.REQUESTS.items():
        model = KINDS[kind].request
        assert set(fields) == set(model.model_fields), kind
        for name, (_, default) in fields.items():
            info = model.model_fields[name]
            if info.is_required():
                assert default is wire._REQUIRED or default is None, (kind, name)
            else:
                assert default == info.get_default(call_default_factory=True), (kind, name)
    assert wire.IDENTIFIER_RE.pattern == _IDENTIFIER_RE.pattern
    assert wire.IDENTIFIER_MAX_LENGTH == IDENTIFIER_MAX_LENGTH


def _frame(kind: str, payload: Any, **envelope: Any) -> bytes:
    data = {"v": codec.PROTOCOL_VERSION, "id": "r1", "kind": kind, "ns": "default", "deadline": 0.0, "lease": "", "payload": payload}
    data.update(envelope)
    return codec.pack(data)


def test_wire_decodes_like_the_models() -> None:
    """What the pydantic models accept decodes the same; what they refuse is refused."""
    from moord.messages.base import KINDS

    served = set(wire.REQUESTS)
    good = [
        ("shim.create", {"rootfs": [{"type": "overlay", "source": "overlay", "options": ["lowerdir=/a"]}], "stdout": "/f"}),
        ("shim.kill", {"exec_id": "e1", "signal": 9, "all": True}),
        ("shim.exec", {"exec_id": "e1", "spec": {"args": ["true"]}, "terminal": True}),
        ("shim.resize_pty", {"width": 80, "height": 24}),
        ("shim.update", {"resources": {"memory": {"limit": 1}}}),
        ("shim.state", {}),
        ("shim.wait", None),
    ]
    for kind, payload in good:
        request = wire.decode(_frame(kind, payload), served)
        expected = KINDS[kind].request.model_validate(payload or {}).model_dump()
        got = {k: v for k, v in vars(request).items() if k not in ("kind", "request_id")}
        assert got == expected, kind
    bad = [
        ("shim.kill", {"signal": 0}),
        ("shim.kill", {"exec_id": "../x"}),
        ("shim.start", {"nope": 1}),
        ("shim.exec", {"exec_id": "e"}),
        ("shim.create", {"rootfs": [{"source": "x"}]}),
        ("shim.create", {"rootfs": [{"type": "x", "source": "y", "extra": 1}]}),
        ("shim.create", {"stdin": "x" * 5000}),
        ("shim.resize_pty", {"width": 0, "height": 1}),
        ("shim.update", {"resources": []}),
        ("shim.state", []),
    ]
    for kind, payload in bad:
        with pytest.raises(InvalidArgument):
            wire.decode(_frame(kind, payload), served)
        with pytest.raises(Exception):
            KINDS[kind].request.model_validate(payload)
    # Stricter than pydantic's lax mode, which the runtime never relies on.
    for kind, payload in [("shim.kill", {"signal": True}), ("shim.exec", {"exec_id": "", "spec": {}})]:
        with pytest.raises(InvalidArgument):
            wire.decode(_frame(kind, payload), served)
    with pytest.raises(Unimplemented):
        wire.decode(_frame("tasks.create", {}), served)
    with pytest.raises(DeadlineExceeded) as caught:
        wire.decode(_frame("shim.state", {}, deadline=time.time() - 5), served)
    assert wire.request_id_of(caught.value) == "r1"
    for junk in (b"\xc1", codec.pack([1, 2]), _frame("shim.state", {}, v=99), _frame("shim.state", {}, id="")):
        with pytest.raises(InvalidArgument):
            wire.decode(junk, served)


# -- cgroup v2 OOM watch: inotify on a keyed events file ---------------------------------------


@pytest.fixture
def v2_cgroup() -> Iterator[str]:
    if os.geteuid() != 0 or not os.path.ismount(UNIFIED) and not cgroups.unified():
        pytest.skip("needs root and a cgroup v2 tree")
    root = cgroups.CGROUP_ROOT if cgroups.unified() else UNIFIED
    path = os.path.join(root, f"md-test-{secrets.token_hex(4)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        procs = os.path.join(path, "cgroup.procs")
        for _ in range(50):
            try:
                with open(procs) as fh:
                    left = fh.read().split()
                for pid in left:
                    with open(os.path.join(root, "cgroup.procs"), "w") as fh:
                        fh.write(pid)
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_counter_watch_wakes_on_a_real_cgroup_v2_event(v2_cgroup: str) -> None:
    """memory.events needs the memory controller on v2 (not on this hybrid host), so the
    same mechanism is checked on cgroup.events' `populated`, which the kernel notifies alike."""
    watch = cgroups.CounterWatch(os.path.join(v2_cgroup, "cgroup.events"), "populated")
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert watch.seen == 0 and not watch.fired()
        with open(os.path.join(v2_cgroup, "cgroup.procs"), "w") as fh:
            fh.write(str(child.pid))
        assert _readable(watch.fd, 5.0)
        assert watch.fired()  # 0 -> 1
        assert not watch.fired()  # nothing new
        child.kill()
        child.wait()
        assert _readable(watch.fd, 5.0)
        assert not watch.fired()  # 1 -> 0 is no growth
        assert not watch.gone()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.rmdir(v2_cgroup)
        try:
            assert not watch.fired() and watch.gone()
        finally:
            watch.close()
            os.mkdir(v2_cgroup)  # for the fixture's own removal


def test_watch_oom_picks_the_memory_hierarchy() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with pytest.raises(OSError):
        cgroups.watch_oom(f"/md-missing-{secrets.token_hex(4)}")
    with pytest.raises(ValueError):
        cgroups.watch_oom("/../etc")
    if cgroups.unified() or not os.path.isdir(os.path.join(cgroups.CGROUP_ROOT, "memory")):
        pytest.skip("v1 memory controller needed for the rest")
    name = f"/md-test-{secrets.token_hex(4)}"
    path = cgroups.controller_dir("memory", name)
    os.mkdir(path)
    try:
        watch = cgroups.watch_oom(name)
        try:
            assert isinstance(watch, cgroups.OomWatch) and not watch.fired()
        finally:
            watch.close()
    finally:
        os.rmdir(path)
