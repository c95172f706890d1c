#!/usr/bin/env python3
"""Metadata speed: create, get and list of 10,000 containers through the ZeroMQ API.

One client in this process talks to a throwaway moord (started under /tmp, removed at
the end); each container has four labels and a 2 KiB spec, like `ctr run`'s records.

  create         containers.create, one after another (p50, p99, total)
  get            containers.get of random ids (p50 target < 1 ms, p99)
  list           containers.list without filters (all 10,000)
  list filtered  containers.list over all 10,000 with filters (target < 100 ms each):
                 a label equality (SQL on the label index), an id regexp (Python)

Run from the repository: python3 bench/metadata.py [--containers 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.daemon import cleanup_base, new_daemon  # noqa: E402

GET_TARGET_MS = 1.0
LIST_TARGET_MS = 100.0


def percentile(samples: list[float], q: float) -> float:
    """The q-th quantile (0..1) in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000


def timed(action: Callable[[], Any]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def spec_for(cid: str) -> bytes:
    """A 2 KiB OCI runtime spec."""
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", "sleep 1"], "env": [f"VAR{i}=value-{i}" for i in range(40)], "cwd": "/"},
        "root": {"path": "rootfs"},
        "hostname": cid,
        "mounts": [{"destination": f"/m{i}", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]} for i in range(12)],
    }
    return json.dumps(spec).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=10_000)
    parser.add_argument("--gets", type=int, default=5_000)
    parser.add_argument("--lists", type=int, default=7, help="runs of each list (median reported)")
    args = parser.parse_args()

    daemon = new_daemon()
    try:
        daemon.start()
        client = daemon.client("bench", timeout=60)
        call = client.call
        ids = [f"ctr-{i:05}" for i in range(args.containers)]
        creates = []
        started = time.perf_counter()
        for i, cid in enumerate(ids):
            record = {
                "id": cid,
                "labels": {"app": f"app{i % 10}", "tier": "web" if i % 2 else "db", "index": str(i), "owner": "bench"},
                "image": "docker.io/library/busybox:latest",
                "runtime": {"name": "io.containerd.runc.v2"},
                "spec": spec_for(cid),
                "snapshotter": "overlayfs",
                "snapshot_key": cid,
            }
            creates.append(timed(lambda: call("containers.create", {"container": record})))
        create_total = time.perf_counter() - started

        rng = random.Random(7)
        gets = [timed(lambda: call("containers.get", {"id": rng.choice(ids)})) for _ in range(args.gets)]

        def list_ms(filters: list[str], expect: int) -> float:
            samples = []
            for _ in range(args.lists):
                reply: dict[str, Any] = {}
                samples.append(timed(lambda: reply.update(call("containers.list", {"filters": filters}))))
                assert len(reply["containers"]) == expect, (filters, len(reply["containers"]))
            return statistics.median(samples) * 1000

        n = args.containers
        lists = [
            ("list (no filter)", [], n),
            ("list labels.app==app3", ["labels.app==app3"], n // 10),
            ("list labels.tier==db,labels.app==app4", ["labels.tier==db,labels.app==app4"], n // 10),
            ("list id~=^ctr-0012", ["id~=^ctr-0012"], min(n, 10) if n > 129 else 0),
            ("list labels.app==none", ["labels.app==none"], 0),
        ]
        print(f"{n} containers (4 labels, {len(spec_for(ids[0]))} B spec) through ZeroMQ, one client")
        print(f"  create   p50 {percentile(creates, 0.5):6.3f} ms  p99 {percentile(creates, 0.99):6.3f} ms"
              f"  total {create_total:5.1f} s ({n / create_total:,.0f}/s)")
        p50 = percentile(gets, 0.5)
        print(f"  get      p50 {p50:6.3f} ms  p99 {percentile(gets, 0.99):6.3f} ms"
              f"  (target p50 < {GET_TARGET_MS} ms) {'ok' if p50 < GET_TARGET_MS else 'MISS'}")
        for name, filters, expect in lists:
            ms = list_ms(filters, expect)
            verdict = "" if not filters else ("ok" if ms < LIST_TARGET_MS else "MISS")
            target = f"(target < {LIST_TARGET_MS:.0f} ms) {verdict}" if filters else ""
            print(f"  {name:<40} {expect:>6} found  median {ms:7.1f} ms  {target}")
    finally:
        daemon.stop()
        cleanup_base(daemon.base)


if __name__ == "__main__":
    main()
