"""Structured outputs: a request's `response_format`, checked, and turned into a GBNF grammar.

The embedded chat engine samples under the grammar, so an answer that ends on its own (not cut
by `max_tokens`) parses and matches its schema. The grammar comes from llama-cpp-python's JSON
schema converter, which enforces only some JSON Schema keywords; a schema that uses any other
constraint is refused here (never sampled as if the keyword were not there), and so is one where
the converter would drop a keyword (a `type` list beside other constraints, say).

Both validation (runner) and the engine call `parse_response_format`; results are cached by the
schema's canonical JSON, so a file whose lines share one schema converts it once.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

FORMAT_TYPES = ("text", "json_object", "json_schema")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Keywords that change nothing the grammar must produce (annotations), and those it enforces.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",  # date, time, date-time and uuid are enforced; other formats annotate only
        "$defs",
        "definitions",
    }
)
ENFORCED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "enum",
        "const",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "anyOf",
        "$ref",
    }
)
# Integer ranges are enforced by spelling them out as an enum: up to this many values.
_RANGE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MAX_RANGE = 1000
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# Keywords that must stand alone (with annotations): the converter reads nothing beside them.
_ALONE = ("$ref", "anyOf")
# The converter's string character allows raw control characters, which JSON forbids inside a
# string: llama.cpp's own (C++) converter excludes them, and so do we.
_CHAR_RULE = 'char ::= [^"\\\\] |'
_JSON_CHAR_RULE = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


class ResponseFormatError(ValueError):
    """Why a response_format cannot be honoured; `.message` says it to the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    type: str  # "text" | "json_object" | "json_schema"
    schema: dict[str, Any] | None = None  # json_schema only
    key: str = ""  # canonical JSON of the schema (json_schema), for caches


def parse_response_format(value: Any) -> ResponseFormat | None:
    """The request's response_format (None: absent or text); ResponseFormatError if malformed.
    Only the shape: whether a grammar can enforce the schema is `grammar_for`'s question."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in FORMAT_TYPES:
        raise ResponseFormatError(
            "'response_format' must be an object whose 'type' is 'text', 'json_object' or "
            "'json_schema'."
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ResponseFormatError(
            "'response_format.json_schema' must be an object with a 'schema' (and a 'name')."
        )
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
        raise ResponseFormatError(
            "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'."
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ResponseFormatError("'response_format.json_schema.strict' must be a boolean.")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ResponseFormatError("'response_format.json_schema.schema' must be a JSON object.")
    key = orjson.dumps(schema).decode()  # keeps the order of properties: it is the answer's
    return ResponseFormat("json_schema", schema, key)


def check_json_schema(fmt: ResponseFormat) -> None:
    """ResponseFormatError unless the schema is a valid JSON Schema (its own metaschema)."""
    if fmt.schema is not None:
        problem = _schema_problem(fmt.key)
        if problem:
            raise ResponseFormatError(problem)


@functools.lru_cache(maxsize=256)
def _schema_problem(key: str) -> str | None:
    import jsonschema

    schema = orjson.loads(key)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"'response_format.json_schema.schema' is not a valid JSON Schema{' at ' + where if where else ''}: {exc.message}"
    return None


def schema_validator(fmt: ResponseFormat) -> Any:
    """A jsonschema validator for the format's schema (cached; the schema must be valid)."""
    return _validator(fmt.key)


@functools.lru_cache(maxsize=256)
def _validator(key: str) -> Any:
    import jsonschema

    schema = orjson.loads(key)
    return jsonschema.validators.validator_for(schema)(schema)


def grammar_for(fmt: ResponseFormat) -> str:
    """The GBNF grammar that enforces the format; ResponseFormatError if it cannot."""
    if fmt.type == "json_object":
        return _grammar('{"type":"object"}')
    check_json_schema(fmt)
    return _grammar(fmt.key)


@functools.lru_cache(maxsize=256)
def _grammar(key: str) -> str:
    schema = orjson.loads(key)
    _check_enforceable(schema, "schema", schema)
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(orjson.dumps(_integer_ranges(schema)).decode())
    except Exception as exc:  # the converter asserts on what it cannot read
        raise ResponseFormatError(
            f"'response_format.json_schema.schema' cannot be turned into a grammar: {exc or type(exc).__name__}"
        ) from None
    if "\nchar ::=" in "\n" + grammar:
        if _CHAR_RULE not in grammar:
            raise RuntimeError("llama_cpp's JSON string rule changed: check _CHAR_RULE")
        grammar = grammar.replace(_CHAR_RULE, _JSON_CHAR_RULE)
    return grammar


def _check_enforceable(node: Any, path: str, root: dict[str, Any]) -> None:
    """Refuse any keyword the grammar would not enforce, naming it and where it is."""
    if not isinstance(node, dict):
        raise ResponseFormatError(
            f"{path} must be a JSON object here (boolean schemas are not supported)."
        )

    def refuse(why: str) -> None:
        raise ResponseFormatError(f"{path}: {why}")

    if any(k in node for k in _RANGE):
        bounds = _integer_bounds(node)
        if node.get("type") != "integer" or bounds is None or "enum" in node or "const" in node:
            refuse(
                "'minimum'/'maximum' (and their exclusive forms) are enforced only on integers "
                f"with both bounds, at most {_MAX_RANGE:,} apart; others are refused."
            )
    for keyword in node:
        if (
            keyword not in ENFORCED_KEYWORDS
            and keyword not in _ANNOTATIONS
            and keyword not in _RANGE
        ):
            refuse(
                f"'{keyword}' is not enforced by the embedded engine's grammar, so it is refused; "
                f"it enforces {', '.join(sorted(ENFORCED_KEYWORDS))} (and the formats date, "
                "time, date-time and uuid)."
            )
    constraints = [k for k in node if k in ENFORCED_KEYWORDS]
    for alone in _ALONE:
        if alone in node and len(constraints) > 1:
            others = ", ".join(repr(k) for k in constraints if k != alone)
            refuse(f"'{alone}' cannot be combined with {others} here.")
    if "$ref" in node and not (isinstance(node["$ref"], str) and node["$ref"].startswith("#/")):
        refuse("only local references ('#/$defs/...') are supported.")
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if any(k not in _TYPES for k in kinds):
        refuse(f"unknown type {kind!r}.")
    if isinstance(kind, list) and len(constraints) > 1:
        refuse("a list of types cannot be combined with other constraints; use anyOf.")
    if "enum" in node or "const" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
        if not isinstance(values, list) or not values:
            refuse("'enum' needs at least one value.")
        for value in values:
            if kinds and not any(_is_type(value, k) for k in kinds):
                refuse(f"the value {value!r} is not of type {kind!r}.")
        if "const" in node and "enum" in node:
            refuse("use 'enum' or 'const', not both.")
        if len(constraints) > (1 + ("type" in node)):
            refuse("'enum'/'const' cannot be combined with other constraints here.")
        return
    if ("minLength" in node or "maxLength" in node) and kind != "string":
        refuse("'minLength'/'maxLength' need \"type\": \"string\".")
    if ("minItems" in node or "maxItems" in node) and "items" not in node:
        refuse("'minItems'/'maxItems' need 'items'.")
    if ("items" in node or "prefixItems" in node) and kind not in (None, "array"):
        refuse('\'items\' needs "type": "array".')
    if "items" in node and "prefixItems" in node:
        refuse("use 'items' or 'prefixItems', not both.")
    properties = node.get("properties")
    if properties is not None or "required" in node or "additionalProperties" in node:
        if kind not in (None, "object"):
            refuse("'properties'/'required' need \"type\": \"object\".")
        node_props = properties or {}
        missing = [name for name in node.get("required") or [] if name not in node_props]
        if missing:
            refuse(f"'required' names {missing}, which 'properties' does not define.")
        if not isinstance(node_props, dict):
            refuse("'properties' must be an object.")
        for name, sub in node_props.items():
            _check_enforceable(sub, f"{path}.properties.{name}", root)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            _check_enforceable(extra, f"{path}.additionalProperties", root)
    if kind is None and not constraints and node is not root:
        return  # {} (any value)
    items = node.get("items")
    if isinstance(items, dict):
        _check_enforceable(items, f"{path}.items", root)
    elif isinstance(items, list):
        for i, sub in enumerate(items):
            _check_enforceable(sub, f"{path}.items[{i}]", root)
    for i, sub in enumerate(node.get("prefixItems") or []):
        _check_enforceable(sub, f"{path}.prefixItems[{i}]", root)
    for i, sub in enumerate(node.get("anyOf") or []):
        _check_enforceable(sub, f"{path}.anyOf[{i}]", root)
    for defs in ("$defs", "definitions"):
        for name, sub in (node.get(defs) or {}).items():
            _check_enforceable(sub, f"{path}.{defs}.{name}", root)


def _integer_bounds(node: dict[str, Any]) -> tuple[int, int] | None:
    """An integer schema's inclusive range, if it has both ends at most _MAX_RANGE apart."""
    low = high = None
    if isinstance(node.get("minimum"), int | float):
        low = math.ceil(node["minimum"])
    if isinstance(node.get("exclusiveMinimum"), int | float):
        low = max(low if low is not None else -math.inf, math.floor(node["exclusiveMinimum"]) + 1)
    if isinstance(node.get("maximum"), int | float):
        high = math.floor(node["maximum"])
    if isinstance(node.get("exclusiveMaximum"), int | float):
        high = min(high if high is not None else math.inf, math.ceil(node["exclusiveMaximum"]) - 1)
    if low is None or high is None or not 0 <= high - low <= _MAX_RANGE:
        return None
    return int(low), int(high)


def _integer_ranges(node: Any) -> Any:
    """The schema with each bounded integer range spelled out as an enum, which the converter
    turns into a grammar (it ignores minimum and maximum)."""
    if isinstance(node, list):
        return [_integer_ranges(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "integer" and any(k in node for k in _RANGE):
        bounds = _integer_bounds(node)
        assert bounds is not None  # _check_enforceable refused the rest
        kept = {k: v for k, v in node.items() if k not in _RANGE}
        return {**kept, "enum": list(range(bounds[0], bounds[1] + 1))}
    out = {}
    for k, v in node.items():
        if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {name: _integer_ranges(sub) for name, sub in v.items()}
        elif k in ("additionalProperties", "items", "prefixItems", "anyOf"):
            out[k] = _integer_ranges(v)
        else:
            out[k] = v
    return out


def _is_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, dict)
