"""Registry hosts in the spirit of containerd's hosts.toml (remotes/docker/config).

For a registry name (`docker.io`, `127.0.0.1:5000`) the directory
`<config_path>/<host>` (also `<host>_<port>_` and `_default`) may hold a `hosts.toml`:

    server = "https://registry.example"      # the upstream (default: the name itself)
    [host."http://127.0.0.1:5000"]            # mirrors, tried in file order
      capabilities = ["pull", "resolve"]
      ca = "ca.pem"                           # or a list; relative to the directory
      client = [["client.pem", "client.key"]]
      skip_verify = false
      override_path = false
      [host."http://127.0.0.1:5000".header]
        x-custom = "value"

Mirrors come first, the upstream server last. Plain HTTP is used only where a URL in
hosts.toml says `http://`; everything else is HTTPS. `docker.io` means
`registry-1.docker.io`. A file that does not parse is an InvalidArgument naming it.
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from moord.messages.errors import InvalidArgument

CAPABILITIES = ("pull", "resolve", "push")
DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
HOSTS_FILE = "hosts.toml"


@dataclass(frozen=True)
class RegistryEndpoint:
    """One place to talk to for a registry name: a mirror or the upstream server."""

    scheme: str
    host: str
    path: str
    capabilities: frozenset[str] = frozenset(CAPABILITIES)
    ca: tuple[str, ...] = ()
    client_pairs: tuple[tuple[str, str], ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    is_mirror: bool = False
    source: str = field(default="", compare=False)

    @property
    def base_url(self) -> str:
        """The API root, e.g. `https://registry-1.docker.io/v2`."""
        return f"{self.scheme}://{self.host}{self.path}"

    def tls_key(self) -> tuple[Any, ...]:
        """What an HTTP client for this endpoint depends on (one pooled client per key)."""
        return (self.scheme, self.host, self.ca, self.client_pairs, self.skip_verify)

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The TLS settings: system CAs plus `ca`, client certificates, or no verification."""
        if self.scheme != "https" or not (self.skip_verify or self.ca or self.client_pairs):
            # Also for plain HTTP: a redirect may lead to HTTPS blob storage.
            return default_tls_context()
        ctx = ssl.create_default_context()
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        for path in self.ca:
            try:
                ctx.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(f"{self.source or 'registry'}: cannot load CA {path}: {exc}") from None
        for cert, key in self.client_pairs:
            try:
                ctx.load_cert_chain(cert, key or None)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(f"{self.source or 'registry'}: cannot load client certificate {cert}: {exc}") from None
        return ctx


