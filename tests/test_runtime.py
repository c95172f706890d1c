"""The runtime subsystem with real runc, real shims and real containers.

The runtime actor (and the metadata actor holding the container records) run in-process
behind real Bridges on a temp ipc dir; a small XSUB/XPUB forwarder stands in for the
events process so exits can be observed. The rootfs is a directory of busybox applets,
handed to CreateTask as an rbind,ro mount. Every test undoes its shims, containers,
runc state and mounts, also when it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

import pytest
import zmq

from moord.actors.base import ServiceActor, handles
from moord.bus.bridge import Bridge
from moord.bus.client import Client, endpoint_path
from moord.bus.events import EventPublisher, EventSubscriber, events_in_path, events_out_path
from moord.config.model import Config
from moord.linux.mount import unmount_all
from moord.messages.errors import FailedPrecondition, InvalidArgument, NotFound
from moord.oci import spec as oci
from tests.daemon import reap_orphans
from moord.shims.shim import BUNDLES_DIR, bundle_path, runc_root

RUNC = shutil.which("runc")
BUSYBOX = "/bin/busybox"
NS = "default"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or RUNC is None or not os.path.exists(BUSYBOX), reason="needs root, runc and busybox"
)


# -- fixtures (the busybox `rootfs` comes from conftest) ----------------------------------






class Forwarder:
    """The events exchange in miniature: XSUB in, XPUB out, stoppable."""

    def __init__(self, ipc_dir: str) -> None:
        self.context = zmq.Context()
        self.inbound = self.context.socket(zmq.XSUB)
        self.outbound = self.context.socket(zmq.XPUB)
        self.inbound.bind(f"ipc://{events_in_path(ipc_dir)}")
        self.outbound.bind(f"ipc://{events_out_path(ipc_dir)}")
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbound, zmq.POLLIN)
        poller.register(self.outbound, zmq.POLLIN)
        while not self.stopping:
            for sock, _ in poller.poll(100):
                other = self.outbound if sock is self.inbound else self.inbound
                other.send_multipart(sock.recv_multipart())
        self.inbound.close(0)
        self.outbound.close(0)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.context.term()


class Hosted:
    """An actor behind a real Bridge in this process."""

    def __init__(self, name: str, ipc_dir: str, actor_class: type[ServiceActor], *args: Any) -> None:
        self.ref = actor_class.start(*args)
        self.bridge = Bridge(name, endpoint_path(ipc_dir, name))
        self.bridge.serve(self.ref, actor_class.kinds())
        self.bridge.start()

    def stop(self) -> None:
        self.bridge.stop()
        self.ref.stop(timeout=30)


class ContainerRecords(ServiceActor):
    """Stand-in record source for containers.create/get, used only while the real
    metadata actor cannot serve containers.get (see _metadata)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, str], dict[str, Any]] = {}

    @handles("containers.create")
    def create(self, request: Any, ctx: Any) -> dict[str, Any]:
        record = request.container.model_dump()
        self.records[(ctx.namespace, record["id"])] = record
        return {"container": record}

    @handles("containers.get")
    def get(self, request: Any, ctx: Any) -> dict[str, Any]:
        record = self.records.get((ctx.namespace, request.id))
        if record is None:
            raise NotFound(f"container {request.id} not found")
        return {"container": record}


def _metadata(config: Config, client: Client) -> "Hosted":
    """The real metadata actor if it serves containers.get, else the stand-in."""
    from moord.actors.metadata.actor import MetadataActor
    from moord.actors.metadata.schema import db_path_for

    hosted = Hosted("metadata", config.ipc_dir, MetadataActor, db_path_for(config.root), None)
    client.call("containers.create", {"container": {"id": "probe", "spec": b"{}"}})
    try:
        client.call("containers.get", {"id": "probe"})
        client.call("containers.delete", {"id": "probe"})
        return hosted
    except NotFound:
        hosted.stop()
        client.close()
        return Hosted("metadata", config.ipc_dir, ContainerRecords)


