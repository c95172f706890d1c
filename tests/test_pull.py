"""`moorctl images pull` and `push` against Debian's docker-registry, as a user sees them.

Images are built here as OCI layouts (the busybox layer from moord's own builder plus
small generated layers) and pushed into the registry by skopeo, so what moord pulls
was written by another implementation.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from typing import Any, Iterator

import pytest

from moord.oci.layout import OciLayout
from tests.daemon import Daemon, cleanup_base, moorctl_argv, new_daemon, wait_until
from tests.registry_servers import HostileObject, HostileRegistry, RunningRegistry, docker_registry, write_hosts_toml

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# -- images ---------------------------------------------------------------------------


def layer_blob(entries: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A gzip tar layer from (name, kind "file"|"dir"|"whiteout"|"opaque", data): (blob, diff id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            if kind == "dir":
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            if kind == "whiteout":
                name = os.path.join(os.path.dirname(name), ".wh." + os.path.basename(name))
            elif kind == "opaque":
                name = os.path.join(name, ".wh..wh..opq")
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    uncompressed = raw.getvalue()
    return gzip.compress(uncompressed, mtime=0), "sha256:" + hashlib.sha256(uncompressed).hexdigest()


def write_layout(path: str, base_layout: str, extra_layers: list[list[tuple[str, str, bytes]]], tag: str = "latest") -> dict[str, Any]:
    """An OCI layout: busybox's layer, then `extra_layers`. Returns the manifest descriptor."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def store(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as fh:
            fh.write(data)
        return "sha256:" + digest

    with OciLayout(base_layout) as base:
        image = next(iter(base.images()))
        _, manifest = base.read_document(image.target["digest"], image.target["size"], "manifest")
        _, config = base.read_document(manifest["config"]["digest"], manifest["config"]["size"], "config")
        layer = manifest["layers"][0]
        with base.open_blob(layer["digest"], layer["size"]) as src:
            store(src.read())
    layers = [dict(layer)]
    diff_ids = list(config["rootfs"]["diff_ids"])
    for entries in extra_layers:
        blob, diff_id = layer_blob(entries)
        layers.append({"mediaType": OCI_LAYER, "digest": store(blob), "size": len(blob)})
        diff_ids.append(diff_id)
    config = {**config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_bytes = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": store(config_bytes), "size": len(config_bytes)}, "layers": layers}
    manifest_bytes = json.dumps(manifest).encode()
    desc = {"mediaType": OCI_MANIFEST, "digest": store(manifest_bytes), "size": len(manifest_bytes)}
    index = {"schemaVersion": 2, "manifests": [{**desc, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(path, "index.json"), "w") as fh:
        json.dump(index, fh)
    with open(os.path.join(path, "oci-layout"), "w") as fh:
        fh.write('{"imageLayoutVersion":"1.0.0"}')
    return desc


def skopeo_push(layout: str, tag: str, dest: str, ca_dir: str = "") -> None:
    """Copy a layout's image into a registry with skopeo (another implementation)."""
    tls = [f"--dest-cert-dir={ca_dir}"] if ca_dir else ["--dest-tls-verify=false"]
    result = subprocess.run(["skopeo", "--insecure-policy", "copy", *tls, f"oci:{layout}:{tag}", f"docker://{dest}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="md-pull-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(work: str) -> Iterator[RunningRegistry]:
    with docker_registry(work) as running:
        yield running


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileRegistry]:
    with HostileRegistry() as server:
        yield server


@pytest.fixture(scope="module")
def puller(work: str, registry: RunningRegistry, hostile: HostileRegistry) -> Iterator[Daemon]:
    """A daemon that reaches the test registry (and the hostile one) over plain HTTP."""
    hosts = os.path.join(work, "hosts")
    write_hosts_toml(hosts, registry.host, f"http://{registry.host}")
    write_hosts_toml(hosts, hostile.host, f"http://{hostile.host}")
    # docker.io is served by the local registry as a mirror: `busybox` resolves offline.
    write_hosts_toml(hosts, "docker.io", "https://registry-1.docker.io", mirrors=f'[host."http://{registry.host}"]\n  capabilities = ["pull", "resolve"]\n')
    d = new_daemon(f'[plugins.registry]\nconfig_path = "{hosts}"\n')
    try:
        d.start()
        yield d
    finally:
        d.stop()
        cleanup_base(d.base)


@pytest.fixture(scope="module")
def layered(work: str, busybox_layout: str, registry: RunningRegistry) -> dict[str, Any]:
    """Two images sharing busybox's layer, with whiteouts and opaque directories above it."""
    shared = [("data", "dir", b""), ("data/keep", "file", b"kept\n"), ("data/gone", "file", b"gone\n"), ("data/old", "dir", b""), ("data/old/x", "file", b"x\n")]
    upper = [("data/gone", "whiteout", b""), ("data/old", "opaque", b""), ("data/old/y", "file", b"y\n"), ("etc/motd", "file", b"hello from a pulled layer\n")]
    big = [("data/big", "file", os.urandom(3 << 20))]
    images = {}
    for name, layers in (("app", [shared, upper]), ("other", [shared, big])):
        layout = os.path.join(work, f"layout-{name}")
        desc = write_layout(layout, busybox_layout, layers)
        ref = f"{registry.host}/test/{name}:v1"
        skopeo_push(layout, "latest", ref)
        images[name] = {"ref": ref, "desc": desc, "layout": layout}
    return images


# -- tests ----------------------------------------------------------------------------


def serve_manifest(hostile: HostileRegistry, repository: str, tag: str, body: bytes, media_type: str) -> str:
    """Serve a manifest or index by tag and by its digest, as a registry does."""
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    hostile.put(repository, "manifests", tag, HostileObject(body, media_type))
    hostile.put(repository, "manifests", digest, HostileObject(body, media_type))
    return digest


def content_labels(d: Daemon, digest: str) -> dict[str, str]:
    return d.client().call("content.info", {"digest": digest})["info"]["labels"]


def test_pull_by_tag_then_run(puller: Daemon, layered: dict[str, Any], registry: RunningRegistry) -> None:
    ref = layered["app"]["ref"]
    result = puller.moorctl("images", "pull", ref)
    assert result.returncode == 0, result.stderr
    assert ref in result.stdout
    run = puller.moorctl("run", "--rm", ref, "pulled1", "sh", "-c", "cat /etc/motd; ls /data; ls /data/old; test ! -e /data/gone && echo whiteout-ok")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["hello", "from", "a", "pulled", "layer", "keep", "old", "y", "whiteout-ok"]


def test_pull_sets_containerd_labels(puller: Daemon, layered: dict[str, Any], registry: RunningRegistry) -> None:
    ref = layered["app"]["ref"]
    assert puller.moorctl("images", "pull", "-q", ref).returncode == 0
    manifest_digest = layered["app"]["desc"]["digest"]
    source_key = f"containerd.io/distribution.source.{registry.host}"
    manifest_labels = content_labels(puller, manifest_digest)
    assert manifest_labels[source_key] == "test/app"
    assert "containerd.io/gc.ref.content.config" in manifest_labels
    layers = [manifest_labels[f"containerd.io/gc.ref.content.l.{i}"] for i in range(3)]
    for layer in layers:
        labels = content_labels(puller, layer)
        assert labels[source_key] == "test/app"
        assert labels["containerd.io/uncompressed"].startswith("sha256:")
    config = content_labels(puller, manifest_labels["containerd.io/gc.ref.content.config"])
    assert config["containerd.io/gc.ref.snapshot.overlayfs"].startswith("sha256:")
    # the image record names the root the registry resolved
    image = puller.client().call("images.get", {"name": ref})["image"]
    assert image["target"]["digest"] in (manifest_digest, image["target"]["digest"])


def test_pull_by_digest(puller: Daemon, layered: dict[str, Any], registry: RunningRegistry) -> None:
    digest = layered["other"]["desc"]["digest"]
    ref = f"{registry.host}/test/other@{digest}"
    result = puller.moorctl("images", "pull", "--print-chainid", ref)
    assert result.returncode == 0, result.stderr
    assert "linux/" in result.stdout
    assert puller.client().call("images.get", {"name": ref})["image"]["target"]["digest"] == digest


def test_docker_io_served_by_a_mirror(puller: Daemon, busybox_layout: str, registry: RunningRegistry) -> None:
    skopeo_push(busybox_layout, "docker.io/library/busybox:latest", f"{registry.host}/library/busybox:latest")
    result = puller.moorctl("images", "pull", "-q", "busybox")
    assert result.returncode == 0, result.stderr
    run = puller.moorctl("run", "--rm", "docker.io/library/busybox:latest", "mirrored", "echo", "hello")
    assert run.returncode == 0 and run.stdout.strip() == "hello", run.stderr


def test_concurrent_pulls_share_layer_work(puller: Daemon, layered: dict[str, Any], work: str, busybox_layout: str, registry: RunningRegistry) -> None:
    # Fresh images (new names, new upper layers) over one shared new layer.
    shared = [("shared", "dir", b""), ("shared/blob", "file", os.urandom(2 << 20))]
    refs = []
    for name in ("c1", "c2", "c3"):
        layout = os.path.join(work, f"layout-{name}")
        write_layout(layout, busybox_layout, [shared, [(f"own-{name}", "file", name.encode())]])
        refs.append(f"{registry.host}/test/{name}:v1")
        skopeo_push(layout, "latest", refs[-1])
    client = puller.client(timeout=120)
    replies: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def pull(ref: str) -> None:
        try:
            replies.append(client.call("transfer.pull", {"ref": ref}, timeout=120))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(ref,)) for ref in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # busybox and the shared layer: each unpacked at most once across the three pulls;
    # each image's own top layer once.
    assert sum(r["layers_unpacked"] for r in replies) <= 3 + 1 + 1


def test_push_then_pull_back_byte_identical(puller: Daemon, layered: dict[str, Any], registry: RunningRegistry, work: str) -> None:
    src = layered["app"]["ref"]
    assert puller.moorctl("images", "pull", "-q", src).returncode == 0
    dest = f"{registry.host}/pushed/app:copy"
    result = puller.moorctl("images", "push", "--chunk-size", str(1 << 20), dest, src)
    assert result.returncode == 0, result.stderr
    # skopeo reads it back as another implementation would; the blobs are the same bytes
    out = os.path.join(work, "pushed-back")
    pulled = subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{out}:copy"], capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    with OciLayout(layered["app"]["layout"]) as original, OciLayout(out) as back:
        first = next(iter(original.images("app"))).target
        second = next(iter(back.images("app"))).target
        assert second["digest"] == first["digest"]
        _, manifest = back.read_document(second["digest"], second["size"], "manifest")
        for layer in manifest["layers"]:
            with back.open_blob(layer["digest"], layer["size"]) as got, original.open_blob(layer["digest"], layer["size"]) as want:
                assert got.read() == want.read()
    # and moord pulls its own push; the blobs now name both repositories as their source
    again = puller.moorctl("images", "pull", "-q", dest)
    assert again.returncode == 0, again.stderr
    source_key = f"containerd.io/distribution.source.{registry.host}"
    assert content_labels(puller, first["digest"])[source_key] == "pushed/app,test/app"


def test_wrong_digest_blob_commits_nothing(puller: Daemon, hostile: HostileRegistry, layered: dict[str, Any]) -> None:
    good, diff_id = layer_blob([("evil", "file", b"payload\n")])
    lie = b"X" + good[1:]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    good_digest = "sha256:" + hashlib.sha256(good).hexdigest()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": good_digest, "size": len(good)}],
    }).encode()
    serve_manifest(hostile, "evil/img", "v1", manifest, OCI_MANIFEST)
    hostile.put("evil/img", "blobs", config_digest, HostileObject(config))
    hostile.put("evil/img", "blobs", good_digest, HostileObject(lie))
    result = puller.moorctl("images", "pull", "-q", f"{hostile.host}/evil/img:v1")
    assert result.returncode != 0
    assert "digest" in result.stderr.lower()
    listed = puller.moorctl("content", "ls", "-q").stdout.split()
    assert good_digest not in listed
    assert puller.moorctl("images", "ls", "-q").returncode == 0  # still serving


def test_index_referring_to_itself_is_refused(puller: Daemon, hostile: HostileRegistry) -> None:
    # No index can hold its own digest, so a hostile registry serves the index's own
    # bytes for the child it names: a walk that trusted it would never end.
    child = "sha256:" + hashlib.sha256(b"some child").hexdigest()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_INDEX, "digest": child, "size": 400, "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode()
    serve_manifest(hostile, "loop/img", "v1", index, OCI_INDEX)
    hostile.put("loop/img", "manifests", child, HostileObject(index, OCI_INDEX))
    result = puller.moorctl("images", "pull", "-q", f"{hostile.host}/loop/img:v1")
    assert result.returncode != 0
    assert "digest" in result.stderr or "size" in result.stderr, result.stderr
    assert puller.moorctl("images", "ls", "-q").returncode == 0


def test_oversized_manifest_is_refused(puller: Daemon, hostile: HostileRegistry) -> None:
    huge = b'{"schemaVersion":2,"layers":[],"pad":"' + b"a" * (5 << 20) + b'"}'
    serve_manifest(hostile, "big/img", "v1", huge, OCI_MANIFEST)
    result = puller.moorctl("images", "pull", "-q", f"{hostile.host}/big/img:v1")
    assert result.returncode != 0
    assert "limit" in result.stderr or "large" in result.stderr or "MiB" in result.stderr or "bytes" in result.stderr, result.stderr
    assert puller.moorctl("images", "ls", "-q").returncode == 0


@pytest.mark.parametrize("victim", ["images", "content"])
def test_pull_resumes_after_a_process_is_killed(victim: str, work: str, registry: RunningRegistry, busybox_layout: str) -> None:
    layout = os.path.join(work, f"layout-resume-{victim}")
    write_layout(layout, busybox_layout, [[("big", "file", os.urandom(48 << 20))]])
    ref = f"{registry.host}/test/resume-{victim}:v1"
    skopeo_push(layout, "latest", ref)
    hosts = os.path.join(work, f"hosts-resume-{victim}")
    write_hosts_toml(hosts, registry.host, f"http://{registry.host}")
    d = new_daemon(f'[plugins.registry]\nconfig_path = "{hosts}"\n')
    try:
        d.start()
        pull = subprocess.Popen(moorctl_argv(d.config_path, "images", "pull", "-q", ref), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            client = d.client()

            def partial() -> bool:
                statuses = client.call("content.list_statuses", {"filters": []}).get("statuses", [])
                return any(s["ref"].startswith("layer-") and s["offset"] > 0 for s in statuses)

            wait_until(partial, 60, "a partial ingest")
            os.kill(d.child_pid(victim), 9)
            try:
                out, err = pull.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the pull did not finish; daemon log:\n{d.log()[-6000:]}") from None
        finally:
            if pull.poll() is None:
                pull.kill()
                pull.wait()
        assert pull.returncode == 0, err
        if victim == "images":
            assert "resuming" in err  # the request was lost with the process: sent again
        run = d.moorctl("run", "--rm", ref, "resumed", "sh", "-c", "wc -c < /big")
        assert run.returncode == 0 and run.stdout.strip() == str(48 << 20), run.stderr
    finally:
        d.stop()
        cleanup_base(d.base)


def test_pull_and_push_with_tls_and_basic_auth(work: str, busybox_layout: str) -> None:
    """A registry behind TLS (a CA the test made) and htpasswd: credentials from moord's
    config, the CA from hosts.toml; a wrong password is a clear error."""
    with docker_registry(work, auth="htpasswd", tls=True, users={"puller": "p4ss"}) as secure:
        hosts = os.path.join(work, "hosts-secure")
        write_hosts_toml(hosts, secure.host, f"https://{secure.host}", extra=f'ca = "{secure.ca_cert}"')
        auth = f'[plugins.registry.auths."{secure.host}"]\nusername = "puller"\npassword = "p4ss"\n'
        d = new_daemon(f'[plugins.registry]\nconfig_path = "{hosts}"\n{auth}')
        try:
            d.start()
            assert d.moorctl("images", "import", busybox_layout).returncode == 0
            dest = f"{secure.host}/secure/busybox:1"
            pushed = d.moorctl("images", "push", dest, "docker.io/library/busybox:latest")
            assert pushed.returncode == 0, pushed.stderr
            pulled = d.moorctl("images", "pull", "-q", dest)
            assert pulled.returncode == 0, pulled.stderr
            run = d.moorctl("run", "--rm", dest, "secure1", "echo", "hello")
            assert run.returncode == 0 and run.stdout.strip() == "hello", run.stderr
        finally:
            d.stop()
            cleanup_base(d.base)
        wrong = new_daemon(f'[plugins.registry]\nconfig_path = "{hosts}"\n[plugins.registry.auths."{secure.host}"]\nusername = "puller"\npassword = "nope"\n')
        try:
            wrong.start()
            refused = wrong.moorctl("images", "pull", "-q", f"{secure.host}/secure/busybox:1")
            assert refused.returncode != 0
            assert "unauthorized" in refused.stderr, refused.stderr
        finally:
            wrong.stop()
            cleanup_base(wrong.base)


def test_platforms_choose_what_is_fetched(puller: Daemon, work: str, busybox_layout: str, registry: RunningRegistry) -> None:
    """An index of linux/amd64 (busybox) and linux/arm64 (a stand-in layer): by default only
    the host's manifest is fetched; --platform picks another; --all-platforms takes all."""
    layout = os.path.join(work, "layout-multi")
    amd = write_layout(layout, busybox_layout, [[("arch", "file", b"amd64\n")]])
    blob, diff_id = layer_blob([("arch", "file", b"arm64\n")])
    blobs = os.path.join(layout, "blobs", "sha256")
    arm_layer = "sha256:" + hashlib.sha256(blob).hexdigest()
    with open(os.path.join(blobs, arm_layer[7:]), "wb") as fh:
        fh.write(blob)
    config = json.dumps({"architecture": "arm64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    with open(os.path.join(blobs, config_digest[7:]), "wb") as fh:
        fh.write(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                           "layers": [{"mediaType": OCI_LAYER, "digest": arm_layer, "size": len(blob)}]}).encode()
    arm_manifest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    with open(os.path.join(blobs, arm_manifest[7:]), "wb") as fh:
        fh.write(manifest)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**amd, "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": arm_manifest, "size": len(manifest), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    ]}
    index_bytes = json.dumps(index).encode()
    index_digest = "sha256:" + hashlib.sha256(index_bytes).hexdigest()
    with open(os.path.join(blobs, index_digest[7:]), "wb") as fh:
        fh.write(index_bytes)
    with open(os.path.join(layout, "index.json"), "w") as fh:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, "digest": index_digest, "size": len(index_bytes),
                                                      "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}, fh)
    dest = f"{registry.host}/test/multi:v1"
    pushed = subprocess.run(["skopeo", "--insecure-policy", "copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{dest}"], capture_output=True, text=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr

    def stored(digest: str) -> bool:
        return digest in puller.moorctl("content", "ls", "-q").stdout.split()

    assert puller.moorctl("images", "pull", "-q", dest).returncode == 0
    assert stored(amd["digest"]) and not stored(arm_layer)
    run = puller.moorctl("run", "--rm", dest, "multi1", "cat", "/arch")
    assert run.returncode == 0 and run.stdout.strip() == "amd64", run.stderr
    chain = puller.moorctl("images", "pull", "--platform", "linux/arm64", "--print-chainid", dest)
    assert chain.returncode == 0, chain.stderr
    assert stored(arm_layer) and "linux/arm64" in chain.stdout
    assert puller.moorctl("images", "rm", dest).returncode == 0
    everything = puller.moorctl("images", "pull", "-q", "--all-platforms", f"{registry.host}/test/multi@{index_digest}")
    assert everything.returncode == 0, everything.stderr
    assert stored(arm_manifest) and stored(amd["digest"])
