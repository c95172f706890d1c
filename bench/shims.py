#!/usr/bin/env python3
"""Shim memory, daemon-side start latency and `run --rm` throughput, beside containerd.

Prints a table of figures next to their targets (issue 5):
  per shim   median PSS, USS (Private_Clean + Private_Dirty) from /proc/PID/smaps_rollup
             and RSS (VmRSS) over 20 idle `sleep` containers; the same for
             containerd-shim-runc-v2 when containerd is installed (measured live)
  latency    daemon-side start: tasks.create + tasks.start from a warm in-process client
             (the runtime receiving tasks.create until the task runs, plus start), beside
             runc's floor: `runc create` + `runc start` of the same spec on the same
             kind of rootfs (an overlay snapshot); A/B interleaved, medians
  throughput containers/s of 4 parallel loops of `run --rm busybox ID /bin/true`, each
             run a fresh client process (moorctl, or ctr against containerd), and the
             daemon-side CPU per container: cpuacct usage of a cgroup holding the daemon
             and everything it starts (shims, runc) but not the containers' processes

It starts its own moord (and containerd: temporary root, state, socket, runc root) and
removes everything it made, also on failure: tasks, containers, shims, daemons, mounts,
cgroups, files.

Run as root from the repository root: python3 bench/shims.py [--containers 20] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from run_latency import IMAGE, Containerd, moorctl_argv, unmount_under

BUNDLES = os.path.join("io.containerd.runtime.v2.task", "default")
CPUACCT = "/sys/fs/cgroup/cpuacct"
# containerd-shim-runc-v2 per shim measured here (issue 5), in MiB, for when containerd is absent.
CONTAINERD_SHIM = {"PSS": 4.0, "USS": 2.4, "RSS": 12.8}
CONTAINERD_THROUGHPUT = 7.0  # containers/s with 4 loops (issue 5)
LATENCY_TARGET = 1.5  # daemon-side start within 1.5x runc create+start


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


def private_by_mapping(pid: int) -> list[tuple[str, int]]:
    """Where a process's private memory lies (KiB per mapping name, largest first)."""
    totals: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping header: range perms offset dev inode [path]
                name = os.path.basename(parts[5]) if len(parts) > 5 else "[anon]"
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                totals[name] = totals.get(name, 0) + int(parts[1])
    return sorted(totals.items(), key=lambda item: -item[1])


def median_mib(samples: list[dict[str, int]]) -> dict[str, float]:
    """Median of each figure, in MiB."""
    return {key: statistics.median(s[key] for s in samples) / 1024 for key in ("PSS", "USS", "RSS")}


def shim_pids(state: str) -> dict[str, int]:
    """container id -> moord shim pid, from each bundle's shim.pid."""
    base = os.path.join(state, BUNDLES)
    found = {}
    for cid in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, cid, "shim.pid")) as fh:
                found[cid] = int(fh.read().strip())
        except (OSError, ValueError):
            continue
    return found


def zygote_pid(moord_pid: int, title: str = "moord-shim: zygote") -> int:
    """The shim zygote (or its forker, by title) among moord's descendants (0 if none)."""
    import psutil

    for proc in psutil.Process(moord_pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).strip() == title:
                return proc.pid
        except psutil.Error:
            continue
    return 0


# -- a cpuacct cgroup for a daemon and everything it starts ------------------------------


