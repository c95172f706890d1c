#!/usr/bin/env python3
"""Latency of `moorctl run --rm busybox /bin/true`, beside runc's floor and containerd.

Prints median and p90 over N runs of:
  moord       `moorctl run --rm` end to end (a fresh client process each time)
  daemon-side the same calls from a warm in-process client: prepare -> create -> task
              create/start -> exit reported -> delete (no interpreter start-up)
  client      `moorctl tree` (interpreter + imports + one round trip)
  runc floor  `runc run` of an equivalent bundle
  containerd  `ctr run --rm` against a containerd this script starts (when installed)

Run as root: python3 bench/run_latency.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
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


def moorctl_argv() -> list[str]:
    """The installed moorctl script beside this interpreter, else the module."""
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

    def end_to_end(i: int) -> None:
        result = subprocess.run([*ctl, "run", "--rm", IMAGE, f"lat{i + 1}", "/bin/true"], capture_output=True)
        if result.returncode != 0:
            raise SystemExit(f"moorctl run failed: {result.stderr.decode()}")

    client = Client(os.path.join(base, "state", "ipc"))

    def daemon_side(i: int) -> None:
        # The same calls as moorctl run --rm, minus the interpreter's start-up.
        opts = RunOptions(image=IMAGE, container_id=f"ds{i + 1}", args=["/bin/true"], fifo_root=os.path.join(base, "state", "fifo"))
        status = run(client, opts)
        if status != 0:
            raise SystemExit(f"in-process run exited {status}")

    def client_startup(i: int) -> None:
        subprocess.run([*ctl, "tree"], check=True, capture_output=True)

    return {
        "moord run --rm": timed(runs, end_to_end),
        "  daemon-side": timed(runs, daemon_side),
        "  client (moorctl tree)": timed(runs, client_startup),
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


def bench_containerd(base: str, runs: int, layout_tar: str) -> list[float] | None:
    if not shutil.which("containerd") or not shutil.which("ctr"):
        return None
    cdir = os.path.join(base, "containerd")
    os.makedirs(cdir)
    sock = os.path.join(cdir, "containerd.sock")
    config = os.path.join(cdir, "config.toml")
    with open(config, "w") as fh:
        fh.write(f'version = 2\nroot = "{cdir}/root"\nstate = "{cdir}/state"\n[grpc]\naddress = "{sock}"\n')
        fh.write('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n')
    proc = subprocess.Popen(["containerd", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if subprocess.run(["ctr", "-a", sock, "version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run(["ctr", "-a", sock, "images", "import", layout_tar], check=True, capture_output=True)

        def once(i: int) -> None:
            subprocess.run(["ctr", "-a", sock, "run", "--rm", IMAGE, f"cd{i + 1}", "/bin/true"], check=True, capture_output=True)

        return timed(runs, once)
    finally:
        subprocess.run(["ctr", "-a", sock, "tasks", "ls"], capture_output=True)
        proc.terminate()
        proc.wait(30)
        subprocess.run(["pkill", "-f", f"containerd-shim-runc-v2.*{cdir}"], capture_output=True)
        subprocess.run(["sh", "-c", f"grep -o ' {cdir}[^ ]*' /proc/self/mounts | xargs -r -n1 umount -l"], capture_output=True)


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
        subprocess.run(["pkill", "-f", base], capture_output=True)
        subprocess.run(["sh", "-c", f"grep -o ' {base}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l"], capture_output=True)
        for root in (os.path.join(base, "runc"),):
            if os.path.isdir(root):
                for cid in subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True, text=True).stdout.split():
                    subprocess.run(["runc", "--root", root, "delete", "-f", cid], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
