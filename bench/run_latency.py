#!/usr/bin/env python3
"""Latency of `moorctl run --rm busybox /bin/true`, beside runc's floor and containerd.

Prints median and p90 over N runs of:
  moord       `moorctl run --rm` end to end (a fresh client process each time)
  daemon-side the same calls from a warm in-process client: prepare -> create -> task
              create/start -> exit reported -> delete (no interpreter start-up)
  client      `moorctl tree` (interpreter + imports + one round trip), `moorctl --help`
              (start-up alone), and the CPU (user+sys) of the moorctl process of each
              `run --rm` (what 4 parallel run loops on 2 cores are bound by)
  runc floor  `runc run` of an equivalent bundle
  containerd  `ctr run --rm` against a containerd this script starts (when installed)

Run as root: python3 bench/run_latency.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

IMAGE = "docker.io/library/busybox:latest"


def stats(samples: list[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return statistics.median(ordered) * 1000, p90 * 1000


def timed(runs: int, action: Callable[[int], None]) -> list[float]:
    """Wall time of each of `runs` calls (after one warm-up)."""
    action(-1)
    samples = []
    for i in range(runs):
        started = time.perf_counter()
        action(i)
        samples.append(time.perf_counter() - started)
    return samples


# The packages a `moorctl run` imports.
MOORD_PACKAGES = (
    "moord", "moord.client", "moord.bus", "moord.messages", "moord.config", "moord.oci", "moord.linux",
    "moord.actors", "moord.actors.metadata", "moord.actors.snapshotter", "moord.actors.registry",
    "moord.supervisor", "moord.shims",
)


def ensure_bytecode() -> None:
    """Write the .pyc files of moord's modules (moorctl's, the daemon's, the shims'), as any
    installed package has them (pip compiles at install). An editable checkout run with
    PYTHONDONTWRITEBYTECODE=1 (set in some environments) would otherwise compile every
    module on each start: about a third more CPU per `run --rm`, slower daemon and shim
    starts, none of which a user's installation pays."""
    import compileall
    import importlib.util

    for package in MOORD_PACKAGES:
        spec = importlib.util.find_spec(package)
        for directory in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(directory, maxlevels=0, quiet=2)


def moorctl_argv() -> list[str]:
    """The installed moorctl script beside this interpreter, else the module (its bytecode written)."""
    ensure_bytecode()
    script = os.path.join(os.path.dirname(sys.executable), "moorctl")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "moord.client"]


def start_moord(base: str) -> subprocess.Popen[bytes]:
    config = os.path.join(base, "moord.toml")
    with open(config, "w") as fh:
        fh.write(f'root = "{base}/root"\nstate = "{base}/state"\n[debug]\nlevel = "warn"\n')
    proc = subprocess.Popen([sys.executable, "-m", "moord.supervisor.main", "--config", config], stderr=subprocess.DEVNULL)
    for _ in range(600):
        if subprocess.run([*moorctl_argv(), "-c", config, "--timeout", "1", "tree"], capture_output=True).returncode == 0:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moord did not start")


def bench_moord(base: str, runs: int, layout: str) -> dict[str, list[float]]:
    from moord.bus.client import Client
    from moord.client.run import RunOptions, run

    config = os.path.join(base, "moord.toml")
    ctl = [*moorctl_argv(), "-c", config]
    subprocess.run([*ctl, "images", "import", layout], check=True, capture_output=True)

    client_cpu: list[float] = []

    def end_to_end(i: int) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run([*ctl, "run", "--rm", IMAGE, f"lat{i + 1}", "/bin/true"], capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"moorctl run failed: {result.stderr.decode()}")
        if i >= 0:  # not the warm-up
            client_cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)

    client = Client(os.path.join(base, "state", "ipc"))

    def daemon_side(i: int) -> None:
        # The same calls as moorctl run --rm, minus the interpreter's start-up.
        opts = RunOptions(image=IMAGE, container_id=f"ds{i + 1}", args=["/bin/true"], fifo_root=os.path.join(base, "state", "fifo"))
        status = run(client, opts)
        if status != 0:
            raise SystemExit(f"in-process run exited {status}")

    def client_startup(i: int) -> None:
        subprocess.run([*ctl, "tree"], check=True, capture_output=True)

    def client_help(i: int) -> None:
        subprocess.run([*ctl, "--help"], check=True, capture_output=True)

    end_to_end_samples = timed(runs, end_to_end)
    return {
        "moord run --rm": end_to_end_samples,
        "  daemon-side": timed(runs, daemon_side),
        "  client (moorctl tree)": timed(runs, client_startup),
        "  client (moorctl --help)": timed(runs, client_help),
        "  client CPU per run --rm": client_cpu,
    }


def bench_runc(base: str, runs: int, layout: str) -> list[float]:
    from moord.oci import spec as oci_spec
    from moord.oci.busybox import build_busybox_rootfs

    bundle = os.path.join(base, "bundle")
    os.makedirs(bundle)
    build_busybox_rootfs(os.path.join(bundle, "rootfs"))
    spec = oci_spec.build_spec("bench", "floor", {"config": {"Env": ["PATH=/bin"]}}, args=["/bin/true"])
    spec["root"] = {"path": "rootfs", "readonly": True}
    with open(os.path.join(bundle, "config.json"), "w") as fh:
        json.dump(spec, fh)
    root = os.path.join(base, "runc")

    def once(i: int) -> None:
        subprocess.run(["runc", "--root", root, "run", "-b", bundle, f"floor{i + 1}"], check=True, capture_output=True)

    return timed(runs, once)


