"""Request parsing and the one place where errors become HTTP responses."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, TypeVar

import flask
from pydantic import BaseModel, ValidationError

from shared.errors import (
    BadRequest,
    BillingError,
    MethodNotAllowed,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
)

log = logging.getLogger("metered_billing")

MAX_BODY_BYTES = 64 * 1024
JSON_MEDIA_TYPE = "application/json"

Handler = Callable[[flask.Request], flask.Response]
Model = TypeVar("Model", bound=BaseModel)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> flask.Response:
    response = flask.Response(
        json.dumps(body, default=str), status=status, mimetype="application/json"
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(error: BillingError, headers: dict[str, str] | None = None) -> flask.Response:
    return json_response(error.to_body(), error.status, headers)


def endpoint(
    methods: Iterable[str], headers: Callable[[flask.Request], dict[str, str]] | None = None
) -> Callable[[Handler], Handler]:
    """Wrap an entry point: method check, error mapping, a request id on unexpected failures.

    `headers(request)` adds headers (CORS) to every answer, errors included.
    """
    allowed = tuple(methods)

    def wrap(handler: Handler) -> Handler:
        @wraps(handler)
        def run(request: flask.Request) -> flask.Response:
            extra = headers(request) if headers else {}
            try:
                if request.method not in allowed:
                    raise MethodNotAllowed(
                        f"{request.method} is not allowed here; use {', '.join(allowed)}."
                    )
                response = handler(request)
            except BillingError as error:
                if error.status >= 500:
                    log.warning("%s: %s %s", handler.__name__, error.code, error.message)
                response = error_response(error)
                if isinstance(error, MethodNotAllowed):
                    response.headers["Allow"] = ", ".join(allowed)
            except Exception:
                request_id = uuid.uuid4().hex
                log.exception("%s failed, request_id=%s", handler.__name__, request_id)
                response = json_response(
                    {
                        "error": {
                            "code": "internal_error",
                            "message": "Something went wrong on our side; it was logged.",
                            "request_id": request_id,
                        }
                    },
                    500,
                )
            for name, value in extra.items():
                response.headers[name] = value
            return response

        return run

    return wrap


def read_json(request: flask.Request) -> Any:
    """The request body as JSON (None when empty); 413 when too large, 415 when a body is sent
    as another media type than application/json, 400 when it is not JSON."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The body is larger than {MAX_BODY_BYTES} bytes.")
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The body is larger than {MAX_BODY_BYTES} bytes.")
    # `mimetype` is lower-cased and without parameters (`; charset=utf-8` is fine).
    if raw and request.mimetype != JSON_MEDIA_TYPE:
        found = f"Content-Type {request.mimetype[:100]}" if request.mimetype else "no Content-Type"
        raise UnsupportedMediaType(
            f"The body must be JSON sent as Content-Type {JSON_MEDIA_TYPE}; this one has {found}."
        )
    try:
        # NaN and Infinity parse to floats on purpose: the models refuse them naming the field.
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: Recursion
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from exc


def parse_body(request: flask.Request, model: type[Model]) -> Model:
    """Validate the JSON body against `model`; 422 naming the first bad field."""
    body = read_json(request)
    if not isinstance(body, dict):
        raise Unprocessable("The body must be a JSON object.", field="body")
    return validate(model, body)


def validate(model: type[Model], data: dict[str, Any]) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise Unprocessable(f"{field}: {message}", field=field) from exc


def bearer_token(request: flask.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
