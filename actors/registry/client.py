"""The OCI distribution client used by the images process to pull and push.

One RegistryClient is shared by every pull and push thread of the process: one pooled
httpx.Client per endpoint, authorization learned once per host, and at most
`max_concurrent_downloads` blob bodies streaming from one registry at a time.

Nothing from a registry is trusted: documents are size-capped before they are read and
checked against their digest, blob bodies are cut at their descriptor's size (the
content store verifies their digest on commit), redirects are bounded, and every
failure is one of moord's typed errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import threading
import time
import urllib.parse
from typing import Any, BinaryIO, Callable, Iterator

import httpx

from moord.actors.registry.auth import Authorizer, error_detail, repository_scope
from moord.actors.registry.hosts import HostsResolver, RegistryEndpoint
from moord.oci.reference import Reference, parse_reference
from moord.config.model import RegistryConfig
from moord.messages.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MoordError,
    NotFound,
    OutOfRange,
    Unavailable,
)
from moord.oci.image import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
)

__all__ = ["RegistryClient", "Reference", "parse_reference", "BlobStream", "MANIFEST_ACCEPT", "SOURCE_LABEL_PREFIX"]

# What resolve and manifest fetches accept, as containerd sends it.
MANIFEST_ACCEPT = ", ".join((MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, "*/*"))
SOURCE_LABEL_PREFIX = "containerd.io/distribution.source."
MAX_REDIRECTS = 5
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_MAX = 5.0
# Error bodies are read only this far: they are for the message, nothing else.
ERROR_BODY_LIMIT = 64 * 1024
# A resumed blob download that made this much progress gets its retry budget back.
RESUME_PROGRESS_RESET = 1 << 20
UPLOAD_CHUNK = 1 << 20
USER_AGENT = "moord/0.1"
_DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})", re.ASCII)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)", re.ASCII)


def _hash(digest: str, data: bytes) -> str:
    """`data`'s digest with the algorithm `digest` names."""
    algorithm = digest.partition(":")[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def check_descriptor(desc: Any) -> tuple[str, int, str]:
    """(digest, size, mediaType) of an OCI descriptor; InvalidArgument when it is malformed."""
    if not isinstance(desc, dict):
        raise InvalidArgument(f"descriptor must be an object, not {type(desc).__name__}")
    digest, size, media = desc.get("digest"), desc.get("size"), desc.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise InvalidArgument(f"descriptor has an invalid digest {str(digest)[:100]!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"descriptor {digest} has an invalid size {size!r:.50}")
    if not isinstance(media, str):
        raise InvalidArgument(f"descriptor {digest} has an invalid mediaType")
    return digest, size, media


def _media_type(header: str) -> str:
    return header.split(";", 1)[0].strip().lower()


def _sniff_media_type(body: bytes) -> str:
    """A manifest's type from its own `mediaType` (or its shape) when the server sent none."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidArgument("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("manifest is not a JSON object")
    media = doc.get("mediaType")
    if isinstance(media, str) and media in INDEX_TYPES | MANIFEST_TYPES:
        return media
    if "manifests" in doc:
        return MEDIA_TYPE_OCI_INDEX
    if "config" in doc and "layers" in doc:
        return MEDIA_TYPE_OCI_MANIFEST
    raise InvalidArgument(f"unsupported manifest media type {str(media)[:100]!r}")


def _read_body(response: httpx.Response, limit: int, what: str) -> bytes:
    """The body, refused (before it is all read) when it exceeds `limit` bytes."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise InvalidArgument(f"{what}: the registry announces {int(length)} bytes, more than the {limit}-byte limit")
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_raw():
            total += len(chunk)
            if total > limit:
                raise InvalidArgument(f"{what}: the registry sent more than {limit} bytes")
            parts.append(chunk)
    except httpx.TimeoutException as exc:
        raise DeadlineExceeded(f"{what}: reading the body timed out ({exc})") from None
    except httpx.TransportError as exc:
        raise Unavailable(f"{what}: reading the body failed: {exc}") from None
    return b"".join(parts)


def _error_body(response: httpx.Response) -> bytes:
    try:
        return _read_body(response, ERROR_BODY_LIMIT, "error body")
    except MoordError:
        return b""


def _status_error(response: httpx.Response, what: str) -> MoordError:
    """The typed error for a non-success answer."""
    code = response.status_code
    detail = error_detail(_error_body(response)) if response.request.method != "HEAD" else ""
    if code == 401:
        return FailedPrecondition(f"unauthorized: {what}{detail}")
    if code == 403:
        return FailedPrecondition(f"denied: {what}{detail}")
    if code == 404:
        return NotFound(f"{what}: not found{detail}")
    if code in RETRY_STATUSES:
        return Unavailable(f"{what}: the registry answered {code}{detail}")
    if code == 416:
        return OutOfRange(f"{what}: range not satisfiable{detail}")
    return InvalidArgument(f"{what}: the registry answered {code}{detail}")



def _read_bodies_in_larger_pieces() -> None:
    """httpcore reads a body 64 KiB at a time, each piece through h11's Python parser:
    on a fast registry that parsing is most of a download's CPU. 1 MiB pieces cut it ~16x."""
    try:
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:  # another httpcore layout: the default still works
        return
    HTTP11Connection.READ_NUM_BYTES = max(HTTP11Connection.READ_NUM_BYTES, 1 << 20)


_read_bodies_in_larger_pieces()

class RegistryClient:
    """OCI distribution API: resolve, fetch documents and blobs, push. Thread-safe."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.hosts = HostsResolver(config.config_path)
        self.authorizer = Authorizer(self._credentials)
        self._lock = threading.Lock()
        self._clients: dict[tuple[Any, ...], httpx.Client] = {}
        self._download_slots: dict[str, threading.BoundedSemaphore] = {}
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _credentials(self, host: str) -> tuple[str, str] | None:
        entry = self.config.auths.get(host)
        return (entry["username"], entry.get("password", "")) if entry else None

    def _http(self, endpoint: RegistryEndpoint) -> httpx.Client:
        key = endpoint.tls_key()
        with self._lock:
            if self._closed:
                raise Unavailable("registry client is closed")
            client = self._clients.get(key)
            if client is None:
                timeout = self.config.timeout
                client = httpx.Client(
                    verify=endpoint.ssl_context(),
                    timeout=httpx.Timeout(timeout, connect=timeout),
                    max_redirects=MAX_REDIRECTS,
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                    headers={"User-Agent": USER_AGENT},
                )
                self._clients[key] = client
            return client

    def _endpoints(self, ref: Reference, capability: str) -> list[RegistryEndpoint]:
        found = [e for e in self.hosts.endpoints(ref.host) if capability in e.capabilities]
        if not found:
            raise FailedPrecondition(f"no registry host for {ref.host} has the {capability} capability")
        return found

    @staticmethod
    def _ref(ref: Reference | str) -> Reference:
        return ref if isinstance(ref, Reference) else parse_reference(ref)

    @staticmethod
    def _url(endpoint: RegistryEndpoint, ref: Reference, kind: str, obj: str = "") -> str:
        return f"{endpoint.base_url}/{ref.repository}/{kind}/{obj}"

    @staticmethod
    def _params(endpoint: RegistryEndpoint, ref: Reference) -> dict[str, str]:
        # A mirror serves many registries: containerd names the one meant in `ns`.
        return {"ns": ref.host} if endpoint.is_mirror else {}

    def _backoff(self, attempt: int) -> None:
        time.sleep(min(self.config.retry_backoff * (2 ** max(attempt - 1, 0)), BACKOFF_MAX))

    def _send(
        self,
        endpoint: RegistryEndpoint,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        content: Callable[[], Any] | None = None,
        retries: int | None = None,
    ) -> httpx.Response:
        """Send one request (streamed: the caller closes the response), with auth and retries.

        Connection failures, timeouts and 5xx/429 answers are retried with backoff; a
        401 is answered once with what the challenge asks for.
        """
        client = self._http(endpoint)
        if params:
            # httpx replaces a URL's query with `params`; upload URLs carry state in theirs.
            url = str(httpx.URL(url).copy_merge_params(params))
        budget = self.config.retries if retries is None else retries
        attempt = 0
        auth_retried = False
        what = f"{method} {url}"
        while True:
            request_headers = dict(endpoint.headers)
            request_headers.update(headers or {})
            authorization = None
            # Credentials go only to the endpoint itself, never to where an upload URL points elsewhere.
            if urllib.parse.urlsplit(url).netloc in ("", endpoint.host):
                authorization = self.authorizer.authorization(endpoint.host, scopes, client)
            if authorization:
                request_headers["Authorization"] = authorization
            error: MoordError
            try:
                request = client.build_request(method, url, headers=request_headers, content=content() if content else None)
                response = client.send(request, stream=True, follow_redirects=True)
            except httpx.TooManyRedirects:
                raise InvalidArgument(f"{what}: more than {MAX_REDIRECTS} redirects (a redirect loop?)") from None
            except httpx.TimeoutException as exc:
                error = DeadlineExceeded(f"{what}: timed out after {self.config.timeout}s ({exc.__class__.__name__})")
            except httpx.TransportError as exc:
                error = Unavailable(f"{what}: {exc or exc.__class__.__name__}")
            else:
                if response.status_code == 401 and not auth_retried:
                    body = _error_body(response)
                    response.close()
                    self.authorizer.unauthorized(endpoint.host, response, body, scopes, authorization is not None)
                    auth_retried = True
                    continue
                if response.status_code not in RETRY_STATUSES or attempt >= budget:
                    return response
                error = _status_error(response, what)
                response.close()
            attempt += 1
            if attempt > budget:
                raise error
            self._backoff(attempt)

    # -- resolve and fetch ------------------------------------------------------------

    def resolve(self, ref: Reference | str) -> dict[str, Any]:
        """The descriptor ({mediaType, digest, size}) that `ref`'s tag or digest names.

        Mirrors with the resolve capability are asked first, then the upstream; a
        mirror that does not have it (or cannot be reached) passes to the next.
        """
        ref = self._ref(ref)
        if not ref.object:
            raise InvalidArgument(f"{ref}: a reference needs a tag or a digest to be resolved")
        last: MoordError | None = None
        for endpoint in self._endpoints(ref, "resolve"):
            try:
                return self._resolve_at(endpoint, ref)
            except (NotFound, Unavailable, DeadlineExceeded) as exc:
                last = exc
        assert last is not None
        raise last

    def _resolve_at(self, endpoint: RegistryEndpoint, ref: Reference) -> dict[str, Any]:
        url = self._url(endpoint, ref, "manifests", ref.object)
        scopes = (repository_scope(ref.repository),)
        what = f"{ref} at {endpoint.host}"
        headers = {"Accept": MANIFEST_ACCEPT}
        params = self._params(endpoint, ref)
        with contextlib.closing(self._send(endpoint, "HEAD", url, scopes, headers, params)) as response:
            if response.status_code == 200:
                header_digest = response.headers.get("docker-content-digest", "")
                media = _media_type(response.headers.get("content-type", ""))
                length = response.headers.get("content-length", "")
                if ref.digest and header_digest and header_digest != ref.digest:
                    raise InvalidArgument(f"{what}: the registry answered with digest {header_digest[:80]!r}, not {ref.digest}")
                digest = ref.digest or header_digest
                known = media in INDEX_TYPES or media in MANIFEST_TYPES
                if _DIGEST_RE.fullmatch(digest) and length.isdigit() and known:
                    return {"mediaType": media, "digest": digest, "size": int(length)}
            elif response.status_code not in (400, 405, 501):
                # HEAD may be unsupported (405, 501); anything else is the answer.
                raise _status_error(response, what)
        # No usable HEAD: GET the manifest and hash it.
        with contextlib.closing(self._send(endpoint, "GET", url, scopes, headers, params)) as response:
            if response.status_code != 200:
                raise _status_error(response, what)
            body = _read_body(response, MAX_MANIFEST_BYTES, f"manifest {what}")
            header_digest = response.headers.get("docker-content-digest", "")
            media = _media_type(response.headers.get("content-type", ""))
        expected = ref.digest or (header_digest if _DIGEST_RE.fullmatch(header_digest) else "")
        actual = _hash(expected or "sha256:", body)
        if expected and actual != expected:
            raise InvalidArgument(f"{what}: manifest digest mismatch: expected {expected}, got {actual}")
        if media not in INDEX_TYPES and media not in MANIFEST_TYPES:
            media = _sniff_media_type(body)
        return {"mediaType": media, "digest": actual, "size": len(body)}

    def fetch_document(self, ref: Reference | str, desc: dict[str, Any], limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """A manifest, index or config blob, its size and digest verified; at most `limit` bytes."""
        ref = self._ref(ref)
        digest, size, media = check_descriptor(desc)
        if size > limit:
            raise InvalidArgument(f"{ref}: {media or 'document'} {digest} has {size} bytes, more than the {limit}-byte limit")
        is_manifest = media in INDEX_TYPES or media in MANIFEST_TYPES
        kinds = ("manifests", "blobs") if is_manifest else ("blobs",)
        scopes = (repository_scope(ref.repository),)
        last: MoordError | None = None
        for endpoint in self._endpoints(ref, "pull"):
            for kind in kinds:
                what = f"{ref}: {digest} at {endpoint.host}"
                headers = {"Accept": MANIFEST_ACCEPT if kind == "manifests" else "*/*", "Accept-Encoding": "identity"}
                try:
                    response = self._send(endpoint, "GET", self._url(endpoint, ref, kind, digest), scopes, headers, self._params(endpoint, ref))
                except (Unavailable, DeadlineExceeded) as exc:
                    last = exc
                    break
                with contextlib.closing(response):
                    if response.status_code == 404:
                        last = _status_error(response, what)
                        continue
                    if response.status_code != 200:
                        raise _status_error(response, what)
                    body = _read_body(response, size, what)
                if len(body) != size:
                    raise InvalidArgument(f"{what}: size mismatch: the descriptor says {size} bytes, the registry sent {len(body)}")
                actual = _hash(digest, body)
                if actual != digest:
                    raise InvalidArgument(f"{what}: digest mismatch: got {actual}")
                return body
        assert last is not None
        raise last

    def _download_slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._download_slots.get(host)
            if slot is None:
                slot = self._download_slots[host] = threading.BoundedSemaphore(self.config.max_concurrent_downloads)
            return slot

    @contextlib.contextmanager
    def open_blob(self, ref: Reference | str, desc: dict[str, Any], offset: int = 0) -> Iterator["BlobStream"]:
        """A readable stream of the blob's raw bytes from `offset` (at most its size).

        At most `max_concurrent_downloads` blobs stream from one registry at once; a body
        cut off mid-way is resumed with a Range request, within the retry budget.
        """
        ref = self._ref(ref)
        digest, size, _ = check_descriptor(desc)
        if not isinstance(offset, int) or not 0 <= offset <= size:
            raise OutOfRange(f"{ref}: offset {offset!r:.40} outside blob {digest} of {size} bytes")
        slot = self._download_slot(ref.host)
        slot.acquire()
        try:
            stream = BlobStream(self, ref, digest, size, offset)
            try:
                yield stream
            finally:
                stream.close()
        finally:
            slot.release()

    def blob_exists(self, ref: Reference | str, desc: dict[str, Any]) -> bool:
        """Whether the registry holds the blob (HEAD on the first push host, else pull hosts)."""
        ref = self._ref(ref)
        digest, _, _ = check_descriptor(desc)
        endpoints = [e for e in self.hosts.endpoints(ref.host) if "push" in e.capabilities] or self._endpoints(ref, "pull")
        endpoint = endpoints[0]
        push = "push" in endpoint.capabilities
        scopes = (repository_scope(ref.repository, push=push),)
        with contextlib.closing(self._send(endpoint, "HEAD", self._url(endpoint, ref, "blobs", digest), scopes)) as response:
            if response.status_code == 200:
                return True
            if response.status_code == 404:
                return False
            raise _status_error(response, f"{ref}: blob {digest} at {endpoint.host}")

    # -- push -------------------------------------------------------------------------

    def _push_endpoint(self, ref: Reference) -> RegistryEndpoint:
        return self._endpoints(ref, "push")[0]

    def push_blob(
        self,
        ref: Reference | str,
        desc: dict[str, Any],
        open_stream: Callable[[], BinaryIO],
        mount_from: Reference | str | None = None,
        chunk_size: int | None = None,
    ) -> None:
        """Upload a blob unless the registry has it: mount from `mount_from`'s repository
        when possible, else one PUT (chunk_size None) or PATCH chunks then PUT.

        `open_stream` is called for each attempt and must return the blob from its start.
        """
        ref = self._ref(ref)
        digest, size, _ = check_descriptor(desc)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise InvalidArgument(f"chunk size must be a positive integer, not {chunk_size!r:.40}")
        endpoint = self._push_endpoint(ref)
        scopes = (repository_scope(ref.repository, push=True),)
        if mount_from is not None:
            mount_from = self._ref(mount_from)
        mount = mount_from is not None and mount_from.host == ref.host and mount_from.repository != ref.repository
        if mount:
            assert mount_from is not None
            scopes += (repository_scope(mount_from.repository),)
        if self.blob_exists(ref, desc):
            return
        what = f"{ref}: push blob {digest} to {endpoint.host}"
        attempt = 0
        while True:
            try:
                location = self._start_upload(endpoint, ref, digest, scopes, mount_from if mount else None, what)
                if location is None:
                    return  # mounted
                if chunk_size is None:
                    self._upload_monolithic(endpoint, location, digest, size, scopes, open_stream, what)
                else:
                    self._upload_chunked(endpoint, location, digest, size, chunk_size, scopes, open_stream, what)
                return
            except (Unavailable, DeadlineExceeded):
                # The upload session may be broken: start a new one from the beginning.
                attempt += 1
                if attempt > self.config.retries:
                    raise
                self._backoff(attempt)

    def _start_upload(
        self, endpoint: RegistryEndpoint, ref: Reference, digest: str, scopes: tuple[str, ...], mount_from: Reference | None, what: str
    ) -> str | None:
        """Open an upload session (its URL), or None when the blob was mounted."""
        params = {"mount": digest, "from": mount_from.repository} if mount_from else None
        with contextlib.closing(self._send(endpoint, "POST", self._url(endpoint, ref, "blobs", "uploads/"), scopes, {"Content-Length": "0"}, params)) as response:
            if response.status_code == 201 and mount_from is not None:
                return None
            if response.status_code != 202:
                raise _status_error(response, what)
            return self._location(response, what)

    @staticmethod
    def _location(response: httpx.Response, what: str) -> str:
        location = response.headers.get("location", "")
        if not location:
            raise InvalidArgument(f"{what}: the registry gave no upload location")
        url = urllib.parse.urljoin(str(response.url), location)
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"{what}: bad upload location {location[:200]!r}")
        return url

    def _upload_monolithic(
        self, endpoint: RegistryEndpoint, location: str, digest: str, size: int, scopes: tuple[str, ...], open_stream: Callable[[], BinaryIO], what: str
    ) -> None:
        with open_stream() as source:
            body = _ExactBody(source, size, what)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            with contextlib.closing(self._send(endpoint, "PUT", location, scopes, headers, {"digest": digest}, content=lambda: iter(body), retries=0)) as response:
                self._check_committed(response, digest, what)

    def _upload_chunked(
        self,
        endpoint: RegistryEndpoint,
        location: str,
        digest: str,
        size: int,
        chunk_size: int,
        scopes: tuple[str, ...],
        open_stream: Callable[[], BinaryIO],
        what: str,
    ) -> None:
        offset = 0
        with open_stream() as source:
            while offset < size:
                chunk = _read_exactly(source, min(chunk_size, size - offset))
                if not chunk:
                    raise InvalidArgument(f"{what}: the source ended at {offset} of {size} bytes")
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(chunk)),
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                }
                with contextlib.closing(self._send(endpoint, "PATCH", location, scopes, headers, content=lambda: chunk, retries=0)) as response:
                    if response.status_code != 202:
                        raise _status_error(response, what)
                    location = self._location(response, what)
                offset += len(chunk)
            if source.read(1):
                raise InvalidArgument(f"{what}: the source holds more than {size} bytes")
        with contextlib.closing(self._send(endpoint, "PUT", location, scopes, {"Content-Length": "0"}, {"digest": digest}, retries=0)) as response:
            self._check_committed(response, digest, what)

    @staticmethod
    def _check_committed(response: httpx.Response, digest: str, what: str) -> None:
        if response.status_code not in (201, 204):
            raise _status_error(response, what)
        stored = response.headers.get("docker-content-digest", "")
        if stored and stored != digest:
            raise InvalidArgument(f"{what}: the registry stored {stored[:80]!r}")

    def push_manifest(self, ref: Reference | str, media_type: str, data: bytes, tag_or_digest: str) -> str:
        """PUT a manifest or index under a tag or its digest; returns its digest."""
        ref = self._ref(ref)
        if not isinstance(media_type, str) or not media_type or len(media_type) > 255 or any(c in media_type for c in "\r\n"):
            raise InvalidArgument(f"invalid media type {str(media_type)[:100]!r}")
        if not isinstance(tag_or_digest, str) or not (_TAG_RE.fullmatch(tag_or_digest) or _DIGEST_RE.fullmatch(tag_or_digest)):
            raise InvalidArgument(f"{ref}: {str(tag_or_digest)[:140]!r} is neither a tag nor a digest")
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidArgument(f"{ref}: manifest of {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
        digest = _hash(tag_or_digest if _DIGEST_RE.fullmatch(tag_or_digest) else "sha256:", data)
        if _DIGEST_RE.fullmatch(tag_or_digest) and digest != tag_or_digest:
            raise InvalidArgument(f"{ref}: manifest data has digest {digest}, not {tag_or_digest}")
        endpoint = self._push_endpoint(ref)
        scopes = (repository_scope(ref.repository, push=True),)
        what = f"{ref}: push manifest {tag_or_digest} to {endpoint.host}"
        headers = {"Content-Type": media_type}
        with contextlib.closing(self._send(endpoint, "PUT", self._url(endpoint, ref, "manifests", tag_or_digest), scopes, headers, content=lambda: data)) as response:
            self._check_committed(response, digest, what)
        return digest

    def source_label(self, ref: Reference | str) -> tuple[str, str]:
        """containerd's distribution source label: (`containerd.io/distribution.source.<host>`, repository)."""
        ref = self._ref(ref)
        return SOURCE_LABEL_PREFIX + ref.host, ref.repository


def _read_exactly(source: BinaryIO, count: int) -> bytes:
    parts = []
    while count > 0:
        data = source.read(count)
        if not data:
            break
        parts.append(data)
        count -= len(data)
    return b"".join(parts)


class _ExactBody:
    """An upload body that is exactly `size` bytes of `source`, or an InvalidArgument."""

    def __init__(self, source: BinaryIO, size: int, what: str) -> None:
        self.source, self.size, self.what = source, size, what

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        while sent < self.size:
            data = self.source.read(min(UPLOAD_CHUNK, self.size - sent))
            if not data:
                raise InvalidArgument(f"{self.what}: the source ended at {sent} of {self.size} bytes")
            sent += len(data)
            yield data
        if self.source.read(1):
            raise InvalidArgument(f"{self.what}: the source holds more than {self.size} bytes")


class BlobStream(io.RawIOBase):
    """A blob body from a registry: at most `size` bytes, resumed with Range after a drop."""

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, size: int, offset: int) -> None:
        super().__init__()
        self._client = client
        self._ref = ref
        self.digest = digest
        self.size = size
        self.position = offset
        self._pending = memoryview(b"")
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] = iter(())
        self._skip = 0
        self._length_known = True
        self._end_checked = False
        self._resumes = 0
        self._progress_since_resume = 0
        self._scopes = (repository_scope(ref.repository),)
        self._endpoint: RegistryEndpoint | None = None
        if offset < size:
            self._open_first()

    def readable(self) -> bool:
        """Always: the stream is for reading."""
        return True

    def tell(self) -> int:
        """The blob offset of the next byte read."""
        return self.position

    def _what(self) -> str:
        host = self._endpoint.host if self._endpoint else self._ref.host
        return f"{self._ref}: blob {self.digest} from {host}"

    def _open_first(self) -> None:
        last: MoordError | None = None
        for endpoint in self._client._endpoints(self._ref, "pull"):
            self._endpoint = endpoint
            try:
                self._open_at(self.position)
                return
            except (NotFound, Unavailable, DeadlineExceeded) as exc:
                last = exc
        assert last is not None
        raise last

    def _open_at(self, position: int) -> None:
        """Request the body from `position` and check that the answer fits the descriptor."""
        endpoint = self._endpoint
        assert endpoint is not None
        headers = {"Accept-Encoding": "identity"}
        if position:
            headers["Range"] = f"bytes={position}-"
        url = self._client._url(endpoint, self._ref, "blobs", self.digest)
        response = self._client._send(endpoint, "GET", url, self._scopes, headers, self._client._params(endpoint, self._ref))
        try:
            what = self._what()
            length = response.headers.get("content-length")
            self._skip = 0
            if response.status_code == 206:
                match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", "").strip())
                if not match or int(match.group(1)) != position:
                    raise InvalidArgument(f"{what}: the registry answered range {response.headers.get('content-range', '')[:80]!r} for bytes={position}-")
                if match.group(3) != "*" and int(match.group(3)) != self.size:
                    raise InvalidArgument(f"{what}: size mismatch: the descriptor says {self.size} bytes, the registry has {match.group(3)}")
                if int(match.group(2)) >= self.size:
                    raise InvalidArgument(f"{what}: the registry's range ends past the descriptor's {self.size} bytes")
                expected = self.size - position
            elif response.status_code == 200:
                # The server ignored Range: read from the start and drop what we have.
                self._skip = position
                expected = self.size
            else:
                raise _status_error(response, what)
            if length is not None:
                if not length.isdigit():
                    raise InvalidArgument(f"{what}: bad Content-Length {length[:40]!r}")
                if int(length) != expected and response.status_code == 200:
                    raise InvalidArgument(f"{what}: size mismatch: the descriptor says {self.size} bytes, the registry sends {length}")
                if int(length) > expected:
                    raise InvalidArgument(f"{what}: the registry sends {length} bytes, more than the descriptor's {expected} remaining")
            self._length_known = length is not None
            self._end_checked = False
        except BaseException:
            response.close()
            raise
        self._response = response
        self._chunks = response.iter_raw()

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
        self._chunks = iter(())

    def _resume(self, reason: str, timed_out: bool) -> None:
        """Reconnect from the current position, or give up when the budget is spent."""
        self._close_response()
        if self._progress_since_resume >= RESUME_PROGRESS_RESET:
            self._resumes = 0
        self._progress_since_resume = 0
        self._resumes += 1
        budget = self._client.config.retries
        if self._resumes > budget:
            cls = DeadlineExceeded if timed_out else Unavailable
            raise cls(f"{self._what()}: {reason} at byte {self.position} of {self.size}; gave up after {budget} retries")
        self._client._backoff(self._resumes)
        self._open_at(self.position)

    def _next_chunk(self) -> bytes | None:
        """The next piece of body, None at its end; transport failures resume."""
        try:
            return next(self._chunks)
        except StopIteration:
            return None
        except httpx.TimeoutException:
            self._resume(f"no data for {self._client.config.timeout}s", True)
        except httpx.TransportError as exc:
            self._resume(f"connection failed ({exc or exc.__class__.__name__})", False)
        return b""

    def readinto(self, buffer: Any) -> int:
        """Fill `buffer` with the next bytes of the blob; 0 at its end."""
        if self.closed:
            raise ValueError("I/O operation on closed blob stream")
        view = memoryview(buffer).cast("B")
        while True:
            if self.position >= self.size:
                self._check_end()
                return 0
            if self._pending:
                count = min(len(view), len(self._pending))
                view[:count] = self._pending[:count]
                self._pending = self._pending[count:]
                self.position += count
                self._progress_since_resume += count
                return count
            if self._response is None:
                self._open_at(self.position)
            chunk = self._next_chunk()
            if chunk is None:
                self._resume("the body ended early", False)
                continue
            if self._skip:
                dropped = min(self._skip, len(chunk))
                chunk = chunk[dropped:]
                self._skip -= dropped
            if self.position + len(chunk) > self.size:
                raise InvalidArgument(f"{self._what()}: the body is longer than the descriptor's {self.size} bytes")
            self._pending = memoryview(chunk)

    def _check_end(self) -> None:
        """At `size`: a body of unannounced length must end here, not go on."""
        if self._end_checked or self._response is None:
            return
        self._end_checked = True
        if not self._length_known:
            try:
                extra = next(self._chunks, b"")
            except httpx.HTTPError:
                extra = b""
            if extra:
                raise InvalidArgument(f"{self._what()}: the body is longer than the descriptor's {self.size} bytes")
        self._close_response()

    def close(self) -> None:
        """Release the connection."""
        self._close_response()
        super().close()
