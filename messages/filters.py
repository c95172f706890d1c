"""containerd's filter language, parsed once and matched against any object.

A filter string is a comma separated list of selectors that must all match:

    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | "quoted"
    operator  := "==" | "!=" | "~="          (~= is a regular expression search)
    value     := quoted | run of printable characters without "," or spaces

A selector without operator tests that the field is present. A list of filter strings
matches when any of them matches (an empty list matches everything). Quoted parts use
Go string syntax with `"`; after `~=` a value may also be quoted with `/` or `|`.

`parse(filters)` returns a `Filter`; `Filter.match(lookup)` calls `lookup(fieldpath)`,
which answers `(value, present)` for the object at hand. Parse errors are InvalidArgument
naming the position, in containerd's format. This module imports no pydantic: every List
handler and every client may use it cheaply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from moord.messages.errors import InvalidArgument

PRESENT = "?"
EQUAL = "=="
NOT_EQUAL = "!="
MATCHES = "~="
OPERATORS = (EQUAL, NOT_EQUAL, MATCHES)

Lookup = Callable[[list[str]], "tuple[str, bool]"]

# Token kinds of the scanner.
_EOF = "eof"
_QUOTED = "quoted"
_VALUE = "value"
_FIELD = "field"
_SEPARATOR = "separator"
_OPERATOR = "operator"
_ILLEGAL = "illegal"
_OTHER = "other"

_QUOTE_CHARS = '/|"'
_SEPARATOR_CHARS = ",."
_OPERATOR_CHARS = "=!~"
_FIELD_RE = re.compile(r"[A-Za-z0-9_]+")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_HEX_DIGITS = "0123456789abcdefABCDEF"
# A hostile filter must not make the parser or the regex compiler work for long.
MAX_FILTER_LENGTH = 8192


@dataclass(frozen=True)
class Selector:
    """One `fieldpath op value` test; `operator` is PRESENT for a bare fieldpath."""

    fieldpath: tuple[str, ...]
    operator: str = PRESENT
    value: str = ""
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def match(self, lookup: Lookup) -> bool:
        """Whether the object behind `lookup` satisfies this selector."""
        value, present = lookup(list(self.fieldpath))
        if self.operator == PRESENT:
            return present
        if self.operator == EQUAL:
            return present and value == self.value
        if self.operator == NOT_EQUAL:
            # containerd compares the (possibly empty) value even when absent.
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None

    def __str__(self) -> str:
        path = ".".join(_format_field(part) for part in self.fieldpath)
        if self.operator == PRESENT:
            return path
        return f"{path}{self.operator}{_format_value(self.value)}"


@dataclass(frozen=True)
class Filter:
    """Any of `alternatives` matches; each alternative is a conjunction of selectors.

    No alternatives at all matches everything (like an empty filter list), and so does
    an empty conjunction (an empty filter string).
    """

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    @property
    def always(self) -> bool:
        """Whether this filter matches every object."""
        return not self.alternatives or any(not conj for conj in self.alternatives)

    def match(self, lookup: Lookup) -> bool:
        """Whether the object behind `lookup` matches."""
        if not self.alternatives:
            return True
        for conjunction in self.alternatives:
            for selector in conjunction:
                if not selector.match(lookup):
                    break
            else:
                return True
        return False

    def to_strings(self) -> list[str]:
        """The filter as filter strings that parse back to an equal Filter."""
        return [",".join(str(sel) for sel in conj) for conj in self.alternatives]


def parse(filters: Iterable[str]) -> Filter:
    """Parse a list of filter strings (OR of ANDs); errors raise InvalidArgument."""
    alternatives = []
    for text in filters:
        if not isinstance(text, str):
            raise InvalidArgument(f"filters: want strings, got {type(text).__name__}")
        alternatives.append(parse_one(text))
    return Filter(tuple(alternatives))


def parse_one(text: str) -> tuple[Selector, ...]:
    """Parse one filter string into the selectors that must all match."""
    if len(text) > MAX_FILTER_LENGTH:
        raise InvalidArgument(f"filters: filter of {len(text)} characters exceeds {MAX_FILTER_LENGTH}")
    if text == "":
        return ()
    return _Parser(text).selectors()


def map_lookup(mapping: Mapping[str, str] | None, rest: list[str]) -> tuple[str, bool]:
    """Look a dotted key up in a label-like map, as containerd does (`labels.a.b` -> "a.b")."""
    if not mapping:
        return "", False
    key = ".".join(rest)
    value = mapping.get(key)
    if value is None:
        return "", False
    return value, True


# -- formatting ---------------------------------------------------------------------


def _format_field(part: str) -> str:
    return part if _FIELD_RE.fullmatch(part) else _quote(part)


def _is_value_char(ch: str) -> bool:
    return ch != "," and not ch.isspace() and ch.isprintable()


def _format_value(value: str) -> str:
    bare = (
        value
        and value[0] not in _QUOTE_CHARS + _SEPARATOR_CHARS + _OPERATOR_CHARS
        and all(_is_value_char(ch) for ch in value)
    )
    return value if bare else _quote(value)


def _quote(text: str) -> str:
    """Quote with `"` so that the scanner reads back exactly `text`."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif 0xDC80 <= code <= 0xDCFF:
            # a byte that was not valid UTF-8 (kept by surrogateescape): write it back as a byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable() and ch != "\n":
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


# -- scanning and parsing -----------------------------------------------------------


class _Error(Exception):
    def __init__(self, pos: int, message: str) -> None:
        super().__init__(message)
        self.pos = pos
        self.message = message


