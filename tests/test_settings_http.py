"""Settings fail fast; the one error boundary turns every failure into the JSON error shape."""

from __future__ import annotations

import json
import logging

import flask
import pytest
from pydantic import BaseModel, Field

from shared.errors import ConfigError, Conflict
from shared.http import endpoint, parse_body
from shared.settings import Settings


@pytest.mark.parametrize(
    "value", [None, "", "changeme", "sk_test_xxx", "<your key>", "your-secret"]
)
def test_missing_or_placeholder_secret_names_the_variable(value):
    settings = Settings(STRIPE_SECRET_KEY=value)
    with pytest.raises(ConfigError, match="STRIPE_SECRET_KEY"):
        settings.require("STRIPE_SECRET_KEY")


@pytest.mark.parametrize("value", ["whsec_9f8a1b2c,whsec_xxx", "whsec_9f8a1b2c, changeme"])
def test_a_placeholder_among_rotated_webhook_secrets_is_refused(value):
    """An event signed with `whsec_xxx` would otherwise verify."""
    settings = Settings(STRIPE_WEBHOOK_SECRET=value)
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRET is a placeholder"):
        settings.require("STRIPE_WEBHOOK_SECRET")


def test_real_values_pass_and_secrets_stay_out_of_repr():
    settings = Settings(
        STRIPE_SECRET_KEY="sk_test_51Habc", STRIPE_WEBHOOK_SECRET="whsec_1, whsec_2"
    )
    assert settings.require("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET") is settings
    assert settings.webhook_secrets == ["whsec_1", "whsec_2"]
    assert "sk_test_51Habc" not in repr(settings)


def test_database_requires_one_transport():
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings().require_database()
    with pytest.raises(ConfigError, match="SUPABASE_SERVICE_ROLE_KEY"):
        Settings(SUPABASE_URL="https://x.supabase.co").require_database()


class Body(BaseModel):
    minutes: float = Field(ge=0, allow_inf_nan=False)


@endpoint(methods=("POST",))
def sample(request: flask.Request) -> flask.Response:
    body = parse_body(request, Body)
    if body.minutes == 7:
        raise Conflict("Seven is taken.", code="already_taken")
    if body.minutes == 13:
        raise RuntimeError("secret internals sk_live_123")
    return flask.jsonify(ok=True)


def call(method="POST", data=b"{}", content_type="application/json"):
    app = flask.Flask(__name__)
    with app.test_request_context("/", method=method, data=data, content_type=content_type):
        return sample(flask.request)


@pytest.mark.parametrize(
    ("method", "data", "status", "code"),
    [
        ("GET", b"", 405, "method_not_allowed"),
        ("POST", b"{not json", 400, "invalid_json"),
        ("POST", b"[1]", 422, "validation_error"),
        ("POST", b'{"minutes": -1}', 422, "validation_error"),
        ("POST", b'{"minutes": NaN}', 422, "validation_error"),
        ("POST", b'{"minutes": 1e999}', 422, "validation_error"),
        ("POST", b'{"minutes": 7}', 409, "already_taken"),
        ("POST", b"x" * 70_000, 413, "payload_too_large"),
        ("POST", b"[" * 30_000 + b"]" * 30_000, 400, "invalid_json"),
        ("POST", b"\xff\xfe", 400, "invalid_json"),
    ],
)
def test_errors_have_one_shape(method, data, status, code):
    response = call(method, data)
    assert response.status_code == status
    body = json.loads(response.get_data())
    assert body["error"]["code"] == code and body["error"]["message"]


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON"],
)
def test_json_media_type_may_have_parameters_and_any_case(content_type):
    assert call(data=b'{"minutes": 1}', content_type=content_type).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonp", "text/json"],
)
def test_a_body_of_another_media_type_is_415(content_type):
    response = call(data=b'{"minutes": 1}', content_type=content_type)
    assert response.status_code == 415
    error = json.loads(response.get_data())["error"]
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]


def test_an_empty_body_is_read_as_before_whatever_its_media_type():
    # No body at all is not a media-type question: the model's own refusal still answers.
    response = call(data=b"", content_type="text/plain")
    assert response.status_code == 422
    assert json.loads(response.get_data())["error"]["field"] == "body"


def test_validation_error_names_the_field():
    body = json.loads(call(data=b'{"minutes": -1}').get_data())
    assert body["error"]["field"] == "minutes"
    assert "minutes" in body["error"]["message"]


def test_unexpected_error_is_a_500_with_a_request_id_logged_once(caplog):
    with caplog.at_level(logging.ERROR):
        response = call(data=b'{"minutes": 13}')
    body = json.loads(response.get_data())
    assert response.status_code == 500
    assert body["error"]["code"] == "internal_error"
    assert "sk_live_123" not in response.get_data(as_text=True)
    assert len(caplog.records) == 1
    assert body["error"]["request_id"] in caplog.records[0].getMessage()


def test_stripe_errors_are_described_without_keys():
    import stripe

    from shared.stripe_api import describe

    error = stripe.AuthenticationError(
        "Invalid API Key provided: sk_live_****************abcd", http_status=401
    )
    text = describe(error)
    assert "abcd" not in text and "sk_live" not in text
    assert text.startswith("AuthenticationError (401")


def test_settings_come_from_the_environment_and_arguments_win(monkeypatch):
    monkeypatch.setenv("STRIPE_TIMEOUT_SECONDS", "4.5")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "3")
    monkeypatch.setenv("NOT_A_SETTING", "ignored")
    settings = Settings(DATABASE_POOL_SIZE=7)
    assert settings.STRIPE_TIMEOUT_SECONDS == 4.5
    assert settings.DATABASE_POOL_SIZE == 7
    assert not hasattr(settings, "NOT_A_SETTING")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STRIPE_TIMEOUT_SECONDS", "fast"),
        ("STRIPE_TIMEOUT_SECONDS", "0"),
        ("DATABASE_POOL_SIZE", "0"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_it(monkeypatch, name, value):
    from pydantic import ValidationError

    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name):
        Settings()
