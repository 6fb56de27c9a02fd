"""Request parameters: Stripe's form encoding decoded, unknown parameters refused, typed values.

`decode_form` turns `a[b][0][c]=v` pairs into nested objects; `json_keys` names a v2 JSON body's
fields as form keys so that `check_known` refuses unknown ones alike; `as_int`, `as_bool`,
`as_object` and `required` read one parameter; `metadata` applies Stripe's metadata update.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .state import Json, StripeError, missing


def decode_form(pairs: Iterable[tuple[str, str]]) -> Json:
    """`a[b][0][c]=v` pairs to nested dicts/lists; `a[]` appends; metadata keys stay keys."""
    root: Json = {}
    for key, value in pairs:
        head, bracket, rest = key.partition("[")
        if bracket and not rest.endswith("]"):
            raise StripeError(400, f"Invalid parameter name: {key}", param=key)
        parts = [head, *(rest[:-1].split("][") if bracket else [])]
        node: Any = root
        for i, part in enumerate(parts):
            if not isinstance(node, dict):
                raise StripeError(400, f"Invalid parameter: {key} mixes a value and an object.")
            part = part or str(len(node))
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    decoded: Json = _listify(root, "")
    return decoded


def _listify(node: Any, name: str) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v, k) for k, v in node.items()}
    if items and name != "metadata" and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def json_keys(value: Any, prefix: str = "") -> list[str]:
    """A JSON body's leaf parameters named as form keys (`events[0][payload][value]`), so that
    `check_known` can refuse unknown fields of a v2 body as it does form parameters."""
    if isinstance(value, dict) and value:
        return [k for key, v in value.items() for k in json_keys(v, param_name(prefix, key))]
    if isinstance(value, list) and value:
        return [k for i, v in enumerate(value) for k in json_keys(v, f"{prefix}[{i}]")]
    return [prefix] if prefix else []


def check_known(keys: Iterable[str], allowed: frozenset[str]) -> None:
    """Refuse any parameter outside the endpoint's allow-list, naming it as Stripe does."""
    for key in keys:
        shape = re.sub(r"\[\d*\]", "[]", key)  # line_items[0][price] -> line_items[][price]
        if shape in allowed or any(
            a.endswith("[*]") and (shape.startswith(a[:-2]) or shape == a[:-3]) for a in allowed
        ):
            continue
        message = f"Received unknown parameter: {key}"
        raise StripeError(400, message, code="parameter_unknown", param=key)


def param_name(prefix: str, name: str) -> str:
    return f"{prefix}[{name}]" if prefix else name


def as_int(params: Json, name: str, *, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        message = f"Invalid integer: {value}"
        raise StripeError(400, message, code="parameter_invalid_integer", param=name) from None


def as_bool(params: Json, name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise StripeError(400, f"Invalid boolean: {value}", param=name)
    return bool(value == "true")


def as_object(params: Json, name: str, *, required: bool = False) -> Json:
    """A nested parameter (`name[key]=...`); {} when absent."""
    value = params.get(name)
    if value is None and required:
        raise missing(name)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid object", param=name)
    return value


def required(params: Json, name: str, prefix: str = "") -> Any:
    if params.get(name) in (None, ""):
        raise missing(param_name(prefix, name))
    return params[name]


def metadata(current: Json, update: Any) -> Json:
    """Stripe's metadata update: strings only, "" unsets a key, an empty `metadata=` clears all."""
    if update == "":
        return {}
    if not isinstance(update, dict):
        raise StripeError(400, "Invalid object", param="metadata")
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged
