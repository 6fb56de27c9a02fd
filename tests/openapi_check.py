"""Check real responses against openapi.yaml, so the published contract stays true."""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema
import yaml

from tests.conftest import ROOT


@cache
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    return loaded


def response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    """The JSON schema openapi.yaml gives for this answer; AssertionError if it is undocumented."""
    operation = spec()["paths"][path][method.lower()]
    documented = operation["responses"].get(str(status))
    assert documented is not None, f"{method} {path} answered {status}, not in openapi.yaml"
    if "$ref" in documented:
        name = documented["$ref"].rsplit("/", 1)[1]
        documented = spec()["components"]["responses"][name]
    content = documented.get("content")
    return None if content is None else content["application/json"]["schema"]


def assert_documented(path: str, method: str, status: int, body: Any) -> None:
    """The status is documented for the operation and the body matches its schema."""
    schema = response_schema(path, method, status)
    if schema is None:
        return
    validator = jsonschema.Draft202012Validator(
        {**spec(), **schema}, format_checker=jsonschema.FormatChecker()
    )
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: {errors[0].message} in {body}"
