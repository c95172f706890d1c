"""The filter language: containerd's examples, hostile text, and round trips."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moord.messages.errors import InvalidArgument
from moord.messages.filters import (
    EQUAL,
    MATCHES,
    NOT_EQUAL,
    PRESENT,
    Filter,
    Selector,
    map_lookup,
    parse,
)

# containerd's filter test corpus (filters/filter_test.go), rebuilt as dicts.
CORPUS = [
    {"name": "foo", "labels": {"foo": "true"}},
    {"name": "bar"},
    {"name": "foo", "labels": {"foo": "present", "more complex label": "present"}},
    {"name": "bar", "labels": {"bar": "true"}},
    {"name": "fooer", "labels": {'more complex label with \\ and "': "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and ".post': "present"}},
    {"name": "baz", "other": "too complex, yo"},
    {"name": "bazo", "other": "abc"},
    {"name": "compound", "labels": {"foo": "omg_asdf.asdf-qwer"}},
]


def adapt(obj: dict) -> object:
    """The lookup for one corpus entry, as containerd's test adaptor does it."""

    def lookup(path: list[str]) -> tuple[str, bool]:
        head = path[0]
        if head in ("name", "other"):
            value = obj.get(head, "")
            return value, bool(value)
        if head == "labels":
            return map_lookup(obj.get("labels"), path[1:])
        return "", False

    return lookup


def matching(filters: list[str]) -> list[int]:
    flt = parse(filters)
    return [i for i, obj in enumerate(CORPUS) if flt.match(adapt(obj))]


ALL = list(range(len(CORPUS)))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", ALL),
        ("name", ALL),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]+/,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        ('labels."more complex label with \\\\ and \\""==present', [4]),
        ('labels."more complex label with \\\\ and \\"".post==present', [5]),
        ("  name == bar", [1, 3]),
    ],
)
def test_containerd_examples(text: str, expected: list[int]) -> None:
    assert matching([text]) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("labels.|foo|==omg_asdf.asdf-qwer", "[labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered"),
        (
            'labels.?"more complex label with \\\\ and \\"".post==present',
            '[labels. >|?|< "more complex label with \\\\ and \\"".post==present]: expected field or quoted',
        ),
        ("name==foo,", "[name==foo,]: expected field or quoted"),
        ("labels.", "[labels.]: expected field or quoted"),
        ("image~=,id?=?fbaq", "[image~= >|,|< id?=?fbaq]: expected value or quoted"),
        ("labels.ns/key==value", "[labels.ns >|/|< key==value]: quoted literal not terminated"),
        ("labels.key==/value", "[labels.key== >|/|< value]: quoted literal not terminated"),
        ("name===x", "unsupported operator '==='"),
        ("name x", 'expected an operator ("=="|"!="|"~=")'),
        ("name==/x/", "invalid quote encountered"),
        ('a=="\\q"', "illegal escape sequence"),
        ("a~=(", "invalid regular expression"),
        ("a==b\x00", "unexpected"),
    ],
)
def test_parse_errors_name_the_position(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse([text])
    assert info.value.message.startswith("filters: parse error: ")
    assert message in info.value.message
    assert "at position" in info.value.message


def test_list_is_or_and_comma_is_and() -> None:
    assert matching(["name==bar", "labels.foo==true"]) == [0, 1, 3]
    assert matching(["name==bar,labels.foo==true"]) == []
    assert matching([]) == ALL
    assert matching(["name==nothing", ""]) == ALL


def test_not_equal_matches_absent_fields_and_regex_searches() -> None:
    assert matching(["other!=abc"]) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert matching(["name~=oo"]) == [0, 2, 4, 5]
    assert matching(["name~=^ba.$"]) == [1, 3, 6]


def test_quoted_escapes_decode_like_go() -> None:
    flt = parse(['labels."a\\x2eb"=="\\u00e9\\101\\t"'])
    sel = flt.alternatives[0][0]
    assert sel.fieldpath == ("labels", "a.b")
    assert sel.value == "éA\t"
    # \xNN writes raw bytes: two of them make one UTF-8 character.
    assert parse(['a=="\\xc3\\xa9"']).alternatives[0][0].value == "é"


def test_import_is_cheap() -> None:
    code = "import sys, moord.messages.filters; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- property tests ---------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_invalid_argument(text: str) -> None:
    try:
        flt = parse([text])
    except InvalidArgument as exc:
        assert exc.message.startswith("filters:")
    else:
        assert isinstance(flt, Filter)
        flt.match(lambda path: ("x", True))


FILTER_ALPHABET = st.sampled_from(list('abc_.,=!~"/|\\ \t\n0123456789é\x00') + ["labels.", "=="])


@settings(max_examples=400, deadline=None)
@given(st.lists(FILTER_ALPHABET, max_size=40).map("".join))
def test_filter_shaped_text_parses_or_raises_invalid_argument(text: str) -> None:
    try:
        parse([text, "name"])
    except InvalidArgument:
        pass


FIELD_PART = st.one_of(st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True), st.text(max_size=12))
PLAIN_VALUE = st.text(max_size=16)
REGEX_VALUE = st.one_of(st.text(max_size=12).map(re.escape), st.sampled_from(["^a+$", "[abc]{1,2}", "x|y", ".*"]))


@st.composite
def selectors(draw: st.DrawFn) -> Selector:
    path = tuple(draw(st.lists(FIELD_PART, min_size=1, max_size=4)))
    op = draw(st.sampled_from([PRESENT, EQUAL, NOT_EQUAL, MATCHES]))
    if op == PRESENT:
        return Selector(path)
    value = draw(REGEX_VALUE if op == MATCHES else PLAIN_VALUE)
    return Selector(path, op, value, re.compile(value) if op == MATCHES else None)


FILTERS = st.lists(st.lists(selectors(), max_size=4).map(tuple), max_size=4).map(lambda alts: Filter(tuple(alts)))


@settings(max_examples=400, deadline=None)
@given(FILTERS)
def test_printed_filters_parse_back_to_the_same_ast(flt: Filter) -> None:
    assert parse(flt.to_strings()) == flt


@settings(max_examples=200, deadline=None)
@given(FILTERS, st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
def test_round_trip_preserves_matching(flt: Filter, fields: dict[str, str]) -> None:
    def lookup(path: list[str]) -> tuple[str, bool]:
        return map_lookup(fields, path)

    assert parse(flt.to_strings()).match(lookup) == flt.match(lookup)
