#!/usr/bin/env python3
"""Memory per shim with 20 idle containers, and `run --rm` throughput of 4 parallel loops.

Prints, beside containerd-shim-runc-v2's figures measured on these machines (issue 5):
  per shim   median PSS, USS (Private_Clean + Private_Dirty) from /proc/PID/smaps_rollup
             and RSS (VmRSS from /proc/PID/status) over the 20 shims (pids from each
             bundle's shim.pid), plus the shim zygote they are forked from
  throughput containers/s of 4 parallel loops of `moorctl run --rm busybox ID /bin/true`
             for 20 s (each run a fresh moorctl process, as `ctr run --rm` would be)

It starts its own moord on a temporary root (bench/run_latency.py's start_moord) and
removes everything it made: containers, shims, moord, mounts, files.

Run as root from the repository root: python3 bench/shims.py [--containers 20] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from run_latency import IMAGE, moorctl_argv, start_moord

BUNDLES = os.path.join("io.containerd.runtime.v2.task", "default")
# containerd-shim-runc-v2 per shim, measured here (issue 5), in MiB.
CONTAINERD_SHIM = {"PSS": 4.0, "USS": 2.4, "RSS": 12.8}
CONTAINERD_THROUGHPUT = 7.0  # containers/s with 4 loops


def memory_kib(pid: int) -> dict[str, int]:
    """PSS and USS from smaps_rollup, RSS from status, in KiB."""
    rollup: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                rollup[parts[0].rstrip(":")] = int(parts[1])
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"PSS": rollup["Pss"], "USS": rollup["Private_Clean"] + rollup["Private_Dirty"], "RSS": rss}


def shim_pids(state: str) -> dict[str, int]:
    """container id -> shim pid, from each bundle's shim.pid."""
    base = os.path.join(state, BUNDLES)
    found = {}
    for cid in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, cid, "shim.pid")) as fh:
                found[cid] = int(fh.read().strip())
        except (OSError, ValueError):
            continue
    return found


def zygote_pid(moord_pid: int) -> int:
    """The shim zygote among moord's descendants (0 if there is none)."""
    import psutil

    for proc in psutil.Process(moord_pid).children(recursive=True):
        try:
            if "zygote" in " ".join(proc.cmdline()):
                return proc.pid
        except psutil.Error:
            continue
    return 0


def throughput(ctl: list[str], loops: int, seconds: float) -> tuple[int, int, float]:
    """(runs done, runs failed, elapsed s) of `loops` parallel run --rm loops for `seconds`."""
    done = [0] * loops
    failed = [0] * loops
    deadline = time.monotonic() + seconds

    def loop(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            result = subprocess.run([*ctl, "run", "--rm", IMAGE, f"tp{index}-{n}", "/bin/true"], capture_output=True)
            if result.returncode == 0:
                done[index] += 1
            else:
                failed[index] += 1
                sys.stderr.write(result.stderr.decode(errors="replace")[-300:])

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(loops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done), sum(failed), time.monotonic() - started


def cleanup(base: str, ctl: list[str], ids: list[str], moord: subprocess.Popen[bytes] | None) -> None:
    """Kill and remove the idle containers, stop moord, then remove whatever is left, by pid."""
    state = os.path.join(base, "state")
    shims = shim_pids(state)
    if moord is not None and moord.poll() is None:
        for cid in ids:
            subprocess.run([*ctl, "kill", "-s", "KILL", cid], capture_output=True)
        for cid in ids:
            for _ in range(50):
                if subprocess.run([*ctl, "tasks", "rm", cid], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            subprocess.run([*ctl, "containers", "rm", cid], capture_output=True)
        moord.terminate()
        try:
            moord.wait(60)
        except subprocess.TimeoutExpired:
            moord.kill()
            moord.wait(10)
    for pid in shims.values():  # shims outlive moord by design: end any still there
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    runc_root = os.path.join(state, "runc", "default")
    if os.path.isdir(runc_root) and shutil.which("runc"):
        for cid in subprocess.run(["runc", "--root", runc_root, "list", "-q"], capture_output=True, text=True).stdout.split():
            subprocess.run(["runc", "--root", runc_root, "delete", "-f", cid], capture_output=True)
    with open("/proc/self/mountinfo") as fh:
        targets = [line.split()[4] for line in fh]
    for target in sorted({t for t in targets if t.startswith(base + "/")}, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loops", type=int, default=4)
    args = parser.parse_args()
    from moord.oci.busybox import build_busybox_layout

    base = tempfile.mkdtemp(prefix="moord-bench-", dir="/tmp")
    ctl = [*moorctl_argv(), "-c", os.path.join(base, "moord.toml")]
    moord = None
    ids = [f"idle{i + 1}" for i in range(args.containers)]
    try:
        layout = os.path.join(base, "busybox")
        build_busybox_layout(layout, ref=IMAGE)
        moord = start_moord(base)
        subprocess.run([*ctl, "images", "import", layout], check=True, capture_output=True)
        for cid in ids:
            subprocess.run([*ctl, "run", "-d", IMAGE, cid, "sleep", "600"], check=True, capture_output=True)
        time.sleep(1)  # let the shims settle after their first requests
        shims = shim_pids(os.path.join(base, "state"))
        samples = [memory_kib(shims[cid]) for cid in ids]
        print(f"per shim, {len(samples)} idle containers (median)   moord     containerd-shim-runc-v2")
        for key in ("PSS", "USS", "RSS"):
            median = statistics.median(s[key] for s in samples) / 1024
            print(f"  {key}  {median:36.1f} MiB  {CONTAINERD_SHIM[key]:10.1f} MiB")
        total_pss = sum(s["PSS"] for s in samples) / 1024
        print(f"  PSS of all {len(samples)} shims: {total_pss:.1f} MiB")
        zygote = zygote_pid(moord.pid)
        if zygote:
            z = memory_kib(zygote)
            print(f"  zygote (shared parent, once per node): PSS {z['PSS'] / 1024:.1f} MiB, "
                  f"USS {z['USS'] / 1024:.1f} MiB, RSS {z['RSS'] / 1024:.1f} MiB")

        done, failed, elapsed = throughput(ctl, args.loops, args.seconds)
        rate = done / elapsed
        print(f"throughput, {args.loops} parallel `run --rm` loops for {args.seconds:.0f} s: "
              f"{done} runs ({failed} failed) in {elapsed:.1f} s = {rate:.2f} containers/s "
              f"(containerd ~{CONTAINERD_THROUGHPUT:.0f}/s)")
    finally:
        cleanup(base, ctl, ids, moord)


if __name__ == "__main__":
    main()