@functools.lru_cache(maxsize=1)
def default_tls_context() -> ssl.SSLContext:
    """The verifying TLS context (certifi's CAs, as httpx's default), built once per process:
    httpx would build one per client, ~0.2 s each."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def host_directories(config_path: str, host: str) -> list[str]:
    """Directories searched for `host`, as containerd does: `h_port_`, `h:port`, `_default`."""
    if not config_path or "/" in host or host in ("", ".", ".."):
        return []
    names = []
    head, colon, port = host.rpartition(":")
    if colon and head:
        names.append(f"{head}_{port}_")
    names += [host, "_default"]
    return [os.path.join(config_path, n) for n in names]


def default_endpoint(host: str) -> RegistryEndpoint:
    """The upstream of a registry name when nothing is configured: HTTPS, all capabilities."""
    api_host = DOCKER_HUB_API_HOST if host == DOCKER_HUB else host
    return RegistryEndpoint("https", api_host, "/v2")


def _string_list(value: Any, what: str, source: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgument(f"{source}: {what} must be a string or a list of strings")


def _abs(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _endpoint(server: str, section: dict[str, Any], base: str, source: str, default_host: str, is_mirror: bool) -> RegistryEndpoint:
    """One endpoint from a `server` URL (empty: the default upstream) and its settings."""
    known = {"capabilities", "ca", "client", "skip_verify", "header", "override_path"}
    unknown = set(section) - known - ({"server", "host"} if not is_mirror else set())
    if unknown:
        raise InvalidArgument(f"{source}: unknown key(s) {sorted(unknown)}")
    override_path = section.get("override_path", False)
    if not isinstance(override_path, bool):
        raise InvalidArgument(f"{source}: override_path must be a boolean")
    if server:
        if not server.startswith(("http://", "https://")):
            if "://" in server:
                raise InvalidArgument(f"{source}: unsupported URL scheme in {server!r}")
            server = "https://" + server
        url = urllib.parse.urlsplit(server)
        if not url.hostname or url.query or url.fragment or url.username:
            raise InvalidArgument(f"{source}: bad server URL {server!r}")
        path = os.path.normpath(url.path) if url.path not in ("", "/") else ""
        if not override_path and not path.endswith("/v2"):
            path = path.rstrip("/") + "/v2"
        scheme, netloc = url.scheme, url.netloc
    else:
        upstream = default_endpoint(default_host)
        scheme, netloc, path = upstream.scheme, upstream.host, upstream.path
    caps = section.get("capabilities")
    if caps is None:
        capabilities = frozenset(CAPABILITIES)
    else:
        names = [c.lower() for c in _string_list(caps, "capabilities", source)]
        bad = [c for c in names if c not in CAPABILITIES]
        if bad:
            raise InvalidArgument(f"{source}: unknown capability {bad[0]!r} (use pull, resolve, push)")
        capabilities = frozenset(names)
    ca = tuple(_abs(p, base) for p in _string_list(section["ca"], "ca", source)) if "ca" in section else ()
    pairs: list[tuple[str, str]] = []
    client = section.get("client")
    if client is not None:
        entries = [client] if isinstance(client, str) else client
        if not isinstance(entries, list):
            raise InvalidArgument(f"{source}: client must be a path, a list of paths, or a list of [cert, key] pairs")
        for entry in entries:
            if isinstance(entry, str):
                pairs.append((_abs(entry, base), ""))
            elif isinstance(entry, list) and len(entry) == 2 and all(isinstance(p, str) for p in entry):
                pairs.append((_abs(entry[0], base), _abs(entry[1], base)))
            else:
                raise InvalidArgument(f"{source}: bad client entry {entry!r:.100}")
    skip_verify = section.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise InvalidArgument(f"{source}: skip_verify must be a boolean")
    headers: list[tuple[str, str]] = []
    for key, value in (section.get("header") or {}).items():
        for v in _string_list(value, f"header {key}", source):
            headers.append((str(key), v))
    return RegistryEndpoint(scheme, netloc, path, capabilities, ca, tuple(pairs), skip_verify, tuple(headers), is_mirror, source)


def parse_hosts_file(data: bytes, directory: str, host: str, source: str) -> list[RegistryEndpoint]:
    """The endpoints a hosts.toml describes: its mirrors in order, then the server."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"{source}: not valid TOML: {exc}") from None
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise InvalidArgument(f"{source}: server must be a string")
    mirrors = doc.get("host", {})
    if not isinstance(mirrors, dict):
        raise InvalidArgument(f"{source}: host must be a table of URLs")
    endpoints = []
    for url, section in mirrors.items():  # tomllib keeps the file's order
        if not isinstance(section, dict):
            raise InvalidArgument(f"{source}: host.{url!r} must be a table")
        endpoints.append(_endpoint(url, section, directory, f"{source}: host {url!r}", host, True))
    endpoints.append(_endpoint(server, doc, directory, source, host, False))
    return endpoints


class HostsResolver:
    """Endpoints per registry name, read from `config_path` and reloaded when a file changes."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[str, int], list[RegistryEndpoint]]] = {}

    def endpoints(self, host: str) -> list[RegistryEndpoint]:
        """Mirrors in order, then the upstream server."""
        for directory in host_directories(self.config_path, host):
            if not os.path.isdir(directory):
                continue
            path = os.path.join(directory, HOSTS_FILE)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                # A directory without hosts.toml may still hold certificates (docker's certs.d).
                return [self._certs_dir_endpoint(directory, host)]
            stamp = (path, st.st_mtime_ns)
            with self._lock:
                cached = self._cache.get(host)
                if cached and cached[0] == stamp:
                    return cached[1]
            try:
                with open(path, "rb") as fh:
                    data = fh.read(1 << 20)
            except OSError as exc:
                raise InvalidArgument(f"{path}: {exc.strerror}") from None
            found = parse_hosts_file(data, directory, host, path)
            with self._lock:
                self._cache[host] = (stamp, found)
            return found
        return [default_endpoint(host)]

    @staticmethod
    def _certs_dir_endpoint(directory: str, host: str) -> RegistryEndpoint:
        """docker's certs.d layout: `*.crt` CAs and `*.cert`/`*.key` client pairs."""
        upstream = default_endpoint(host)
        names = sorted(os.listdir(directory))
        ca = tuple(os.path.join(directory, n) for n in names if n.endswith(".crt"))
        pairs = tuple(
            (os.path.join(directory, n), os.path.join(directory, n[:-5] + ".key"))
            for n in names
            if n.endswith(".cert") and n[:-5] + ".key" in names
        )
        return RegistryEndpoint(upstream.scheme, upstream.host, upstream.path, ca=ca, client_pairs=pairs, source=directory)