class Env:
    """One test's moord pieces: metadata, events, the runtime (in-process or a process)."""

    def __init__(self, rootfs: str) -> None:
        self.rootfs = rootfs
        self.base = tempfile.mkdtemp(prefix="md-", dir="/tmp")
        self.config = Config.model_validate(
            {
                "root": os.path.join(self.base, "root"),
                "state": os.path.join(self.base, "st"),
                "plugins": {"runtime": {"shim_debug": True}},
            }
        )
        os.makedirs(self.config.ipc_dir, mode=0o700)
        self.forwarder = Forwarder(self.config.ipc_dir)
        self.client = Client(self.config.ipc_dir, namespace=NS, timeout=30)
        self.events = EventPublisher(self.config.ipc_dir)
        self.metadata = _metadata(self.config, self.client)
        self.runtime: Hosted | None = None
        self.runtime_process: subprocess.Popen[bytes] | None = None
        self.fifo_dir = os.path.join(self.base, "fifo")
        os.makedirs(self.fifo_dir)
        self.ids: list[str] = []

    # runtime hosting

    def start_runtime(self) -> None:
        from moord.actors.runtime import RuntimeActor

        self.runtime = Hosted(
            "runtime", self.config.ipc_dir, RuntimeActor, self.config, Client(self.config.ipc_dir), self.events
        )

    def stop_runtime(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self.runtime = None

    def start_runtime_process(self) -> subprocess.Popen[bytes]:
        """The runtime subsystem in a process of its own, through its start(proc)."""
        code = (
            "import json, signal, sys\n"
            "from moord.config.model import Config\n"
            "from moord.bus.bridge import Bridge\n"
            "from moord.bus.client import Client, endpoint_path\n"
            "from moord.bus.events import EventPublisher\n"
            "from moord.supervisor.process import ProcessContext\n"
            "from moord.actors import runtime\n"
            "cfg = Config.model_validate(json.loads(sys.argv[1]))\n"
            "bridge = Bridge('runtime', endpoint_path(cfg.ipc_dir, 'runtime'))\n"
            "proc = ProcessContext('runtime', cfg, bridge, Client(cfg.ipc_dir), EventPublisher(cfg.ipc_dir))\n"
            "runtime.start(proc)\n"
            "bridge.start()\n"
            "print('ready', flush=True)\n"
            "signal.pause()\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, self.config.model_dump_json()], stdout=subprocess.PIPE
        )
        self.runtime_process = proc
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        return proc

    # containers

    def container(self, cid: str, args: list[str]) -> None:
        spec = oci.build_spec(NS, cid, {"config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}}, args=args, rootfs=self.rootfs)
        self.client.call("containers.create", {"container": {"id": cid, "spec": oci.dumps(spec)}})
        self.ids.append(cid)

    def rootfs_mounts(self) -> list[dict[str, Any]]:
        return [{"type": "bind", "source": self.rootfs, "options": ["rbind", "ro"]}]

    def create(self, cid: str, args: list[str], **stdio: str) -> int:
        self.container(cid, args)
        reply = self.client.call("tasks.create", {"container_id": cid, "rootfs": self.rootfs_mounts(), **stdio})
        return int(reply["pid"])

    def wait(self, cid: str, timeout: float = 30) -> dict[str, Any]:
        return self.client.call("tasks.wait", {"container_id": cid}, timeout=timeout)

    def get(self, cid: str) -> dict[str, Any]:
        return self.client.call("tasks.get", {"container_id": cid})["process"]

    def bundle(self, cid: str) -> str:
        return bundle_path(self.config.state, NS, cid)

    def shim_pid(self, cid: str) -> int:
        with open(os.path.join(self.bundle(cid), "shim.pid")) as fh:
            return int(fh.read())

    def runc_ids(self) -> list[str]:
        out = subprocess.run(
            [RUNC, "--root", runc_root(self.config.state, NS), "list", "-q"], capture_output=True, text=True
        )
        return out.stdout.split()

    def mounts_under_base(self) -> list[str]:
        with open("/proc/self/mountinfo") as fh:
            return [line.split()[4] for line in fh if line.split()[4].startswith(self.base + "/")]

    # teardown

    def cleanup(self) -> None:
        """Undo everything, whatever state the test left."""
        self._print_shim_logs()
        try:
            self.stop_runtime()
        finally:
            if self.runtime_process is not None and self.runtime_process.poll() is None:
                self.runtime_process.kill()
                self.runtime_process.wait(10)
            self._kill_shims()
            for cid in self.runc_ids() + self.ids:
                subprocess.run(
                    [RUNC, "--root", runc_root(self.config.state, NS), "delete", "-f", cid], capture_output=True
                )
            for point in sorted(self.mounts_under_base(), reverse=True):
                unmount_all(point, detach=True)
            self.metadata.stop()
            self.events.close()
            self.client.close()
            self.forwarder.stop()
            reap_orphans()
            assert not self.mounts_under_base()
            shutil.rmtree(self.base)

    def _print_shim_logs(self) -> None:
        """Shown by pytest when a test fails."""
        base = os.path.join(self.config.state, BUNDLES_DIR, NS)
        for cid in os.listdir(base) if os.path.isdir(base) else []:
            for name in ("shim.log", "log.json"):
                path = os.path.join(base, cid, name)
                if os.path.exists(path):
                    with open(path) as fh:
                        print(f"--- {cid}/{name}\n{fh.read()[-3000:]}")

    def _kill_shims(self) -> None:
        from moord.actors.runtime import shim_is_alive

        base = os.path.join(self.config.state, BUNDLES_DIR, NS)
        for cid in os.listdir(base) if os.path.isdir(base) else []:
            try:
                pid = self.shim_pid(cid)
            except (OSError, ValueError):
                continue
            if shim_is_alive(pid, NS, cid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def env(rootfs: str) -> Iterator[Env]:
    e = Env(rootfs)
    try:
        e.start_runtime()
        yield e
    finally:
        e.cleanup()


def _fifo(env: Env, name: str) -> tuple[str, int]:
    """A FIFO with its read end open (as a client does before tasks.create)."""
    path = os.path.join(env.fifo_dir, name)
    os.mkfifo(path, 0o600)
    return path, os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def _read_all(fd: int, timeout: float = 10) -> bytes:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        out += chunk
    return out


def _delete(env: Env, cid: str) -> dict[str, Any]:
    reply = env.client.call("tasks.delete", {"container_id": cid})
    assert not os.path.exists(env.bundle(cid))
    assert cid not in env.runc_ids()
    return reply


# -- tests ------------------------------------------------------------------------------


def test_echo_hello_to_a_fifo(env: Env) -> None:
    stdout, fd = _fifo(env, "hello-stdout")
    try:
        sub = EventSubscriber(env.config.ipc_dir, ["/tasks/"])
        time.sleep(0.2)  # the subscription must reach the forwarder first
        started = time.monotonic()
        pid = env.create("hello", ["echo", "hello"], stdout=stdout)
        created = time.monotonic()
        assert pid > 0
        assert env.get("hello")["status"] == "created"
        env.client.call("tasks.start", {"container_id": "hello"})
        reply = env.wait("hello")
        exited = time.monotonic()
        assert reply["exit_status"] == 0
        assert _read_all(fd) == b"hello\n"
        print(f"\ncreate {1000 * (created - started):.1f} ms, start->exit {1000 * (exited - created):.1f} ms")
        assert env.get("hello")["status"] == "stopped"
        topics = []
        while (event := sub.receive(timeout=2)) is not None:
            topics.append(event["topic"])
            if event["topic"] == "/tasks/exit":
                assert event["event"]["exit_status"] == 0 and event["event"]["container_id"] == "hello"
        assert topics[:3] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        sub.close()
        _delete(env, "hello")
        with pytest.raises(NotFound):
            env.client.call("tasks.delete", {"container_id": "hello"})
        assert not env.mounts_under_base()
    finally:
        os.close(fd)


def test_exit_codes_and_kill(env: Env) -> None:
    env.create("seven", ["sh", "-c", "exit 7"])
    env.client.call("tasks.start", {"container_id": "seven"})
    assert env.wait("seven")["exit_status"] == 7
    _delete(env, "seven")

    env.create("sleeper", ["sleep", "100"])
    env.client.call("tasks.start", {"container_id": "sleeper"})
    assert env.get("sleeper")["status"] == "running"
    with pytest.raises(FailedPrecondition):
        env.client.call("tasks.delete", {"container_id": "sleeper"})
    env.client.call("tasks.kill", {"container_id": "sleeper", "signal": 9})
    assert env.wait("sleeper")["exit_status"] == 137
    with pytest.raises(NotFound):
        env.client.call("tasks.kill", {"container_id": "sleeper", "signal": 9})
    _delete(env, "sleeper")
    assert not env.mounts_under_base()


def test_wait_before_start_blocks_and_many_waits_share_the_exit(env: Env) -> None:
    env.create("waited", ["sh", "-c", "sleep 0.3; exit 3"])
    results: list[Any] = []

    def wait() -> None:
        try:
            results.append(env.wait("waited")["exit_status"])
        except Exception as exc:  # reported through results
            results.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert results == []  # still CREATED: nobody may be answered
    assert env.get("waited")["status"] == "created"
    env.client.call("tasks.start", {"container_id": "waited"})
    for t in threads:
        t.join(30)
    assert results == [3] * 20
    # A wait after the exit answers at once.
    assert env.wait("waited", timeout=2)["exit_status"] == 3
    _delete(env, "waited")


def test_delete_of_a_created_task(env: Env) -> None:
    env.create("never", ["sleep", "100"])
    reply = _delete(env, "never")
    assert reply["exit_status"] == 137
    with pytest.raises(NotFound):
        env.get("never")


def test_errors(env: Env) -> None:
    with pytest.raises(NotFound):
        env.client.call("tasks.create", {"container_id": "nope", "rootfs": env.rootfs_mounts()})
    with pytest.raises(NotFound):
        env.wait("nope")
    env.container("badio", ["true"])
    with pytest.raises(InvalidArgument):
        env.client.call(
            "tasks.create", {"container_id": "badio", "rootfs": env.rootfs_mounts(), "stdout": "/etc/passwd"}
        )
    assert not os.path.exists(env.bundle("badio"))
    assert not env.mounts_under_base()
    env.container("missing", ["/bin/no-such-thing"])
    with pytest.raises(Exception) as info:
        env.client.call("tasks.create", {"container_id": "missing", "rootfs": env.rootfs_mounts()})
        env.client.call("tasks.start", {"container_id": "missing"})
    assert "no-such-thing" in str(info.value)
    assert not env.mounts_under_base()


def test_reattach_to_running_and_exited_containers(env: Env) -> None:
    env.create("survivor", ["sleep", "100"])
    env.client.call("tasks.start", {"container_id": "survivor"})
    env.create("quick", ["sh", "-c", "sleep 1; exit 5"])
    env.client.call("tasks.start", {"container_id": "quick"})
    shims = {cid: env.shim_pid(cid) for cid in ("survivor", "quick")}
    env.stop_runtime()
    time.sleep(1.5)  # "quick" exits while nobody listens
    for pid in shims.values():
        os.kill(pid, 0)  # the shims outlived the runtime
    env.start_runtime()
    assert env.get("quick")["status"] == "stopped"
    assert env.wait("quick")["exit_status"] == 5
    assert env.get("survivor")["status"] == "running"
    env.client.call("tasks.kill", {"container_id": "survivor", "signal": 9})
    assert env.wait("survivor")["exit_status"] == 137
    _delete(env, "survivor")
    _delete(env, "quick")


def test_reattach_after_kill_9_of_the_runtime_process(env: Env) -> None:
    env.stop_runtime()
    proc = env.start_runtime_process()
    env.create("lasting", ["sh", "-c", "sleep 4; exit 9"])  # outlives a restart on a loaded host
    env.client.call("tasks.start", {"container_id": "lasting"})
    zygotes = [p for p in _children(proc.pid)]
    proc.kill()
    proc.wait(10)
    time.sleep(0.3)
    assert all(not _alive(z) for z in zygotes)  # the zygote died with its runtime
    env.start_runtime()
    assert env.get("lasting")["status"] == "running"
    assert env.wait("lasting")["exit_status"] == 9
    _delete(env, "lasting")


def test_shim_killed_reports_255_and_cleans_up(env: Env) -> None:
    env.create("orphan", ["sleep", "100"])
    env.client.call("tasks.start", {"container_id": "orphan"})
    init_pid = env.get("orphan")["pid"]
    os.kill(env.shim_pid("orphan"), signal.SIGKILL)
    reply = env.wait("orphan")
    assert reply["exit_status"] == 255
    assert env.get("orphan")["status"] == "stopped"
    assert "orphan" not in env.runc_ids()
    assert not env.mounts_under_base()
    reap_orphans()
    assert not _alive(init_pid)
    _delete(env, "orphan")


def test_dead_shim_found_on_reattach(env: Env) -> None:
    env.create("ghost", ["sleep", "100"])
    env.client.call("tasks.start", {"container_id": "ghost"})
    env.stop_runtime()
    os.kill(env.shim_pid("ghost"), signal.SIGKILL)
    time.sleep(0.2)
    env.start_runtime()
    assert env.get("ghost")["status"] == "stopped"
    assert env.wait("ghost")["exit_status"] == 255
    assert "ghost" not in env.runc_ids()
    assert not env.mounts_under_base()
    _delete(env, "ghost")


def test_shim_footprint(env: Env) -> None:
    """Fork-to-ready time and memory of a shim (printed; the report quotes them)."""
    from moord.shims.shim import ShimConfig
    from moord.shims.zygote import Zygote

    # A state dir of its own: the runtime actor owns (and re-attaches to) env's bundles.
    state = os.path.join(env.base, "fp")
    pids: list[int] = []
    zygote = Zygote()
    zygote.start()
    try:
        times: list[float] = []
        for i in range(5):
            cfg = ShimConfig(NS, f"fp{i}", state, RUNC or "runc", env.config.ipc_dir)
            os.makedirs(cfg.bundle)
            result = zygote.spawn(cfg)
            times.append(result.ready_ms)
            pids.append(result.pid)
        time.sleep(0.3)
        memory = [_smaps_rollup(pid) for pid in pids]
        zygote.stop()  # as when the runtime is gone: fewer processes share the pages
        alone = [_smaps_rollup(pid) for pid in pids]
        print(
            f"\nshim fork-to-ready ms: {[round(t, 1) for t in times]}; memory kB (Pss, Rss, Private=USS) "
            f"with the zygote: {memory[0]}, without: {alone[0]}"
        )
        assert max(times) < 1000
    finally:
        zygote.stop()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- helpers ----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]


def _smaps_rollup(pid: int) -> tuple[int, int, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1])
    uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return values.get("Pss", 0), values.get("Rss", 0), uss
