"""The registry client against Debian's docker-registry (anonymous, basic, TLS, bearer) and a hostile server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Iterator

import pytest

from moord.actors.registry.client import RegistryClient, parse_reference
from moord.actors.registry.hosts import HostsResolver
from moord.config.model import RegistryConfig
from moord.messages.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from moord.oci import image as oci
from moord.oci.layout import OciLayout
from tests.registry_servers import HostileObject, HostileRegistry, RunningRegistry, docker_registry, free_port, write_hosts_toml

USER, PASSWORD = "moord", "s3cret"


def _desc(data: bytes, media: str = "application/octet-stream") -> dict[str, Any]:
    return {"mediaType": media, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="md-reg-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def anonymous(workdir: str) -> Iterator[RunningRegistry]:
    with docker_registry(workdir) as reg:
        yield reg


@pytest.fixture(scope="module")
def basic(workdir: str) -> Iterator[RunningRegistry]:
    with docker_registry(workdir, auth="htpasswd", users={USER: PASSWORD}) as reg:
        yield reg


@pytest.fixture(scope="module")
def token_tls(workdir: str) -> Iterator[RunningRegistry]:
    with docker_registry(workdir, auth="token", tls=True, users={USER: PASSWORD}, anonymous_pull=True) as reg:
        yield reg


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    with HostileRegistry() as server:
        yield server


def make_client(workdir: str, host: str, server: str, extra: str = "", mirrors: str = "", **settings: Any) -> RegistryClient:
    """A client whose hosts.toml (in a fresh config dir) sends `host` to `server`."""
    config_path = tempfile.mkdtemp(prefix="hosts-", dir=workdir)
    write_hosts_toml(config_path, host, server, extra, mirrors)
    settings.setdefault("retry_backoff", 0.01)
    return RegistryClient(RegistryConfig(config_path=config_path, **settings))


def push_image(client: RegistryClient, ref_text: str, layers: list[bytes], chunk_size: int | None = None) -> tuple[dict[str, Any], bytes]:
    """Push config, layers and an OCI manifest under the reference's tag; (manifest descriptor, bytes)."""
    ref = parse_reference(ref_text)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_desc = _desc(config, oci.MEDIA_TYPE_OCI_CONFIG)
    client.push_blob(ref, config_desc, lambda: io.BytesIO(config))
    layer_descs = []
    for layer in layers:
        desc = _desc(layer, oci.MEDIA_TYPE_OCI_LAYER_GZIP)
        client.push_blob(ref, desc, lambda layer=layer: io.BytesIO(layer), chunk_size=chunk_size)
        layer_descs.append(desc)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, "config": config_desc, "layers": layer_descs}).encode()
    client.push_manifest(ref, oci.MEDIA_TYPE_OCI_MANIFEST, manifest, ref.tag)
    return _desc(manifest, oci.MEDIA_TYPE_OCI_MANIFEST), manifest


# -- real registry ----------------------------------------------------------------------


def test_busybox_push_then_pull_back_byte_identical(workdir: str, anonymous: RunningRegistry, busybox_layout: str) -> None:
    ref = parse_reference(f"{anonymous.host}/library/busybox:1.0")
    with make_client(workdir, anonymous.host, anonymous.url) as client, OciLayout(busybox_layout) as layout:
        target = next(iter(layout.images())).target
        manifest_bytes, manifest = layout.read_document(target["digest"], target["size"], "manifest")
        for desc in [manifest["config"], *manifest["layers"]]:
            client.push_blob(ref, desc, lambda d=desc: layout.open_blob(d["digest"], d["size"]))
        assert client.push_manifest(ref, target["mediaType"], manifest_bytes, "1.0") == target["digest"]

        by_tag = client.resolve(ref)
        assert by_tag == {"mediaType": target["mediaType"], "digest": target["digest"], "size": target["size"]}
        pinned = parse_reference(f"{anonymous.host}/library/busybox@{target['digest']}")
        assert client.resolve(pinned) == by_tag
        assert client.fetch_document(ref, by_tag) == manifest_bytes
        assert client.fetch_document(ref, manifest["config"]) == layout.read_document(manifest["config"]["digest"])[0]
        layer = manifest["layers"][0]
        with client.open_blob(ref, layer) as stream, layout.open_blob(layer["digest"]) as original:
            assert hashlib.sha256(stream.read()).hexdigest() == hashlib.sha256(original.read()).hexdigest()
        with client.open_blob(ref, layer, offset=layer["size"] - 100) as stream:
            assert len(stream.read()) == 100
        assert client.source_label(ref) == (f"containerd.io/distribution.source.{anonymous.host}", "library/busybox")


