"""A busybox image for tests and demos, built from Debian's busybox-static.

The rootfs holds the static binary at /bin/busybox, one symlink per applet (from
`busybox --list-full`), /etc/passwd and /etc/group with root and nobody, /tmp (1777) and
/root. Every entry is owned by 0:0 with mtime 0, so the layout's digests are the same on
every run and every host with the same busybox binary.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import tempfile

from moord.messages.errors import FailedPrecondition
from moord.oci.layout import write_layout

BUSYBOX_BINARY = "/bin/busybox"
DEFAULT_REF = "docker.io/library/busybox:latest"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _static_busybox(binary: str) -> str:
    """The busybox binary to copy; it must be static, since the image has no libc."""
    real = os.path.realpath(binary)
    if not os.path.isfile(real):
        raise FailedPrecondition(f"{binary} not found: install Debian's busybox-static")
    with open(real, "rb") as fh:
        head = fh.read(1 << 20)
    # A dynamic ELF names its program interpreter (ld-linux...); a static one does not.
    if b"ld-linux" in head or b"/lib64/ld-" in head:
        raise FailedPrecondition(f"{binary} is dynamically linked: install Debian's busybox-static")
    return real


def build_busybox_rootfs(rootfs: str, binary: str = BUSYBOX_BINARY) -> None:
    """Populate the empty directory `rootfs` with a minimal busybox system."""
    source = _static_busybox(binary)
    listing = subprocess.run([source, "--list-full"], check=True, capture_output=True, text=True).stdout
    for name in ("bin", "etc", "root", "tmp", "usr", "usr/bin", "usr/sbin", "sbin"):
        os.makedirs(os.path.join(rootfs, name), exist_ok=True)
    os.chmod(os.path.join(rootfs, "root"), 0o700)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    target = os.path.join(rootfs, "bin", "busybox")
    shutil.copyfile(source, target)
    os.chmod(target, 0o755)
    for applet in sorted(set(listing.split())):
        parts = [p for p in applet.split("/") if p]
        # Applet paths come from the binary: keep only plain relative paths under the rootfs.
        if not parts or any(p in (".", "..") for p in parts) or applet == "bin/busybox":
            continue
        link = os.path.join(rootfs, *parts)
        if os.path.lexists(link):
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(posixpath.relpath("/bin/busybox", "/" + posixpath.dirname("/".join(parts))), link)
    for name, text in (("passwd", PASSWD), ("group", GROUP)):
        with open(os.path.join(rootfs, "etc", name), "w") as fh:
            fh.write(text)
        os.chmod(os.path.join(rootfs, "etc", name), 0o644)
    special = {os.path.join(rootfs, "tmp"), os.path.join(rootfs, "root")}
    for dirpath, dirnames, _ in os.walk(rootfs):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if full not in special:  # whatever the umask made of them
                os.chmod(full, 0o755)


def build_busybox_layout(path: str, ref: str = DEFAULT_REF, tar: bool = False, binary: str = BUSYBOX_BINARY) -> str:
    """Write a busybox OCI image layout (a directory, or a tar with `tar`); returns the manifest digest."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".busybox-rootfs-", dir=parent)
    try:
        # The umask must not leak into the image: build_busybox_rootfs chmods explicitly.
        build_busybox_rootfs(staging, binary)
        result = write_layout(staging, path, ref, cmd=("sh",), mtime=0, owner=(0, 0), tar=tar)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result.manifest_digest
