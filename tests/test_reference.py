"""Image references: docker normalisation, table cases and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moord.oci.reference import Reference, parse_reference
from moord.messages.errors import InvalidArgument

DIGEST = "sha256:" + "a1" * 32


@pytest.mark.parametrize(
    "text, normalised, host, repository, tag, digest",
    [
        ("busybox", "docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", ""),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "docker.io", "library/busybox", "1.36", ""),
        ("library/busybox", "docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", ""),
        ("docker.io/busybox", "docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", ""),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", ""),
        ("user/app:v1", "docker.io/user/app:v1", "docker.io", "user/app", "v1", ""),
        ("host:5000/a/b:tag", "host:5000/a/b:tag", "host:5000", "a/b", "tag", ""),
        ("localhost/app", "localhost/app:latest", "localhost", "app", "latest", ""),
        ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest", "127.0.0.1:5000", "app", "latest", ""),
        ("Registry.Example.com/a__b/c-d/e.f:V_1", "Registry.Example.com/a__b/c-d/e.f:V_1", "Registry.Example.com", "a__b/c-d/e.f", "V_1", ""),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}", "docker.io", "library/busybox", "", DIGEST),
        (f"quay.io/a/b:tag@{DIGEST}", f"quay.io/a/b:tag@{DIGEST}", "quay.io", "a/b", "tag", DIGEST),
        ("localhost:5000", "docker.io/library/localhost:5000", "docker.io", "library/localhost", "5000", ""),
    ],
)
def test_normalisation(text: str, normalised: str, host: str, repository: str, tag: str, digest: str) -> None:
    ref = parse_reference(text)
    assert (str(ref), ref.host, ref.repository, ref.tag, ref.digest) == (normalised, host, repository, tag, digest)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("docker.io/Library/busybox", "lowercase"),
        ("busybox:", "bad tag"),
        ("busybox:-x", "bad tag"),
        ("busybox:" + "t" * 129, "bad tag"),
        ("busybox@sha256:abc", "bad digest"),
        ("busybox@md5:" + "a" * 32, "bad digest"),
        ("busybox@" + DIGEST.upper(), "bad digest"),
        ("a" * 64, "image ID"),
        ("host/" + "a" * 260, "longer than 255"),
        ("x" * 700, "longer than 600"),
        ("-host.com/a", "bad registry host"),
        ("host.com/a//b", "bad repository"),
        ("host.com/a/", "bad repository"),
        ("a..b", "bad repository"),
        ("busy box", "bad repository"),
        ("busybox\n", "bad tag|bad repository"),
        ("@" + DIGEST, "no repository"),
        (":tag", "no repository"),
        ("host.com:port/a", "bad registry host"),
    ],
)
def test_invalid(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_reference(text)


def test_not_a_string() -> None:
    with pytest.raises(InvalidArgument, match="expected a string"):
        parse_reference(None)  # type: ignore[arg-type]


def test_with_digest_and_object() -> None:
    ref = parse_reference("busybox:1.36")
    assert ref.object == "1.36"
    pinned = ref.with_digest(DIGEST)
    assert str(pinned) == f"docker.io/library/busybox:1.36@{DIGEST}" and pinned.object == DIGEST
    with pytest.raises(InvalidArgument):
        ref.with_digest("sha256:nothex")
    assert parse_reference("busybox", default_tag=False) == Reference("docker.io", "library/busybox")


_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_separator = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(lambda parts, seps: "".join(p + s for p, s in zip(parts, seps)) + parts[-1], st.lists(_alnum, min_size=1, max_size=3), st.lists(_separator, min_size=3, max_size=3))
_path = st.lists(_component, min_size=1, max_size=4).map("/".join)
_domain = st.one_of(
    st.just(""),
    st.sampled_from(["localhost", "docker.io", "index.docker.io", "quay.io", "Example.COM", "127.0.0.1"]),
    st.builds(lambda a, b, port: f"{a}.{b}" + (f":{port}" if port else ""), _alnum, _alnum, st.one_of(st.none(), st.integers(1, 65535))),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)


@settings(max_examples=300, deadline=None)
@given(_domain, _path, st.one_of(st.none(), _tag), st.one_of(st.none(), _digest))
def test_valid_references_normalise_to_a_fixed_point(domain: str, path: str, tag: str | None, digest: str | None) -> None:
    first = path.split("/")[0]
    # Without a host, a first component that looks like one (has a dot, or is localhost) is one.
    assume(domain or ("." not in first and first != "localhost"))
    text = (f"{domain}/" if domain else "") + path + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    try:
        ref = parse_reference(text)
    except InvalidArgument as exc:
        # Only the length rule or an image-ID-looking name may refuse a grammatical reference.
        assert "longer than" in str(exc) or "image ID" in str(exc)
        return
    again = parse_reference(str(ref))
    assert again == ref and str(again) == str(ref)
    assert ref.repository.endswith(path) and (ref.tag == (tag or ("" if digest else "latest")))
    assert ref.digest == (digest or "")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300) | st.text("aA0:/@._-", max_size=80) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
def test_hostile_text_raises_only_invalid_argument(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidArgument:
        return
    assert parse_reference(str(ref)) == ref
    assert all(c.isascii() and c.isprintable() and c != " " for c in str(ref))


def test_pathological_input_is_refused_quickly() -> None:
    import time

    for text in ("a" * 250 + "!", "a-" * 120 + "!", ("a." * 120) + "/b", "a" + "-" * 250 + "!"):
        started = time.monotonic()
        with pytest.raises(InvalidArgument):
            parse_reference(text)
        assert time.monotonic() - started < 0.1
