#!/usr/bin/env python3
"""Cold pull and unpack from a local registry: moord beside its floors and containerd.

The image has three ~100 MB layers: many small files, incompressible data, and a mix
of both. It is pushed (by skopeo) into Debian's docker-registry on a loopback port.
Every root (the registry's storage, moord's, containerd's, the floors' targets) lives
on a journaled ext4 loop file that this script makes and removes: the machines' root
filesystem has no journal and its file creation times swing too much to compare.

  floors      hashlib sha256 and zlib gunzip of the compressed layers (MB/s of
              compressed bytes), `tar -xzf` of the layers one after another
  moord       `moorctl images pull` into a fresh daemon, settled for a few seconds
              (download, unpack, labels)
  containerd  `ctr images pull --plain-http` into its own fresh containerd, when
              /usr/bin/containerd is installed (target: moord in at most half its time)

Prints the median of --repeats cold pulls of each. Run as root from the repository:
python3 bench/pull.py [--layer-mb 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run_latency import moorctl_argv  # noqa: E402

TARGET_VS_CONTAINERD = 0.5
# Each daemon runs a few seconds before its pull, as a node's daemon meets a pull: the
# content is cold (fresh roots), the daemon is not starting up.
SETTLE_SECONDS = 5.0
MB = 1_000_000


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a setup command, failing loudly."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {result.stderr.strip()[-2000:]}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the image ------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    tar.addfile(info)


def write_layer(path: str, kind: str, target_bytes: int, seed: int) -> tuple[str, str, int]:
    """A gzip layer of one shape: (compressed digest, diff id, compressed size)."""
    rng = random.Random(seed)
    text = (b"the quick brown fox jumps over the lazy moord " * 2048)[: 1 << 16]
    noise = rng.randbytes(1 << 20)
    raw_hash = hashlib.sha256()

    class Tee(io.RawIOBase):
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:  # type: ignore[override]
            raw_hash.update(data)  # type: ignore[arg-type]
            return self.inner.write(data)  # type: ignore[attr-defined]

    with open(path, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
        tee = Tee(gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            written = 0
            if kind == "small":
                i = 0
                while written < target_bytes:
                    if i % 250 == 0:
                        _add_dir(tar, f"usr/share/small/d{i // 250:04}")
                    size = rng.randint(512, 7680)
                    start = rng.randint(0, (1 << 16) - size)
                    data = text[start : start + size] if i % 2 else noise[start : start + size]
                    _add(tar, f"usr/share/small/d{i // 250:04}/f{i:06}", data)
                    written += size
                    i += 1
            else:
                _add_dir(tar, f"opt/{kind}")
                i = 0
                while written < target_bytes:
                    size = rng.choice([64 << 10, 1 << 20, 8 << 20]) if kind == "mixed" else 10 << 20
                    size = min(size, target_bytes - written) or 1
                    if kind == "random" or i % 2:
                        data = rng.randbytes(size)
                    else:
                        data = (text * (size // len(text) + 1))[:size]
                    _add(tar, f"opt/{kind}/blob{i:05}", data)
                    written += size
                    i += 1
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest(), "sha256:" + raw_hash.hexdigest(), os.path.getsize(path)


def build_layout(work: str, layer_bytes: int) -> tuple[str, list[str]]:
    """An OCI layout of the three-layer image: (layout dir, layer blob paths)."""
    layout = os.path.join(work, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    layers, paths = [], []
    for seed, kind in enumerate(("small", "random", "mixed")):
        tmp = os.path.join(work, f"{kind}.tar.gz")
        digest, diff_id, size = write_layer(tmp, kind, layer_bytes, seed)
        final = os.path.join(blobs, digest.split(":", 1)[1])
        os.replace(tmp, final)
        paths.append(final)
        layers.append(({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}, diff_id))

    def store(doc: dict[str, object]) -> dict[str, object]:
        data = json.dumps(doc, separators=(",", ":")).encode()
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as fh:
            fh.write(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    config = store({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
    })
    manifest = store({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [desc for desc, _ in layers],
    })
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }]}
    with open(os.path.join(layout, "index.json"), "w") as fh:
        json.dump(index, fh)
    with open(os.path.join(layout, "oci-layout"), "w") as fh:
        fh.write('{"imageLayoutVersion":"1.0.0"}')
    return layout, paths


# -- floors ---------------------------------------------------------------------------


def floors(paths: list[str], scratch: str) -> dict[str, float]:
    """sha256 and gunzip MB/s of the compressed layers, and `tar -xzf` seconds of all of them."""
    total = sum(os.path.getsize(p) for p in paths)
    started = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    sha = total / MB / (time.perf_counter() - started)
    started = time.perf_counter()
    for p in paths:
        inflater = zlib.decompressobj(31)
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                inflater.decompress(chunk)
    gunzip = total / MB / (time.perf_counter() - started)
    target = os.path.join(scratch, "tar")
    os.makedirs(target)
    started = time.perf_counter()
    for p in paths:
        sh(["tar", "-xzf", p, "-C", target])
    tar_s = time.perf_counter() - started
    shutil.rmtree(target)
    return {"sha256": sha, "gunzip": gunzip, "tar": tar_s, "mb": total / MB}


# -- the registry ---------------------------------------------------------------------


def start_registry(work: str, port: int) -> subprocess.Popen[bytes]:
    """Debian's docker-registry on 127.0.0.1:port, storage under `work`."""
    storage = os.path.join(work, "registry")
    os.makedirs(storage)
    config = os.path.join(work, "registry.yml")
    with open(config, "w") as fh:
        fh.write(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("docker-registry did not start")


# -- the pullers ----------------------------------------------------------------------


def pull_moord(base: str, port: int, ref: str) -> float:
    """Seconds of one cold `moorctl images pull` into a fresh daemon."""
    hosts = os.path.join(base, "hosts", f"127.0.0.1:{port}")
    os.makedirs(hosts)
    with open(os.path.join(hosts, "hosts.toml"), "w") as fh:
        fh.write(f'server = "http://127.0.0.1:{port}"\n')
    config = os.path.join(base, "moord.toml")
    with open(config, "w") as fh:
        fh.write(
            f'root = "{base}/root"\nstate = "/run/moord-bench-{os.getpid()}"\n[debug]\nlevel = "warn"\n'
            f'[plugins.registry]\nconfig_path = "{base}/hosts"\n'
        )
    ctl = [*moorctl_argv(), "-c", config]
    proc = subprocess.Popen([sys.executable, "-m", "moord.supervisor.main", "--config", config], stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if subprocess.run([*ctl, "--timeout", "1", "tree"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        time.sleep(SETTLE_SECONDS)
        started = time.perf_counter()
        sh([*ctl, "images", "pull", "-q", ref])
        elapsed = time.perf_counter() - started
        return elapsed
    finally:
        proc.terminate()
        proc.wait(60)
        state = f"/run/moord-bench-{os.getpid()}"
        subprocess.run(["sh", "-c", f"grep -o ' {base}[^ ]*' /proc/self/mounts | xargs -r -n1 umount -l"], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def pull_containerd(base: str, ref: str) -> float | None:
    """Seconds of one cold `ctr images pull` into its own fresh containerd (None: not installed)."""
    if not shutil.which("containerd") or not shutil.which("ctr"):
        return None
    sock = os.path.join(base, "containerd.sock")
    config = os.path.join(base, "config.toml")
    state = f"/run/containerd-bench-{os.getpid()}"
    with open(config, "w") as fh:
        fh.write(f'version = 2\nroot = "{base}/root"\nstate = "{state}"\n[grpc]\naddress = "{sock}"\n')
        fh.write('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n')
    proc = subprocess.Popen(["containerd", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if subprocess.run(["ctr", "-a", sock, "version"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        time.sleep(SETTLE_SECONDS)
        started = time.perf_counter()
        sh(["ctr", "-a", sock, "images", "pull", "--plain-http", ref])
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(60)
        subprocess.run(["sh", "-c", f"grep -o ' {base}[^ ]*' /proc/self/mounts | xargs -r -n1 umount -l"], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-mb", type=int, default=100, help="uncompressed size of each layer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-mib", type=int, default=8192, help="size of the ext4 loop file")
    parser.add_argument("--no-containerd", action="store_true", help="skip the containerd peer")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (mount -o loop)")
    for tool in ("docker-registry", "skopeo"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")

    work = tempfile.mkdtemp(prefix="moord-bench-pull-", dir="/tmp")
    mnt = os.path.join(work, "mnt")
    image = os.path.join(work, "ext4.img")
    registry: subprocess.Popen[bytes] | None = None
    mounted = False
    try:
        os.mkdir(mnt)
        with open(image, "wb") as fh:
            fh.truncate(args.image_mib << 20)
        # No lazy inode-table init: its background zeroing would land in the timings.
        sh(["mkfs.ext4", "-q", "-j", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image])
        sh(["mount", "-o", "loop", image, mnt])
        mounted = True
        print(f"building the image: 3 layers of ~{args.layer_mb} MB (small files, random, mixed) ...", flush=True)
        layout, paths = build_layout(mnt, args.layer_mb * MB)
        port = free_port()
        registry = start_registry(mnt, port)
        ref = f"127.0.0.1:{port}/bench/pull:latest"
        sh(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}"])
        floor = floors(paths, mnt)
        moord_s, containerd_s = [], []
        for i in range(args.repeats):
            pullers = (("moord", moord_s, pull_moord), ("containerd", containerd_s, None))
            for name, samples, fn in pullers[: 1 if args.no_containerd else 2]:
                base = os.path.join(mnt, f"{name}-{i}")
                os.makedirs(base)
                sh(["sync"])
                got = fn(base, port, ref) if fn is not None else pull_containerd(base, ref)
                if got is not None:
                    samples.append(got)
                    print(f"  run {i + 1}: {name} {got:.2f} s", flush=True)
                subprocess.run(["rm", "-rf", base])
                sh(["sync"])  # the removal's writeback must not land in the next pull's time
        mb = floor["mb"]
        print(f"\nimage: {mb:.0f} MB compressed in 3 layers; median of {args.repeats} cold pulls\n")
        print(f"{'':<28}{'seconds':>10}{'MB/s':>10}")
        print(f"{'floor: sha256':<28}{mb / floor['sha256']:>10.2f}{floor['sha256']:>10.0f}")
        print(f"{'floor: gunzip (zlib)':<28}{mb / floor['gunzip']:>10.2f}{floor['gunzip']:>10.0f}")
        print(f"{'floor: tar -xzf, serial':<28}{floor['tar']:>10.2f}{mb / floor['tar']:>10.0f}")
        moord = statistics.median(moord_s)
        print(f"{'moord images pull':<28}{moord:>10.2f}{mb / moord:>10.0f}")
        if containerd_s:
            peer = statistics.median(containerd_s)
            print(f"{'containerd ctr images pull':<28}{peer:>10.2f}{mb / peer:>10.0f}")
            ratio = moord / peer
            verdict = "met" if ratio <= TARGET_VS_CONTAINERD else "missed"
            print(f"\nmoord / containerd = {ratio:.2f} (target <= {TARGET_VS_CONTAINERD}: {verdict})")
        else:
            print("\ncontainerd is not installed: no peer figure")
    finally:
        if registry is not None:
            registry.terminate()
            registry.wait(30)
        if mounted:
            subprocess.run(["umount", "-l", mnt])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