def test_chunked_push_and_not_found(workdir: str, anonymous: RunningRegistry) -> None:
    blob = os.urandom(100_000)
    with make_client(workdir, anonymous.host, anonymous.url) as client:
        desc, manifest = push_image(client, f"{anonymous.host}/chunked/app:v1", [blob], chunk_size=30_000)
        ref = parse_reference(f"{anonymous.host}/chunked/app:v1")
        with client.open_blob(ref, _desc(blob)) as stream:
            assert stream.read() == blob
        assert client.fetch_document(ref, desc) == manifest
        with pytest.raises(NotFound):
            client.resolve(f"{anonymous.host}/chunked/app:missing")
        with pytest.raises(NotFound):
            client.fetch_document(ref, _desc(b"nothing"))
        with pytest.raises(NotFound):
            with client.open_blob(ref, _desc(b"nothing")):
                pass
        with pytest.raises(InvalidArgument, match="4194304-byte limit"):
            client.fetch_document(ref, {"mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, "digest": desc["digest"], "size": 5 << 20})


def test_cross_repository_mount_and_fallback(workdir: str, anonymous: RunningRegistry) -> None:
    blob = os.urandom(50_000)
    desc = _desc(blob)
    source = parse_reference(f"{anonymous.host}/mount/source:v1")
    target = parse_reference(f"{anonymous.host}/mount/target:v1")

    def refuse() -> io.BytesIO:
        raise AssertionError("the blob should have been mounted, not uploaded")

    with make_client(workdir, anonymous.host, anonymous.url) as client:
        client.push_blob(source, desc, lambda: io.BytesIO(blob))
        assert not client.blob_exists(target, desc)
        client.push_blob(target, desc, refuse, mount_from=source)
        assert client.blob_exists(target, desc)
        client.push_blob(target, desc, refuse)  # exists: skipped
        # The source does not have it: the registry answers 202 and the client uploads.
        other = os.urandom(1000)
        opened = []
        client.push_blob(target, _desc(other), lambda: opened.append(1) or io.BytesIO(other), mount_from=parse_reference(f"{anonymous.host}/mount/empty:v1"))
        assert opened == [1] and client.blob_exists(target, _desc(other))


def test_push_refuses_a_source_of_the_wrong_size(workdir: str, anonymous: RunningRegistry) -> None:
    blob = os.urandom(2000)
    ref = parse_reference(f"{anonymous.host}/wrong/size:v1")
    with make_client(workdir, anonymous.host, anonymous.url) as client:
        with pytest.raises(InvalidArgument, match="source ended"):
            client.push_blob(ref, _desc(blob), lambda: io.BytesIO(blob[:1000]))
        with pytest.raises(InvalidArgument, match="more than"):
            client.push_blob(ref, _desc(blob), lambda: io.BytesIO(blob + b"x"), chunk_size=700)
        assert not client.blob_exists(ref, _desc(blob))
        with pytest.raises(InvalidArgument, match="digest"):
            client.push_manifest(ref, oci.MEDIA_TYPE_OCI_MANIFEST, b"{}", "sha256:" + "0" * 64)


def test_basic_auth(workdir: str, basic: RunningRegistry) -> None:
    creds = {"auths": {basic.host: {"username": USER, "password": PASSWORD}}}
    with make_client(workdir, basic.host, basic.url, **creds) as client:
        desc, manifest = push_image(client, f"{basic.host}/basic/app:v1", [os.urandom(5000)])
        assert client.resolve(f"{basic.host}/basic/app:v1") == desc
    with make_client(workdir, basic.host, basic.url) as anonymous_client:
        with pytest.raises(FailedPrecondition, match="unauthorized: .*no credentials"):
            anonymous_client.resolve(f"{basic.host}/basic/app:v1")
    wrong = {"auths": {basic.host: {"username": USER, "password": "wrong"}}}
    with make_client(workdir, basic.host, basic.url, **wrong) as wrong_client:
        with pytest.raises(FailedPrecondition, match="unauthorized"):
            wrong_client.resolve(f"{basic.host}/basic/app:v1")


def test_bearer_token_over_tls(workdir: str, token_tls: RunningRegistry) -> None:
    assert token_tls.issuer is not None
    ca = f'ca = "{token_tls.ca_cert}"'
    creds = {"auths": {token_tls.host: {"username": USER, "password": PASSWORD}}}
    ref_text = f"{token_tls.host}/token/app:v1"
    with make_client(workdir, token_tls.host, token_tls.url, ca, **creds) as client:
        desc, manifest = push_image(client, ref_text, [os.urandom(20_000), os.urandom(30_000)])
        issued = token_tls.issuer.requests
        for _ in range(3):  # the token is cached per (host, scope)
            assert client.resolve(ref_text) == desc
            assert client.fetch_document(ref_text, desc) == manifest
        assert token_tls.issuer.requests - issued <= 1
    # Anonymous callers get pull-only tokens from this issuer: pulling works, pushing does not.
    with make_client(workdir, token_tls.host, token_tls.url, ca) as anonymous_client:
        assert anonymous_client.fetch_document(ref_text, desc) == manifest
        with pytest.raises(FailedPrecondition, match="unauthorized|denied"):
            anonymous_client.push_manifest(ref_text, oci.MEDIA_TYPE_OCI_MANIFEST, manifest, "v2")
    wrong = {"auths": {token_tls.host: {"username": USER, "password": "wrong"}}}
    with make_client(workdir, token_tls.host, token_tls.url, ca, **wrong) as wrong_client:
        with pytest.raises(FailedPrecondition, match="unauthorized: token server"):
            wrong_client.resolve(ref_text)


def test_tls_needs_the_ca_unless_skip_verify(workdir: str, token_tls: RunningRegistry) -> None:
    ref_text = f"{token_tls.host}/token/none:v1"
    with make_client(workdir, token_tls.host, token_tls.url, retries=0) as client:
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            client.resolve(ref_text)
    with make_client(workdir, token_tls.host, token_tls.url, "skip_verify = true") as client:
        with pytest.raises(NotFound):
            client.resolve(ref_text)


def test_tls_client_certificate(workdir: str) -> None:
    with docker_registry(workdir, tls=True, client_certs=True) as reg:
        assert reg.pki is not None
        ref_text = f"{reg.host}/mtls/app:v1"
        with make_client(workdir, reg.host, reg.url, f'ca = "{reg.ca_cert}"', retries=0) as client:
            with pytest.raises(Unavailable):
                client.resolve(ref_text)
        extra = f'ca = "{reg.ca_cert}"\nclient = [["{reg.pki.client_cert}", "{reg.pki.client_key}"]]'
        with make_client(workdir, reg.host, reg.url, extra) as client:
            desc, _ = push_image(client, ref_text, [b"layer"])
            assert client.resolve(ref_text) == desc


def test_plain_http_only_where_configured(workdir: str, anonymous: RunningRegistry) -> None:
    config_path = tempfile.mkdtemp(prefix="hosts-", dir=workdir)
    with RegistryClient(RegistryConfig(config_path=config_path, retries=0)) as client:
        # No hosts.toml: HTTPS, which a plain-HTTP registry cannot answer.
        with pytest.raises(Unavailable):
            client.resolve(f"{anonymous.host}/library/busybox:1.0")


def test_docker_io_served_by_mirrors_in_order(workdir: str, anonymous: RunningRegistry, hostile: HostileRegistry) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with make_client(workdir, anonymous.host, anonymous.url) as client:
        desc, manifest = push_image(client, f"{anonymous.host}/library/mirrored:v1", [b"mirrored layer"])
    mirrors = (
        f'[host."http://{hostile.host}"]\n  capabilities = ["pull", "resolve"]\n'
        f'[host."http://{anonymous.host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    with make_client(workdir, "docker.io", f"http://{dead}", mirrors=mirrors, retries=0) as client:
        # The first mirror does not have it (404), the second does.
        assert client.resolve("mirrored:v1") == desc
        assert client.fetch_document("docker.io/library/mirrored:v1", desc) == manifest
        with client.open_blob("mirrored:v1", _desc(b"mirrored layer")) as stream:
            assert stream.read() == b"mirrored layer"
        # Push goes only to hosts with the push capability: the dead upstream.
        with pytest.raises(Unavailable):
            client.push_manifest("mirrored:v1", oci.MEDIA_TYPE_OCI_MANIFEST, manifest, "v2")
    endpoints = HostsResolver("").endpoints("docker.io")
    assert [e.base_url for e in endpoints] == ["https://registry-1.docker.io/v2"]


def test_hosts_toml_errors_name_the_file(workdir: str) -> None:
    config_path = tempfile.mkdtemp(prefix="hosts-", dir=workdir)
    path = write_hosts_toml(config_path, "example.com", "https://example.com", extra="this is = not [toml")
    with RegistryClient(RegistryConfig(config_path=config_path)) as client:
        with pytest.raises(InvalidArgument, match=f"{path}: not valid TOML"):
            client.resolve("example.com/a:b")
    write_hosts_toml(config_path, "example.com", "https://example.com", mirrors='[host."https://m"]\n  capabilities = ["fly"]')
    with pytest.raises(InvalidArgument, match="unknown capability 'fly'"):
        HostsResolver(config_path).endpoints("example.com")


def test_download_concurrency_limit(workdir: str, anonymous: RunningRegistry) -> None:
    blob = os.urandom(10_000)
    ref = parse_reference(f"{anonymous.host}/limit/app:v1")
    with make_client(workdir, anonymous.host, anonymous.url, max_concurrent_downloads=1) as client:
        client.push_blob(ref, _desc(blob), lambda: io.BytesIO(blob))
        second_opened = threading.Event()

        def second() -> None:
            with client.open_blob(ref, _desc(blob)) as stream:
                second_opened.set()
                stream.read()

        with client.open_blob(ref, _desc(blob)) as stream:
            thread = threading.Thread(target=second)
            thread.start()
            assert not second_opened.wait(0.3)
            assert stream.read() == blob
        thread.join(10)
        assert second_opened.is_set()


# -- hostile registry -------------------------------------------------------------------


def _hostile_client(workdir: str, hostile: HostileRegistry, **settings: Any) -> RegistryClient:
    settings.setdefault("retries", 2)
    return make_client(workdir, hostile.host, f"http://{hostile.host}", **settings)


def test_resume_after_a_dropped_connection(workdir: str, hostile: HostileRegistry) -> None:
    blob = os.urandom(300_000)
    obj = hostile.put("evil/app", "blobs", _desc(blob)["digest"], HostileObject(blob, mode="drop-once"))
    with _hostile_client(workdir, hostile) as client, client.open_blob(f"{hostile.host}/evil/app:v1", _desc(blob)) as stream:
        assert stream.read() == blob
    assert obj.hits == 2
    # A server that ignores Range still works: the client drops the bytes it has.
    hostile.put("evil/app", "blobs", _desc(blob)["digest"], HostileObject(blob, mode="ignore-range"))
    with _hostile_client(workdir, hostile) as client, client.open_blob(f"{hostile.host}/evil/app:v1", _desc(blob), offset=1000) as stream:
        assert stream.read() == blob[1000:]


def test_retry_after_503(workdir: str, hostile: HostileRegistry) -> None:
    doc = json.dumps({"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX, "manifests": []}).encode()
    obj = hostile.put("evil/app", "manifests", "v1", HostileObject(doc, oci.MEDIA_TYPE_OCI_INDEX, mode="error-once"))
    with _hostile_client(workdir, hostile) as client:
        assert client.resolve(f"{hostile.host}/evil/app:v1") == _desc(doc, oci.MEDIA_TYPE_OCI_INDEX)
    assert obj.hits == 2


@pytest.mark.parametrize(
    "mode, size_delta, error, match",
    [
        ("truncate", 0, Unavailable, "gave up after 2 retries"),
        ("ok", 10, InvalidArgument, "size mismatch"),
        ("ok", -10, InvalidArgument, "size mismatch|more than the descriptor"),
        ("longer", -10, InvalidArgument, "longer than the descriptor"),
        ("redirect-loop", 0, InvalidArgument, "redirect loop"),
    ],
)
def test_hostile_blob_bodies(workdir: str, hostile: HostileRegistry, mode: str, size_delta: int, error: type, match: str) -> None:
    blob = os.urandom(100_000)
    desc = _desc(blob)
    desc["size"] += size_delta
    hostile.put("evil/app", "blobs", desc["digest"], HostileObject(blob, mode=mode))
    with _hostile_client(workdir, hostile) as client:
        with pytest.raises(error, match=match):
            with client.open_blob(f"{hostile.host}/evil/app:v1", desc) as stream:
                while stream.read(65536):
                    pass


def test_stalled_body_times_out(workdir: str, hostile: HostileRegistry) -> None:
    blob = os.urandom(100_000)
    hostile.put("evil/app", "blobs", _desc(blob)["digest"], HostileObject(blob, mode="stall"))
    started = time.monotonic()
    with _hostile_client(workdir, hostile, timeout=0.5, retries=1) as client:
        with pytest.raises(DeadlineExceeded, match="no data for 0.5s"):
            with client.open_blob(f"{hostile.host}/evil/app:v1", _desc(blob)) as stream:
                stream.read()
    assert time.monotonic() - started < 5


def test_hostile_documents(workdir: str, hostile: HostileRegistry) -> None:
    ref = f"{hostile.host}/evil/app"
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX, "manifests": []}).encode()
    with _hostile_client(workdir, hostile) as client:
        # The tag's header names a digest the body does not have (as an index naming itself would).
        claimed = "sha256:" + "ab" * 32
        hostile.put("evil/app", "manifests", "self", HostileObject(index, oci.MEDIA_TYPE_OCI_INDEX, digest_header=claimed))
        desc = client.resolve(f"{ref}:self")
        assert desc["digest"] == claimed
        hostile.put("evil/app", "manifests", claimed, HostileObject(index, oci.MEDIA_TYPE_OCI_INDEX))
        with pytest.raises(InvalidArgument, match="digest mismatch"):
            client.fetch_document(ref + ":self", {**desc, "size": len(index)})
        # Resolving by digest: the registry's Docker-Content-Digest must agree.
        hostile.put("evil/app", "manifests", claimed, HostileObject(index, oci.MEDIA_TYPE_OCI_INDEX, digest_header="sha256:" + "cd" * 32))
        with pytest.raises(InvalidArgument, match="not sha256:abab"):
            client.resolve(f"{ref}@{claimed}")
        # No digest header on HEAD: GET and hash, and the body must agree with a header on GET.
        hostile.put("evil/app", "manifests", "nohead", HostileObject(index, oci.MEDIA_TYPE_OCI_INDEX, mode="no-digest-header"))
        assert client.resolve(f"{ref}:nohead") == _desc(index, oci.MEDIA_TYPE_OCI_INDEX)
        hostile.put("evil/app", "manifests", "nohead", HostileObject(index, oci.MEDIA_TYPE_OCI_INDEX, mode="no-digest-header", digest_header=claimed))
        with pytest.raises(InvalidArgument, match="digest mismatch"):
            client.resolve(f"{ref}:nohead")
        # A 5 MiB manifest: refused before it is read, whether resolved or fetched.
        big = b'{"manifests": [' + b" " * (5 << 20) + b"]}"
        hostile.put("evil/app", "manifests", "big", HostileObject(big, oci.MEDIA_TYPE_OCI_INDEX, mode="no-digest-header"))
        with pytest.raises(InvalidArgument, match="more than the 4194304-byte limit"):
            client.resolve(f"{ref}:big")
        big_desc = _desc(big, oci.MEDIA_TYPE_OCI_INDEX)
        with pytest.raises(InvalidArgument, match="more than the 4194304-byte limit"):
            client.fetch_document(ref + ":big", big_desc)
        # A document that lies about its size.
        hostile.put("evil/app", "manifests", big_desc["digest"], HostileObject(big, oci.MEDIA_TYPE_OCI_INDEX))
        with pytest.raises(InvalidArgument, match="more than 1000 bytes|announces"):
            client.fetch_document(ref + ":big", {**big_desc, "size": 1000})
        # A redirect loop on a manifest.
        hostile.put("evil/app", "manifests", "loop", HostileObject(index, oci.MEDIA_TYPE_OCI_INDEX, mode="redirect-loop"))
        with pytest.raises(InvalidArgument, match="redirect loop"):
            client.resolve(f"{ref}:loop")
        # Malformed descriptors never reach the network.
        for bad in ({"digest": "sha256:../../etc", "size": 1}, {"digest": claimed, "size": -1}, {"digest": claimed, "size": True}, "x"):
            with pytest.raises(InvalidArgument):
                client.fetch_document(ref + ":self", bad)  # type: ignore[arg-type]


def test_hosts_directories_and_settings(workdir: str) -> None:
    config_path = tempfile.mkdtemp(prefix="hosts-", dir=workdir)
    os.makedirs(os.path.join(config_path, "reg.example_5000_"))
    with open(os.path.join(config_path, "reg.example_5000_", "hosts.toml"), "w") as fh:
        fh.write(
            'server = "https://upstream.example/base"\n'
            'capabilities = ["pull", "resolve"]\n'
            '[host."http://127.0.0.1:1/custom/api"]\n  capabilities = ["pull"]\n  override_path = true\n  ca = ["a.pem"]\n'
            '  client = "both.pem"\n  skip_verify = true\n  [host."http://127.0.0.1:1/custom/api".header]\n    x-one = "1"\n'
        )
    os.makedirs(os.path.join(config_path, "_default"))
    with open(os.path.join(config_path, "_default", "hosts.toml"), "w") as fh:
        fh.write('[host."https://fallback.example"]\n  capabilities = ["pull"]\n')
    resolver = HostsResolver(config_path)
    mirror, upstream = resolver.endpoints("reg.example:5000")
    assert mirror.base_url == "http://127.0.0.1:1/custom/api" and mirror.is_mirror and mirror.skip_verify
    assert mirror.ca == (os.path.join(config_path, "reg.example_5000_", "a.pem"),) and mirror.headers == (("x-one", "1"),)
    assert mirror.client_pairs == ((os.path.join(config_path, "reg.example_5000_", "both.pem"), ""),)
    assert upstream.base_url == "https://upstream.example/base/v2" and upstream.capabilities == {"pull", "resolve"}
    fallback, other = resolver.endpoints("other.example")
    assert fallback.base_url == "https://fallback.example/v2" and fallback.capabilities == {"pull"}
    assert other.base_url == "https://other.example/v2" and other.capabilities == {"pull", "resolve", "push"}
    with RegistryClient(RegistryConfig(config_path=config_path)) as client:
        with pytest.raises(FailedPrecondition, match="push capability"):
            client.push_manifest("reg.example:5000/a:b", oci.MEDIA_TYPE_OCI_MANIFEST, b"{}", "b")
