"""PostgreSQL text-format values to JSON values, by type: numbers for integers and floats, numeric as an
exact string, booleans, parsed json/jsonb, arrays as lists, text for everything else."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

Converter = Callable[[str], Any]

BOOL, INT8, INT2, INT4, OID, JSON, FLOAT4, FLOAT8, NUMERIC, JSONB = 16, 20, 21, 23, 26, 114, 700, 701, 1700, 3802
_NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})


class TypeInfo(NamedTuple):
    """One pg_type row: its name, its category (`A` for arrays) and, for an array, its element's OID."""

    name: str
    category: str
    element: int


def _float(text: str) -> Any:
    # JSON has no NaN or infinities: they stay strings, as PostgreSQL writes them
    return text if text in _NON_FINITE else float(text)


def _bool(text: str) -> bool:
    return text == "t"


def _text(text: str) -> str:
    return text


_SCALARS: dict[int, Converter] = {
    BOOL: _bool, INT2: int, INT4: int, INT8: int, OID: int, FLOAT4: _float, FLOAT8: _float,
    NUMERIC: _text, JSON: json.loads, JSONB: json.loads,
}


def converter_for(oid: int, types: Mapping[int, TypeInfo]) -> Converter:
    """How to turn a column of type `oid` into JSON; text when the type is not one of the above."""
    scalar = _SCALARS.get(oid)
    if scalar is not None:
        return scalar
    info = types.get(oid)
    if info is not None and info.category == "A" and info.element and info.name.startswith("_"):
        element = converter_for(info.element, types)
        return lambda text: parse_array(text, element)
    return _text


def parse_array(text: str, element: Converter) -> Any:
    """`{1,2,NULL}` or `{{"a b",c},{d,e}}` (with an optional `[1:2]=` bounds prefix) to nested lists;
    text that is not an array literal (int2vector, say) is returned as it is."""
    start = 0
    if text.startswith("["):
        start = text.find("=") + 1
        if start <= 0:
            return text
    if not text.startswith("{", start):
        return text
    try:
        value, end = _parse_level(text, start, element)
    except (IndexError, ValueError):
        return text
    return value if end == len(text) else text


def _parse_level(text: str, pos: int, element: Converter) -> tuple[list[Any], int]:
    """The list opened by the `{` at `pos`, and the position after its `}`."""
    items: list[Any] = []
    pos += 1
    if text[pos] == "}":
        return items, pos + 1
    while True:
        char = text[pos]
        if char == "{":
            nested, pos = _parse_level(text, pos, element)
            items.append(nested)
        elif char == '"':
            chars: list[str] = []
            pos += 1
            while text[pos] != '"':
                if text[pos] == "\\":
                    pos += 1
                chars.append(text[pos])
                pos += 1
            pos += 1
            items.append(element("".join(chars)))
        else:
            end = pos
            while text[end] not in ",}":
                end += 1
            raw = text[pos:end].strip()
            items.append(None if raw.upper() == "NULL" else element(raw))
            pos = end
        if text[pos] == "}":
            return items, pos + 1
        if text[pos] != ",":
            raise ValueError("malformed array literal")
        pos += 1


def param_text(value: Any) -> str | None:
    """A JSON parameter as the text PostgreSQL reads: null -> NULL, booleans, numbers, strings as they are,
    lists as array literals ({1,2}), objects as JSON text."""
    if value is None:
        return None
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "{" + ",".join(_array_element(item) for item in value) + "}"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return param_text(value) or "{}"
    text = param_text(value) or ""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
