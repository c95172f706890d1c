"""Image references with docker's normalisation, as containerd names images.

`busybox` is `docker.io/library/busybox:latest`; a reference is `host/path[:tag][@digest]`.
The grammar is the distribution project's (lowercase path components joined by `.`, `_`,
`__` or dashes; a tag of at most 128 word characters, dots and dashes; a name of at most
255 characters). The regular expressions are written so that no input can make them
backtrack badly: a hostile string is refused in linear time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moord.messages.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255
# A full reference cannot be longer than a 255-character name, a tag and a sha512 digest.
_TEXT_LENGTH_MAX = 600

# Path components: lowercase alphanumerics joined by one separator (an empty separator
# in the distribution grammar only concatenates alphanumerics, so it is left out here:
# the language is the same and the expression stays unambiguous).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN_RE = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]{{1,5}})?", re.ASCII)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})", re.ASCII)
_HEX64_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: registry host, repository, and a tag and/or a digest."""

    host: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """`host/repository`, without tag or digest."""
        return f"{self.host}/{self.repository}"

    @property
    def object(self) -> str:
        """What the registry is asked for: the digest when there is one, else the tag."""
        return self.digest or self.tag

    def with_digest(self, digest: str) -> "Reference":
        """The same name pinned to `digest` (the tag kept, as containerd writes `name:tag@digest`)."""
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise InvalidArgument(f"invalid digest {str(digest)[:100]!r}")
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's rule: the first component is a registry host only when it looks like one."""
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_reference(text: str, default_tag: bool = True) -> Reference:
    """Parse and normalise an image reference; InvalidArgument says what is wrong with it.

    Without tag or digest the tag `latest` is added (unless `default_tag` is false).
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"invalid reference: expected a string, got {type(text).__name__}")
    shown = repr(text[:120]) + ("..." if len(text) > 120 else "")
    if not text:
        raise InvalidArgument("invalid reference: empty")
    if len(text) > _TEXT_LENGTH_MAX:
        raise InvalidArgument(f"invalid reference {shown}: longer than {_TEXT_LENGTH_MAX} characters")
    remainder, at, digest = text.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise InvalidArgument(f"invalid reference {shown}: bad digest {digest[:140]!r} (want sha256:<64 hex> or sha512:<128 hex>)")
    tag = ""
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"invalid reference {shown}: bad tag {tag[:140]!r}")
    if not remainder:
        raise InvalidArgument(f"invalid reference {shown}: no repository name")
    if _HEX64_RE.fullmatch(remainder):
        raise InvalidArgument(f"invalid reference {shown}: a 64-character hex string is an image ID, not a repository name")
    domain, path = _split_domain(remainder)
    if path.lower() != path:
        raise InvalidArgument(f"invalid reference {shown}: repository name must be lowercase")
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidArgument(f"invalid reference {shown}: bad registry host {domain[:140]!r}")
    if not _PATH_RE.fullmatch(path):
        raise InvalidArgument(f"invalid reference {shown}: bad repository name {path[:140]!r}")
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(f"invalid reference {shown}: name longer than {NAME_TOTAL_LENGTH_MAX} characters")
    if not tag and not digest and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)
