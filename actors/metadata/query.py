"""Filters pushed down into SQL: the parts of a filter that an index can answer.

The Python matcher stays the definition of what matches; a pushed-down condition is
exactly equivalent for the selectors it covers, and `exact` says whether it covered
them all (if not, rows are re-checked in Python).
"""

from __future__ import annotations

from typing import Callable, Mapping

from sqlalchemy import ColumnElement, and_, false, or_

from moord.messages.filters import EQUAL, NOT_EQUAL, PRESENT, Filter, Selector

# (key, value or None for "any value") -> condition "the row has that label"
LabelCondition = Callable[[str, "str | None"], ColumnElement[bool]]


def prefilter(
    flt: Filter,
    columns: Mapping[tuple[str, ...], ColumnElement[str]],
    has_label: LabelCondition | None = None,
) -> tuple[ColumnElement[bool] | None, bool]:
    """A SQL condition implied by `flt` (None: no restriction) and whether it is exact.

    `columns` maps fieldpaths to text columns where "" means absent; `has_label` builds
    the condition for `labels.<key>`. Empty label values are never stored, so a stored
    label is always present.
    """
    if flt.always:
        return None, True
    alternatives = []
    exact = True
    for conjunction in flt.alternatives:
        parts = []
        for selector in conjunction:
            cond = _selector_condition(selector, columns, has_label)
            if cond is None:
                exact = False
            else:
                parts.append(cond)
        if not parts:
            return None, False  # this alternative is unrestricted in SQL: so is the OR
        alternatives.append(and_(*parts))
    return or_(*alternatives), exact


def _selector_condition(
    selector: Selector,
    columns: Mapping[tuple[str, ...], ColumnElement[str]],
    has_label: LabelCondition | None,
) -> ColumnElement[bool] | None:
    op, value = selector.operator, selector.value
    column = columns.get(selector.fieldpath)
    if column is not None:
        if op == PRESENT:
            return column != ""
        if op == EQUAL:
            return (column == value) if value else false()
        if op == NOT_EQUAL:
            return column != value
        return None  # regular expressions are Python's
    path = selector.fieldpath
    if has_label is None or path[0] != "labels" or len(path) < 2:
        return None
    key = ".".join(path[1:])
    if op == PRESENT:
        return has_label(key, None)
    if op == EQUAL:
        return has_label(key, value) if value else false()
    if op == NOT_EQUAL:
        # absent compares as "": with value "" only a present label differs
        return has_label(key, None) if value == "" else ~has_label(key, value)
    return None

