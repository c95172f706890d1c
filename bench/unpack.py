#!/usr/bin/env python3
"""Layer unpack speed: moord's applier (actors/diff.py) beside GNU `tar -x` of the same tar.

The layer holds N small files (1-8 KiB, default 20,000) in 200 directories. Both tools
extract onto a journaled ext4 filesystem that this script makes in a loop file
(mkfs.ext4 -j, mount -o loop) and removes at the end: the machines' root filesystem
has no journal and its file creation times swing too much to compare anything.

  tar -x     GNU tar extracting the uncompressed tar (as root: owners, modes, mtimes)
  moord      apply_layer() of the same tar in overlay mode (what an overlayfs unpack
             runs), with every hostile-input check on and the diff ID computed
  and the same pair for the gzip-compressed layer (`tar -xzf` beside apply_layer).

Prints the median of --repeats runs of each and moord's ratio to tar (target <= 1.5x).
Run as root from the repository: python3 bench/unpack.py [--files 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moord.actors.diff import MODE_OVERLAY, apply_layer  # noqa: E402

TARGET = 1.5


def build_layer(path: str, files: int, seed: int = 1) -> int:
    """Write a tar of `files` small files in 200 directories; returns its size."""
    rng = random.Random(seed)
    pool = os.urandom(64 * 1024) + b"moord " * 8192  # half random, half compressible
    dirs = 200
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(files):  # grouped by directory, as `tar -c` of a tree writes them
            size = rng.randint(1024, 8192)
            start = rng.randint(0, len(pool) - size)
            info = tarfile.TarInfo(f"usr/share/d{i * dirs // files:03}/file-{i:05}.dat")
            if i % (files // dirs) == 0:
                entry = tarfile.TarInfo(os.path.dirname(info.name))
                entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tar.addfile(entry)
            info.size, info.mode, info.mtime = size, 0o644 if i % 10 else 0o755, 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(pool[start : start + size]))
    return os.path.getsize(path)


def run(cmd: list[str]) -> None:
    """Run a setup command, failing loudly."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {result.stderr.strip()}")


def timed_tar(layer: str, target: str, gz: bool) -> float:
    """Seconds for GNU tar to extract `layer` into `target`."""
    started = time.perf_counter()
    run(["tar", "-xzf" if gz else "-xf", layer, "-C", target])
    return time.perf_counter() - started


def timed_apply(layer: str, target: str) -> float:
    """Seconds for moord's applier to apply `layer` onto `target`."""
    started = time.perf_counter()
    apply_layer(layer, target, mode=MODE_OVERLAY)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-mib", type=int, default=2048, help="size of the ext4 loop file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (mount -o loop)")

    work = tempfile.mkdtemp(prefix="moord-bench-unpack-", dir="/tmp")
    mnt = os.path.join(work, "mnt")
    image = os.path.join(work, "ext4.img")
    mounted = False
    try:
        layer = os.path.join(work, "layer.tar")
        size = build_layer(layer, args.files)
        layer_gz = layer + ".gz"
        with open(layer, "rb") as src, gzip.open(layer_gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.mkdir(mnt)
        with open(image, "wb") as fh:
            fh.truncate(args.image_mib * 1024 * 1024)
        run(["mkfs.ext4", "-q", "-F", "-j", image])
        run(["mount", "-o", "loop", image, mnt])
        mounted = True

        results: dict[str, list[float]] = {"tar": [], "moord": [], "tar-gz": [], "moord-gz": []}
        for n in range(args.repeats):
            for name in results:  # interleaved, so drift hits every tool alike
                target = os.path.join(mnt, f"{name}-{n}")
                os.mkdir(target)
                run(["sync"])
                gz = name.endswith("-gz")
                source = layer_gz if gz else layer
                took = timed_tar(source, target, gz) if name.startswith("tar") else timed_apply(source, target)
                results[name].append(took)
                shutil.rmtree(target)
        run(["sync"])

        print(f"layer: {args.files} files of 1-8 KiB, tar {size / 1e6:.1f} MB, gzip {os.path.getsize(layer_gz) / 1e6:.1f} MB;"
              f" ext4 -j loop file; median of {args.repeats}")
        for plain, ours in (("tar", "moord"), ("tar-gz", "moord-gz")):
            floor = statistics.median(results[plain])
            mine = statistics.median(results[ours])
            ratio = mine / floor
            verdict = "ok" if ratio <= TARGET else "MISS"
            label = "tar -xzf" if plain.endswith("gz") else "tar -xf "
            print(f"  {label} {floor:6.3f} s   moord apply {mine:6.3f} s   ratio {ratio:4.2f}x  "
                  f"(target <= {TARGET}x) {verdict}")
    finally:
        if mounted:
            subprocess.run(["umount", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