class Containerd:
    """A containerd of our own on a temporary root/state/socket, its runc root and shims included.

    Use as a context manager: on the way out every task is killed and removed, containerd
    is stopped, shims that outlive it are killed by pid, runc state is deleted, mounts
    under its directory are unmounted and the directory is removed, even on failure.
    """

    def __init__(self, base: str, cgroup: str = "") -> None:
        self.dir = os.path.join(base, "containerd")
        self.sock = os.path.join(self.dir, "containerd.sock")
        self.runc_root = os.path.join(self.dir, "runc")
        self.cgroup = cgroup  # a cpuacct cgroup dir to start containerd in ("" for none)
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether containerd and ctr are installed."""
        return bool(shutil.which("containerd") and shutil.which("ctr"))

    def ctr(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run ctr against our containerd."""
        return subprocess.run(["ctr", "-a", self.sock, *args], capture_output=True, check=check)

    def __enter__(self) -> "Containerd":
        os.makedirs(self.dir)
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as fh:
            # Top-level keys first: anything after a [table] header belongs to that table.
            fh.write(
                f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", '
                '"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", '
                '"io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", '
                '"io.containerd.internal.v1.tracing"]\n'
                f'[grpc]\naddress = "{self.sock}"\n[ttrpc]\naddress = "{self.sock}.ttrpc"\n'
                f'[plugins."io.containerd.internal.v1.opt"]\npath = "{self.dir}/opt"\n'
            )

        def join_cgroup() -> None:
            if self.cgroup:
                with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as fh:
                    fh.write(str(os.getpid()))

        self.proc = subprocess.Popen(
            ["containerd", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=join_cgroup
        )
        for _ in range(300):
            if self.ctr("version").returncode == 0:
                return self
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise SystemExit("containerd did not start")

    def run_args(self, *args: str) -> list[str]:
        """`ctr run` with our runc root."""
        return ["ctr", "-a", self.sock, "run", "--runc-root", self.runc_root, *args]

    def shim_pids(self) -> list[int]:
        """Pids of containerd-shim-runc-v2 processes serving our containerd."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and self.sock.encode() in argv:
                found.append(int(name))
        return found

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                listed = self.ctr("tasks", "ls", "-q").stdout.decode().split()
                for cid in listed:
                    self.ctr("tasks", "kill", "-s", "KILL", cid)
                for cid in listed:
                    for _ in range(50):
                        if self.ctr("tasks", "rm", "-f", cid).returncode == 0:
                            break
                        time.sleep(0.1)
                for cid in self.ctr("containers", "ls", "-q").stdout.decode().split():
                    self.ctr("containers", "rm", cid)
        finally:
            shims = self.shim_pids()
            if self.proc is not None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            for pid in shims:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            for ns_root in _subdirs(self.runc_root):
                for cid in subprocess.run(["runc", "--root", ns_root, "list", "-q"], capture_output=True, text=True).stdout.split():
                    subprocess.run(["runc", "--root", ns_root, "delete", "-f", cid], capture_output=True)
            unmount_under(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)


def _subdirs(path: str) -> list[str]:
    return [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else []


def unmount_under(base: str) -> None:
    """Lazily unmount everything mounted below `base`, deepest first."""
    with open("/proc/self/mountinfo") as fh:
        targets = [line.split()[4] for line in fh]
    for target in sorted({t for t in targets if t.startswith(base.rstrip("/") + "/")}, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def bench_containerd(base: str, runs: int, layout_tar: str) -> list[float] | None:
    if not Containerd.available():
        return None
    with Containerd(base) as cd:
        cd.ctr("images", "import", layout_tar, check=True)

        def once(i: int) -> None:
            subprocess.run(cd.run_args("--rm", IMAGE, f"cd{i + 1}", "/bin/true"), check=True, capture_output=True)

        return timed(runs, once)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    from moord.oci.busybox import build_busybox_layout

    base = tempfile.mkdtemp(prefix="moord-bench-", dir="/tmp")
    moord = None
    try:
        layout = os.path.join(base, "busybox")
        build_busybox_layout(layout, ref=IMAGE)
        layout_tar = os.path.join(base, "busybox.tar")
        build_busybox_layout(layout_tar, ref=IMAGE, tar=True)
        moord = start_moord(base)
        rows = bench_moord(base, args.runs, layout)
        rows["runc run (floor)"] = bench_runc(base, args.runs, layout)
        containerd = bench_containerd(base, args.runs, layout_tar)
        if containerd is not None:
            rows["containerd ctr run --rm"] = containerd
        floor = stats(rows["runc run (floor)"])[0]
        print(f"{'':28} {'median ms':>10} {'p90 ms':>9} {'x floor':>8}   ({args.runs} runs)")
        for name, samples in rows.items():
            median, p90 = stats(samples)
            print(f"{name:28} {median:10.1f} {p90:9.1f} {median / floor:8.2f}")
        if containerd is not None:
            print(f"moord / containerd end to end: {stats(rows['moord run --rm'])[0] / stats(containerd)[0]:.2f}")
    finally:
        if moord is not None:
            moord.terminate()
            moord.wait(60)
        unmount_under(base)
        for root in (os.path.join(base, "runc"),):
            if os.path.isdir(root):
                for cid in subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True, text=True).stdout.split():
                    subprocess.run(["runc", "--root", root, "delete", "-f", cid], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
