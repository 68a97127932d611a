"""Validate attribution-graph JSON against Neuronpedia's graph schema (tests/data/neuronpedia-graph-schema.json).

The `jsonschema` package is not a dependency, so this checks the part of JSON Schema draft-07 that the schema uses:
`type`, `properties`, `required`, `additionalProperties`, `items`, `prefixItems`, `minItems`, `maxItems`. Any other
constraining keyword in the schema is an error here, never silently skipped. Used by tests/test_graph.py and
benchmarks/graph_small_lm.py; where `jsonschema` is installed, `schema_errors` also asks its Draft7Validator.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "neuronpedia-graph-schema.json"
CHECKED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems"}
ANNOTATIONS = {"description", "examples", "title", "version", "$id", "$schema", "$comment"}
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number"):
        kinds = int if name == "integer" else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)
    return isinstance(value, TYPES[name])


def errors(value: Any, spec: dict, path: str = "root") -> list[str]:
    """Every way `value` breaks `spec`, as 'path: reason' lines."""
    unknown = set(spec) - CHECKED - ANNOTATIONS
    if unknown:
        raise ValueError(f"{path}: schema keywords {sorted(unknown)} are not checked by this validator")
    if "type" in spec:
        names = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        if not any(_is(value, n) for n in names):
            return [f"{path}: {json.dumps(value)[:60]} is not of type {names}"]
    found: list[str] = []
    if isinstance(value, dict):
        found += [f"{path}: missing required property {k!r}" for k in spec.get("required", []) if k not in value]
        extra = spec.get("additionalProperties", True)
        for k, v in value.items():
            if k in spec.get("properties", {}):
                found += errors(v, spec["properties"][k], f"{path}.{k}")
            elif extra is False:
                found.append(f"{path}: property {k!r} is not allowed")
            elif isinstance(extra, dict):
                found += errors(v, extra, f"{path}.{k}")
    if isinstance(value, list):
        if len(value) < spec.get("minItems", 0) or len(value) > spec.get("maxItems", len(value)):
            found.append(f"{path}: {len(value)} items, outside [{spec.get('minItems', 0)}, {spec.get('maxItems')}]")
        prefix = spec.get("prefixItems", [])
        for i, item in enumerate(value):
            if i < len(prefix):
                found += errors(item, prefix[i], f"{path}[{i}]")
            if "items" in spec:
                found += errors(item, spec["items"], f"{path}[{i}]")
    return found


def schema_errors(doc: dict) -> list[str]:
    """The graph document's schema violations (empty when it validates)."""
    found = errors(doc, schema())
    try:
        import jsonschema
    except ImportError:
        return found
    return found + [f"jsonschema: {e.message}" for e in jsonschema.Draft7Validator(schema()).iter_errors(doc)]
