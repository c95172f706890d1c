"""Registry authorization: WWW-Authenticate challenges, basic credentials, bearer tokens.

A host starts anonymous. Its first 401 names a scheme: `Basic` is answered with the
configured credentials for that host; `Bearer realm=...,service=...,scope=...` with a token
fetched from the realm (with the credentials when there are some, anonymously otherwise)
and cached per (host, scopes) until it expires. From then on requests to the host carry
the authorization up front, as containerd's docker authorizer does.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

import httpx

from moord.messages.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable

# A token without expires_in lives 60 s (the token spec's default); refresh a little early.
DEFAULT_TOKEN_LIFETIME = 60.0
EXPIRY_MARGIN = 5.0
TOKEN_RESPONSE_LIMIT = 1 << 20
_PARAM_RE = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
_SCHEME_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)")


@dataclass(frozen=True)
class Challenge:
    """One WWW-Authenticate challenge: the scheme (lowercase) and its parameters."""

    scheme: str
    params: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str:
        """A parameter's value, or ''."""
        for k, v in self.params:
            if k == key:
                return v
        return ""


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Challenges from the WWW-Authenticate header values (one challenge per value)."""
    found = []
    for value in values:
        match = _SCHEME_RE.match(value)
        if not match:
            continue
        params = []
        for key, raw in _PARAM_RE.findall(value[match.end():]):
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params.append((key.lower(), raw))
        found.append(Challenge(match.group(1).lower(), tuple(params)))
    return found


def repository_scope(repository: str, push: bool = False) -> str:
    """The token scope for a repository: `repository:<name>:pull[,push]`."""
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class Authorizer:
    """Per-host authorization state shared by every thread of a RegistryClient."""

    def __init__(self, credentials: Callable[[str], tuple[str, str] | None], now: Callable[[], float] = time.monotonic) -> None:
        self._credentials = credentials
        self._now = now
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}

    def authorization(self, host: str, scopes: tuple[str, ...], client: httpx.Client) -> str | None:
        """The Authorization header value for a request to `host` needing `scopes`, if any is known."""
        with self._lock:
            challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials(host)
            return _basic(*creds) if creds else None
        if challenge.scheme == "bearer":
            return "Bearer " + self._token(host, challenge, scopes, client)
        return None

    def unauthorized(self, host: str, response: httpx.Response, body: bytes, scopes: tuple[str, ...], had_auth: bool) -> None:
        """Learn from a 401: remember the challenge and drop a token that was refused.

        Raises FailedPrecondition when retrying cannot help (no usable scheme, no
        credentials for Basic).
        """
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        detail = error_detail(body)
        if not usable:
            raise FailedPrecondition(f"unauthorized: {host} gave no usable WWW-Authenticate challenge{detail}")
        challenge = next((c for c in usable if c.scheme == "bearer"), usable[0])
        if challenge.scheme == "basic" and self._credentials(host) is None:
            raise FailedPrecondition(f"unauthorized: {host} wants basic authentication and no credentials are configured for it{detail}")
        with self._lock:
            self._challenges[host] = challenge
            if had_auth:
                for key in [k for k in self._tokens if k[0] == host and set(scopes) <= set(k[1])]:
                    del self._tokens[key]

    def _token(self, host: str, challenge: Challenge, scopes: tuple[str, ...], client: httpx.Client) -> str:
        wanted = set(scopes)
        wanted.update(s for s in challenge.get("scope").split() if s)
        key = (host, tuple(sorted(wanted)))
        with self._lock:
            cached = self._tokens.get(key)
        if cached and cached[1] > self._now():
            return cached[0]
        token, lifetime = self._fetch_token(host, challenge, key[1], client)
        with self._lock:
            self._tokens[key] = (token, self._now() + max(lifetime - EXPIRY_MARGIN, 1.0))
        return token

    def _fetch_token(self, host: str, challenge: Challenge, scopes: tuple[str, ...], client: httpx.Client) -> tuple[str, float]:
        realm = challenge.get("realm")
        if not realm.startswith(("https://", "http://")):
            raise FailedPrecondition(f"unauthorized: {host} names no usable token realm ({realm[:200]!r})")
        params: list[tuple[str, str]] = []
        if challenge.get("service"):
            params.append(("service", challenge.get("service")))
        params += [("scope", s) for s in scopes]
        headers = {}
        creds = self._credentials(host)
        if creds:
            headers["Authorization"] = _basic(*creds)
        try:
            with client.stream("GET", realm, params=params, headers=headers, follow_redirects=True) as response:
                body = read_bounded(response, TOKEN_RESPONSE_LIMIT)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"token request to {realm}: {exc}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"token request to {realm}: {exc}") from None
        if response.status_code in (401, 403):
            raise FailedPrecondition(f"unauthorized: token server {realm} refused {'the configured credentials' if creds else 'anonymous access'} for {' '.join(scopes)}{error_detail(body)}")
        if response.status_code != 200:
            raise Unavailable(f"token server {realm} answered {response.status_code}{error_detail(body)}")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidArgument(f"token server {realm} sent no JSON") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise InvalidArgument(f"token server {realm} sent no token")
        lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        return token, float(lifetime)


def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of a streamed body; InvalidArgument when there are more."""
    parts: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise InvalidArgument(f"{response.request.method} {response.request.url}: response body larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def error_detail(body: bytes) -> str:
    """The registry's own error message (distribution's `errors` JSON), for the user."""
    try:
        doc = json.loads(body[:65536])
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return f" ({str(errors[0].get('code', ''))}: {str(errors[0].get('message', ''))[:200]})"
    except (ValueError, RecursionError):
        pass
    return ""
