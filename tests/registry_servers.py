"""Registries for tests: Debian's docker-registry (distribution 2.8) in four setups, and a hostile one.

- `docker_registry(workdir, auth=None|"htpasswd"|"token", tls=False)` starts the real
  registry on a free 127.0.0.1 port with a generated config.yml and storage dir; with
  `tls` it serves a certificate signed by a CA generated here; with `token` it trusts a
  `TokenIssuer` (a small realm that signs JWTs with a generated RSA key whose
  self-signed certificate is the registry's rootcertbundle).
- `HostileRegistry` is an http.server that lies in the ways a registry can: wrong digest,
  wrong size, truncated or stalled bodies, a connection dropped once mid-body, redirect
  loops, oversized manifests, bodies longer than announced.

Every process started here is killed and waited for, and every thread joined, by the
context managers, whatever the test did.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REGISTRY_BINARY = "/usr/bin/docker-registry"
TOKEN_SERVICE = "moord-test-registry"
TOKEN_ISSUER = "moord-test-issuer"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on the port (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# -- PKI ---------------------------------------------------------------------------------


def _write_key(path: str, key: rsa.RSAPrivateKey) -> None:
    with open(path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None, issuer_key: rsa.RSAPrivateKey | None, ca: bool, sans: list[str] = ()) -> x509.Certificate:  # type: ignore[assignment]
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        entries: list[x509.GeneralName] = []
        for san in sans:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                entries.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@dataclass
class Pki:
    """A generated CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""

    directory: str
    ca_cert: str = ""
    server_cert: str = ""
    server_key: str = ""
    client_cert: str = ""
    client_key: str = ""

    @classmethod
    def create(cls, directory: str) -> "Pki":
        """Write ca.pem, server.pem/server.key and client.pem/client.key into `directory`."""
        pki = cls(directory)
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca = _cert("moord test CA", ca_key, None, None, ca=True)
        server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        server = _cert("127.0.0.1", server_key, ca, ca_key, ca=False, sans=["127.0.0.1", "localhost"])
        client_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        client = _cert("moord test client", client_key, ca, ca_key, ca=False)
        pki.ca_cert = os.path.join(directory, "ca.pem")
        pki.server_cert, pki.server_key = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
        pki.client_cert, pki.client_key = os.path.join(directory, "client.pem"), os.path.join(directory, "client.key")
        _write_cert(pki.ca_cert, ca)
        _write_cert(pki.server_cert, server)
        _write_key(pki.server_key, server_key)
        _write_cert(pki.client_cert, client)
        _write_key(pki.client_key, client_key)
        return pki


# -- htpasswd ----------------------------------------------------------------------------


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash ($2b$) from libxcrypt (Debian's essential libcrypt1): no PyPI bcrypt needed."""
    lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)  # cost 5: fast enough for tests
    hashed = lib.crypt(password.encode(), salt)
    if not hashed or not hashed.startswith(b"$2b$"):
        raise RuntimeError("libcrypt cannot make bcrypt hashes")
    return hashed.decode()


class QuietServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that does not print clients hanging up on it (tests do that on purpose)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


# -- token issuer ------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A docker token realm: GET /token?service=&scope= answers a JWT the registry trusts.

    Users in `users` get every action they ask for; anonymous callers get `pull` only
    when `anonymous_pull`, else 401. `requests` counts issued tokens (to see caching).
    """

    def __init__(self, directory: str, users: dict[str, str], anonymous_pull: bool = False, lifetime: int = 300) -> None:
        self.users = users
        self.anonymous_pull = anonymous_pull
        self.lifetime = lifetime
        self.requests = 0
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = _cert("moord token issuer", self.key, None, None, ca=True)
        self.cert_path = os.path.join(directory, "token-issuer.pem")
        _write_cert(self.cert_path, self.cert)
        self._server: QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        """The URL registries send clients to."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        """A JWT for `subject` granting `access`, with the issuer's certificate in x5c."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE, "exp": now + self.lifetime, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user else [a for a in wanted if a == "pull"]
            if kind == "repository" and name and allowed:
                access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def __enter__(self) -> "TokenIssuer":
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if issuer.users.get(name) != password:
                        return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    user = name
                elif not issuer.anonymous_pull:
                    return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "credentials required"}]})
                if url.path != "/token" or query.get("service") != [TOKEN_SERVICE]:
                    return self._answer(400, {"errors": [{"code": "BAD_REQUEST", "message": "wrong service"}]})
                issuer.requests += 1
                token = issuer.sign(user or "", issuer._grant(user, query.get("scope", [])))
                self._answer(200, {"token": token, "expires_in": issuer.lifetime})

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# -- docker-registry ---------------------------------------------------------------------


@dataclass
class RunningRegistry:
    """A started docker-registry: where it listens and how to trust and log into it."""

    host: str
    url: str
    storage: str
    ca_cert: str = ""
    users: dict[str, str] = field(default_factory=dict)
    issuer: TokenIssuer | None = None
    pki: Pki | None = None


