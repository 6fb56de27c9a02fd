"""openapi.yaml is a valid OpenAPI document that names every function as deployed."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from ops.cloud_functions import FUNCTIONS
from tests.conftest import ROOT
from tests.openapi_check import assert_documented, spec


def test_openapi_document_is_valid():
    validate(spec())


def test_every_function_is_documented_and_every_path_is_a_function():
    paths = {path.strip("/") for path in spec()["paths"]}
    functions = {p.parent.name for p in (ROOT / "functions").glob("*/main.py")}
    assert paths == functions == set(FUNCTIONS)
    for name, (entry_point, _, _) in FUNCTIONS.items():
        assert f"def {entry_point}(" in (ROOT / "functions" / name / "main.py").read_text()


def test_the_checker_refuses_what_the_contract_does_not_say():
    with pytest.raises(AssertionError):
        assert_documented("/report-usage", "GET", 418, {})
    with pytest.raises(AssertionError):
        assert_documented("/create-checkout-session", "POST", 200, {"checkout_url": 1})
    with pytest.raises(AssertionError):
        assert_documented("/report-usage", "POST", 401, {"error": {"code": "Bad Code"}})
    assert_documented(
        "/report-usage", "POST", 401, {"error": {"code": "missing_token", "message": "x"}}
    )