class _Scanner:
    """Splits filter text into tokens; whitespace between tokens is skipped."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.value_mode = False  # after an operator, the next plain token is a value

    def peek(self) -> str:
        """The next character without skipping whitespace ("" at the end)."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def scan(self) -> tuple[int, str, str]:
        """The next token as (start, kind, text); quoted tokens come back decoded."""
        text = self.text
        while self.pos < len(text) and text[self.pos].isspace():
            self.pos += 1
        start = self.pos
        if start >= len(text):
            return start, _EOF, ""
        ch = text[start]
        if ch == "\x00":
            self.pos += 1
            return start, _ILLEGAL, "unexpected null"
        if ch in _QUOTE_CHARS:
            ok, decoded, end = _scan_quoted(text, start)
            self.pos = end
            return start, (_QUOTED if ok else _ILLEGAL), decoded
        if ch in _SEPARATOR_CHARS:
            self.value_mode = False
            self.pos += 1
            return start, _SEPARATOR, ch
        if ch in _OPERATOR_CHARS:
            end = start
            while end < len(text) and text[end] in _OPERATOR_CHARS:
                end += 1
            self.pos = end
            self.value_mode = True
            return start, _OPERATOR, text[start:end]
        if self.value_mode and _is_value_char(ch):
            end = start
            while end < len(text) and _is_value_char(text[end]):
                end += 1
            self.pos = end
            self.value_mode = False
            return start, _VALUE, text[start:end]
        match = _FIELD_RE.match(text, start)
        if match:
            self.pos = match.end()
            return start, _FIELD, match.group()
        return start, _OTHER, ch


def _scan_quoted(text: str, start: int) -> tuple[bool, str, int]:
    """Decode the quoted literal at `start`: (ok, decoded text or error message, end)."""
    quote = text[start]
    out = bytearray()
    i = start + 1
    error = ""
    while True:
        if i >= len(text) or text[i] == "\n":
            return False, "quoted literal not terminated", i
        ch = text[i]
        if ch == quote:
            i += 1
            break
        if ch != "\\":
            out += ch.encode("utf-8", "surrogatepass")
            i += 1
            continue
        i += 1
        esc = text[i] if i < len(text) else ""
        if esc in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[esc].encode()
            i += 1
        elif esc == quote:
            out += esc.encode()
            i += 1
        elif esc and esc in "01234567":
            digits = text[i : i + 3]
            if len(digits) == 3 and all(d in "01234567" for d in digits) and int(digits, 8) <= 255:
                out.append(int(digits, 8))
                i += 3
            else:
                error = error or "illegal numeric escape sequence"
                i += 1
        elif esc and esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = text[i + 1 : i + 1 + width]
            if len(digits) == width and all(d in _HEX_DIGITS for d in digits):
                code = int(digits, 16)
                i += 1 + width
                if esc == "x":
                    out.append(code)  # one raw byte, as in Go strings
                elif code > 0x10FFFF:
                    error = error or "illegal numeric escape sequence"
                else:
                    if 0xD800 <= code <= 0xDFFF:
                        code = 0xFFFD  # Go encodes surrogate halves as the replacement rune
                    out += chr(code).encode("utf-8")
            else:
                error = error or "illegal numeric escape sequence"
                i += 1
        else:
            # Keep scanning to the closing quote, then report the bad escape.
            error = error or "illegal escape sequence"
            if esc:
                i += 1
    if error:
        return False, error, i
    return True, out.decode("utf-8", "surrogateescape"), i


class _Parser:
    """Recursive descent over the scanner's tokens (containerd's grammar)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def error(self, pos: int, message: str) -> InvalidArgument:
        text = self.text
        if pos < len(text):
            where = f"[{text[:pos]} >|{text[pos]}|< {text[pos + 1:]}]"
        else:
            where = f"[{text}]"
        return InvalidArgument(f"filters: parse error: {where}: {message} (at position {pos})")

    def selectors(self) -> tuple[Selector, ...]:
        try:
            found = [self.selector()]
            while True:
                nxt = self.scanner.peek()
                if nxt == ",":
                    self.scanner.scan()
                    found.append(self.selector())
                elif nxt == "":
                    return tuple(found)
                else:
                    raise _Error(self.scanner.pos, f"unexpected input: {nxt}")
        except _Error as exc:
            raise self.error(exc.pos, exc.message) from None

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.scanner.peek() in (",", ""):
            return Selector(path)
        operator = self.operator()
        value_pos, value = self.value(allow_alt_quotes=operator == MATCHES)
        if operator != MATCHES:
            return Selector(path, operator, value)
        try:
            regex = re.compile(value)
        except (re.error, OverflowError, RecursionError) as exc:
            raise _Error(value_pos, f"invalid regular expression {value!r}: {exc}") from None
        return Selector(path, operator, value, regex)

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _FIELD:
            return text
        if kind == _QUOTED:
            if self.text[pos] != '"':
                raise _Error(pos, "invalid quote encountered")
            return text
        if kind == _ILLEGAL:
            raise _Error(pos, text)
        raise _Error(pos, "expected field or quoted")

    def operator(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _OPERATOR:
            if text in OPERATORS:
                return text
            raise _Error(pos, f"unsupported operator {text!r}")
        if kind == _ILLEGAL:
            raise _Error(pos, text)
        raise _Error(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, allow_alt_quotes: bool) -> tuple[int, str]:
        pos, kind, text = self.scanner.scan()
        if kind in (_VALUE, _FIELD):
            return pos, text
        if kind == _QUOTED:
            if not allow_alt_quotes and self.text[pos] != '"':
                raise _Error(pos, "invalid quote encountered")
            return pos, text
        if kind == _ILLEGAL:
            raise _Error(pos, text)
        raise _Error(pos, "expected value or quoted")