class CpuCgroup:
    """A cpuacct v1 cgroup: daemon-side CPU (runc and shims included; container processes
    move to their own cgroups). Removed on close once empty."""

    def __init__(self, name: str) -> None:
        self.path = os.path.join(CPUACCT, name) if os.path.isdir(CPUACCT) else ""
        if self.path:
            os.makedirs(self.path, exist_ok=True)

    def usage_s(self) -> float:
        """CPU seconds used so far (0 without cpuacct)."""
        if not self.path:
            return 0.0
        with open(os.path.join(self.path, "cpuacct.usage")) as fh:
            return int(fh.read()) / 1e9

    def close(self) -> None:
        """Move stragglers out and remove the cgroup."""
        if not self.path or not os.path.isdir(self.path):
            return
        for _ in range(50):
            try:
                with open(os.path.join(self.path, "cgroup.procs")) as fh:
                    pids = fh.read().split()
                for pid in pids:  # processes we left (killed shims' orphans): back to the root
                    try:
                        with open(os.path.join(CPUACCT, "cgroup.procs"), "w") as fh:
                            fh.write(pid)
                    except OSError:
                        pass
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def throughput(command: Callable[[int, int], list[str]], loops: int, seconds: float) -> tuple[int, int, float]:
    """(runs done, runs failed, elapsed s) of `loops` parallel loops of `command(loop, n)`."""
    done = [0] * loops
    failed = [0] * loops
    deadline = time.monotonic() + seconds

    def loop(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            result = subprocess.run(command(index, n), capture_output=True)
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


# -- moord ------------------------------------------------------------------------------


def start_moord(base: str, cgroup: CpuCgroup) -> subprocess.Popen[bytes]:
    """moord on a temporary root, inside `cgroup`."""
    config = os.path.join(base, "moord.toml")
    with open(config, "w") as fh:
        fh.write(f'root = "{base}/root"\nstate = "{base}/state"\n[debug]\nlevel = "warn"\n')

    def join_cgroup() -> None:
        if cgroup.path:
            with open(os.path.join(cgroup.path, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))

    proc = subprocess.Popen(
        [sys.executable, "-m", "moord.supervisor.main", "--config", config], stderr=subprocess.DEVNULL, preexec_fn=join_cgroup
    )
    for _ in range(600):
        if subprocess.run([*moorctl_argv(), "-c", config, "--timeout", "1", "tree"], capture_output=True).returncode == 0:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moord did not start")


def start_latency(base: str, runs: int) -> dict[str, list[float]]:
    """Daemon-side tasks.create + tasks.start beside runc create + runc start, interleaved."""
    from moord.bus.client import Client
    from moord.client.images import resolve
    from moord.linux.mount import mount_all, unmount_all
    from moord.messages.errors import NotFound
    from moord.oci import spec as oci_spec

    client = Client(os.path.join(base, "state", "ipc"))
    image = resolve(client, IMAGE)
    floor_root = os.path.join(base, "floor-runc")
    rows: dict[str, list[float]] = {"create": [], "start": [], "create+start": [], "runc create": [], "runc start": [], "runc create+start": []}

    lease_scope = client.temporary_lease()
    lease = lease_scope.__enter__()  # snapshots and records stay out of GC's reach while we time

    def remove_snapshot(cid: str) -> None:
        try:
            client.call("snapshots.remove", {"snapshotter": "overlayfs", "key": cid})
        except NotFound:
            pass

    def prepare(cid: str) -> tuple[list[dict[str, Any]], bytes]:
        mounts = client.call(
            "snapshots.prepare", {"snapshotter": "overlayfs", "key": cid, "parent": image.chain_id}, lease=lease
        )["mounts"]
        spec = oci_spec.dumps(oci_spec.build_spec("default", cid, image.config, args=["sleep", "600"]))
        return mounts, spec

    def moord_once(i: int) -> None:
        cid = f"lat{i}"
        mounts, spec = prepare(cid)
        client.call("containers.create", {"container": {"id": cid, "image": IMAGE, "runtime": {"name": "io.containerd.runc.v2"}, "spec": spec, "snapshotter": "overlayfs", "snapshot_key": cid}}, lease=lease)
        t0 = time.perf_counter()
        client.call("tasks.create", {"container_id": cid, "rootfs": mounts})
        t1 = time.perf_counter()
        client.call("tasks.start", {"container_id": cid})
        t2 = time.perf_counter()
        if i >= 0:
            rows["create"].append(t1 - t0)
            rows["start"].append(t2 - t1)
            rows["create+start"].append(t2 - t0)
        client.call("tasks.kill", {"container_id": cid, "signal": 9})
        client.call("tasks.wait", {"container_id": cid})
        client.call("tasks.delete", {"container_id": cid})
        client.call("containers.delete", {"id": cid})
        remove_snapshot(cid)

    def floor_once(i: int) -> None:
        cid = f"floor{i}"
        mounts, spec_bytes = prepare(cid)
        bundle = os.path.join(base, "floor", cid)
        rootfs = os.path.join(bundle, "rootfs")
        os.makedirs(rootfs)
        spec = json.loads(spec_bytes)
        spec["root"]["path"] = "rootfs"  # as the runtime writes it
        spec.setdefault("linux", {}).setdefault("cgroupsPath", f"/moord-bench/{cid}")
        mount_all(mounts, rootfs)
        null = os.open(os.devnull, os.O_RDWR)
        try:
            with open(os.path.join(bundle, "config.json"), "w") as fh:
                json.dump(spec, fh)
            runc = ["runc", "--root", floor_root]
            t0 = time.perf_counter()
            subprocess.run([*runc, "create", "--bundle", bundle, "--pid-file", os.path.join(bundle, "init.pid"), cid],
                           stdin=null, stdout=null, stderr=null, check=True)
            t1 = time.perf_counter()
            subprocess.run([*runc, "start", cid], stdin=null, stdout=null, stderr=null, check=True)
            t2 = time.perf_counter()
            if i >= 0:
                rows["runc create"].append(t1 - t0)
                rows["runc start"].append(t2 - t1)
                rows["runc create+start"].append(t2 - t0)
            subprocess.run([*runc, "delete", "--force", cid], capture_output=True)
        finally:
            os.close(null)
            unmount_all(rootfs)
            shutil.rmtree(bundle, ignore_errors=True)
            remove_snapshot(cid)

    try:
        moord_once(-1)
        floor_once(-1)
        for i in range(runs):  # interleaved: both see the same background load
            moord_once(i)
            floor_once(i)
    finally:
        if os.path.isdir(floor_root):
            for cid in subprocess.run(["runc", "--root", floor_root, "list", "-q"], capture_output=True, text=True).stdout.split():
                subprocess.run(["runc", "--root", floor_root, "delete", "-f", cid], capture_output=True)
        lease_scope.__exit__(None, None, None)
        client.close()
    return rows


def cleanup_moord(base: str, ctl: list[str], moord: subprocess.Popen[bytes] | None) -> None:
    """Kill and remove every task and container, stop moord, then end whatever is left, by pid."""
    state = os.path.join(base, "state")
    shims = shim_pids(state)
    if moord is not None and moord.poll() is None:
        ids = list(shims)
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
    for runc_root in (os.path.join(state, "runc", "default"), os.path.join(base, "floor-runc")):
        if os.path.isdir(runc_root) and shutil.which("runc"):
            for cid in subprocess.run(["runc", "--root", runc_root, "list", "-q"], capture_output=True, text=True).stdout.split():
                subprocess.run(["runc", "--root", runc_root, "delete", "-f", cid], capture_output=True)
    unmount_under(base)


def bench_moord(base: str, args: argparse.Namespace, layout: str) -> dict[str, Any]:
    """All moord figures."""
    ctl = [*moorctl_argv(), "-c", os.path.join(base, "moord.toml")]
    cgroup = CpuCgroup(f"moord-bench-{os.getpid()}")
    moord = None
    out: dict[str, Any] = {}
    try:
        moord = start_moord(base, cgroup)
        subprocess.run([*ctl, "images", "import", layout], check=True, capture_output=True)
        ids = [f"idle{i + 1}" for i in range(args.containers)]
        for cid in ids:
            subprocess.run([*ctl, "run", "-d", IMAGE, cid, "sleep", "600"], check=True, capture_output=True)
        time.sleep(1)  # let the shims settle after their first requests
        shims = shim_pids(os.path.join(base, "state"))
        out["memory"] = median_mib([memory_kib(shims[cid]) for cid in ids])
        if args.detail:
            print("private memory of one shim, KiB by mapping:", private_by_mapping(shims[ids[0]])[:8])
        out["memory_total_pss"] = sum(memory_kib(shims[cid])["PSS"] for cid in ids) / 1024
        zygote = zygote_pid(moord.pid)
        out["zygote"] = median_mib([memory_kib(zygote)]) if zygote else None
        forker = zygote_pid(moord.pid, "moord-shim: zygote forker")
        out["forker"] = median_mib([memory_kib(forker)]) if forker else None
        if args.runs:
            out["latency"] = start_latency(base, args.runs)
        if args.seconds:
            cpu0 = cgroup.usage_s()
            done, failed, elapsed = throughput(
                lambda i, n: [*ctl, "run", "--rm", IMAGE, f"tp{i}-{n}", "/bin/true"], args.loops, args.seconds
            )
            out["throughput"] = (done, failed, elapsed, (cgroup.usage_s() - cpu0) / max(1, done))
    finally:
        cleanup_moord(base, ctl, moord)
        cgroup.close()
    return out


def bench_containerd(base: str, args: argparse.Namespace, layout_tar: str) -> dict[str, Any] | None:
    """The same figures for containerd 1.6 (memory, throughput), or None when it is not installed."""
    if not Containerd.available():
        return None
    cgroup = CpuCgroup(f"containerd-bench-{os.getpid()}")
    out: dict[str, Any] = {}
    try:
        with Containerd(base, cgroup.path) as cd:
            cd.ctr("images", "import", layout_tar, check=True)
            for i in range(args.containers):
                subprocess.run(cd.run_args("-d", IMAGE, f"idle{i + 1}", "sleep", "600"), check=True, capture_output=True)
            time.sleep(1)
            pids = cd.shim_pids()
            out["memory"] = median_mib([memory_kib(pid) for pid in pids])
            out["shims"] = len(pids)
            if args.seconds:
                cpu0 = cgroup.usage_s()
                done, failed, elapsed = throughput(
                    lambda i, n: cd.run_args("--rm", IMAGE, f"tp{i}-{n}", "/bin/true"), args.loops, args.seconds
                )
                out["throughput"] = (done, failed, elapsed, (cgroup.usage_s() - cpu0) / max(1, done))
    finally:
        cgroup.close()
    return out


def ms(samples: list[float]) -> float:
    """Median in milliseconds."""
    return statistics.median(samples) * 1000


def report(m: dict[str, Any], c: dict[str, Any] | None, args: argparse.Namespace) -> None:
    """Print the table."""
    cm = c["memory"] if c else CONTAINERD_SHIM
    source = "measured" if c else "issue 5's figures"
    print(f"\n{'':44} {'moord':>10} {'containerd':>11}  target   ({source} for containerd)")
    for key in ("PSS", "USS", "RSS"):
        target = f"<= {CONTAINERD_SHIM['PSS']:.1f} MiB (issue 5)" if key == "PSS" else ""
        print(f"{'per shim ' + key + f' ({args.containers} idle, median), MiB':44} {m['memory'][key]:10.1f} {cm[key]:11.1f}  {target}")
    print(f"{'PSS of all shims, MiB':44} {m['memory_total_pss']:10.1f}")
    if m.get("zygote"):
        z = m["zygote"]
        print(f"{'zygote (once per node) PSS/USS/RSS, MiB':44} {z['PSS']:.1f}/{z['USS']:.1f}/{z['RSS']:.1f}")
    if m.get("forker"):
        f = m["forker"]
        print(f"{'zygote forker (once per node) PSS/USS/RSS':44} {f['PSS']:.1f}/{f['USS']:.1f}/{f['RSS']:.1f}")
    if "latency" in m:
        lat = m["latency"]
        floor = ms(lat["runc create+start"])
        print(f"{'daemon-side start (create+start), ms':44} {ms(lat['create+start']):10.1f} {'':11}  <= {LATENCY_TARGET * floor:.1f} ({LATENCY_TARGET}x floor)")
        print(f"{'  tasks.create / tasks.start, ms':44} {ms(lat['create']):5.1f}/{ms(lat['start']):4.1f}")
        print(f"{'runc floor: runc create + runc start, ms':44} {floor:10.1f}   ({ms(lat['runc create']):.1f} + {ms(lat['runc start']):.1f})")
        print(f"{'daemon-side / floor':44} {ms(lat['create+start']) / floor:10.2f} {'':11}  <= {LATENCY_TARGET}")
    if "throughput" in m:
        done, failed, elapsed, cpu = m["throughput"]
        c_rate = f"{c['throughput'][0] / c['throughput'][2]:11.2f}" if c and "throughput" in c else f"{'~' + str(CONTAINERD_THROUGHPUT):>11}"
        print(f"{f'throughput, {args.loops} loops of run --rm, containers/s':44} {done / elapsed:10.2f} {c_rate}  >= containerd")
        c_cpu = f"{c['throughput'][3] * 1000:11.0f}" if c and "throughput" in c else f"{'~140':>11}"
        print(f"{'daemon-side CPU per container, ms':44} {cpu * 1000:10.0f} {c_cpu}")
        print(f"  ({done} moord runs, {failed} failed" + (f"; {c['throughput'][0]} containerd runs, {c['throughput'][1]} failed)" if c and "throughput" in c else ")"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0, help="per throughput run (0: skip)")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20, help="start-latency samples (0: skip)")
    parser.add_argument("--no-containerd", action="store_true")
    parser.add_argument("--detail", action="store_true", help="print where one shim's private memory lies")
    args = parser.parse_args()
    from moord.oci.busybox import build_busybox_layout

    base = tempfile.mkdtemp(prefix="moord-bench-", dir="/tmp")
    try:
        layout = os.path.join(base, "busybox")
        build_busybox_layout(layout, ref=IMAGE)
        moord = bench_moord(base, args, layout)
        containerd = None
        if not args.no_containerd:
            layout_tar = os.path.join(base, "busybox.tar")
            build_busybox_layout(layout_tar, ref=IMAGE, tar=True)
            containerd = bench_containerd(base, args, layout_tar)
        report(moord, containerd, args)
    finally:
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