@contextlib.contextmanager
def docker_registry(
    workdir: str,
    auth: str | None = None,
    tls: bool = False,
    users: dict[str, str] | None = None,
    anonymous_pull: bool = False,
    client_certs: bool = False,
) -> Iterator[RunningRegistry]:
    """Run Debian's docker-registry on 127.0.0.1 with `auth` None, "htpasswd" or "token".

    `tls` serves HTTPS with a generated CA; `client_certs` also demands a client certificate signed by it.
    """
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise RuntimeError(f"{REGISTRY_BINARY} is missing: install Debian's docker-registry")
    users = dict(users or {"moord": "s3cret"})
    directory = tempfile.mkdtemp(prefix="registry-", dir=workdir)
    storage = os.path.join(directory, "storage")
    os.mkdir(storage)
    port = free_port()
    pki = Pki.create(directory) if tls else None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{port}",
            f"  secret: {uuid.uuid4().hex}",
        ]
        if pki:
            lines += ["  tls:", f"    certificate: {pki.server_cert}", f"    key: {pki.server_key}"]
            if client_certs:
                lines += ["    clientcas:", f"      - {pki.ca_cert}"]
        issuer = None
        if auth == "htpasswd":
            htpasswd = os.path.join(directory, "htpasswd")
            with open(htpasswd, "w") as fh:
                fh.writelines(f"{name}:{bcrypt_hash(pw)}\n" for name, pw in users.items())
            lines += ["auth:", "  htpasswd:", "    realm: moord-test", f"    path: {htpasswd}"]
        elif auth == "token":
            issuer = stack.enter_context(TokenIssuer(directory, users, anonymous_pull))
            lines += [
                "auth:",
                "  token:",
                f"    realm: {issuer.realm}",
                f"    service: {TOKEN_SERVICE}",
                f"    issuer: {TOKEN_ISSUER}",
                f"    rootcertbundle: {issuer.cert_path}",
            ]
        elif auth is not None:
            raise ValueError(f"unknown auth {auth!r}")
        config = os.path.join(directory, "config.yml")
        with open(config, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        log = open(os.path.join(directory, "registry.log"), "wb")
        stack.callback(log.close)
        proc = subprocess.Popen([REGISTRY_BINARY, "serve", config], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        stack.callback(stop)
        try:
            wait_for_port(port, proc)
        except RuntimeError:
            log.flush()
            with open(os.path.join(directory, "registry.log"), "rb") as fh:
                raise RuntimeError(f"docker-registry did not start: {fh.read()[-2000:].decode(errors='replace')}") from None
        host = f"127.0.0.1:{port}"
        yield RunningRegistry(host, f"{'https' if tls else 'http'}://{host}", storage, pki.ca_cert if pki else "", users, issuer, pki)


def write_hosts_toml(config_path: str, registry_host: str, server: str, extra: str = "", mirrors: str = "") -> str:
    """Write `<config_path>/<registry_host>/hosts.toml` with `server`, root keys `extra`, and mirror tables."""
    directory = os.path.join(config_path, registry_host)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "hosts.toml")
    with open(path, "w") as fh:
        fh.write(f'server = "{server}"\n{extra}\n{mirrors}\n')
    return path


# -- the hostile registry ----------------------------------------------------------------


@dataclass
class HostileObject:
    """What the hostile server serves at a path, and how it misbehaves.

    mode: "ok", "truncate" (always cut at half), "drop-once" (cut at half once, then
    honest with Range), "stall" (half, then silence), "longer" (no Content-Length, more
    bytes than anyone expects), "redirect-loop", "no-digest-header" (manifests: HEAD without
    Docker-Content-Digest), "ignore-range" (answers 200 to Range requests), "error-once"
    (503 first, then honest).
    """

    data: bytes
    media_type: str = "application/octet-stream"
    mode: str = "ok"
    digest_header: str = ""
    hits: int = 0


class HostileRegistry:
    """An http.server speaking just enough of the distribution API to lie convincingly."""

    def __init__(self) -> None:
        self.objects: dict[str, HostileObject] = {}  # path (/v2/<repo>/<kind>/<ref>) -> object
        self.stop_event = threading.Event()
        self._server: QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """`127.0.0.1:<port>`."""
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def put(self, repository: str, kind: str, name: str, obj: HostileObject) -> HostileObject:
        """Serve `obj` at /v2/<repository>/<kind>/<name>."""
        self.objects[f"/v2/{repository}/{kind}/{name}"] = obj
        return obj

    def __enter__(self) -> "HostileRegistry":
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path == "/v2/":
                    return self._plain(200, b"{}")
                obj = registry.objects.get(path)
                if obj is None:
                    return self._plain(404, b'{"errors":[{"code":"NOT_FOUND","message":"no such thing"}]}')
                obj.hits += 1
                if obj.mode == "error-once" and obj.hits == 1:
                    return self._plain(503, b'{"errors":[{"code":"UNAVAILABLE","message":"try again"}]}')
                if obj.mode == "redirect-loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = obj.data
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and obj.mode != "ignore-range":
                    start = int(ranged[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", obj.media_type)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                digest = obj.digest_header or "sha256:" + hashlib.sha256(data).hexdigest()
                if not (head and obj.mode == "no-digest-header"):
                    self.send_header("Docker-Content-Digest", digest)
                if obj.mode == "longer":
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if head:
                    return
                body = data[start:]
                half = len(data) // 2
                if obj.mode == "truncate" or (obj.mode == "drop-once" and obj.hits == 1):
                    self.wfile.write(body[: max(half - start, 1)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if obj.mode == "stall":
                    self.wfile.write(data[start : max(half, start)])
                    self.wfile.flush()
                    registry.stop_event.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _plain(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self._server = QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hostile-registry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self.stop_event.set()  # releases stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
